"""Continued pretraining (`model.init_from`): the tokenizer of a Hugging Face RoBERTa directory, optionally extended.

Nothing is trained: the pretrained model's `tokenizer.json` is checked and written as the run's tokenizer in the
same layout (tokenizer.py), optionally extended with the new tokens of `tokenizer.extend_from` (`extend`), so that
shards and model use the ids the pretrained weights were trained with. Apart from tokenizer_training.py, which
trains a new one and hands `model.init_from` runs to `tokenizer_from_hf`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import Tokenizer, models

from .config import ConfigError, ExperimentConfig
from .corpus import Corpus
from .tokenizer import (
    FORMAT_VERSION,
    RESAVE,
    TokenizerError,
    evaluate,
    install,
    load_tokenizer,
    tokenizer_dir,
    up_to_date,
)

HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def read_hf_dir(path: str | Path) -> dict[str, Any]:
    """config.json of the Hugging Face RoBERTa directory `path`, once it is known to hold what continued
    pretraining needs (config, weights, tokenizer.json); else one ConfigError naming the path and every problem."""
    d, where = Path(path), f"model.init_from={path}"
    if not d.is_dir():
        raise ConfigError(f"{where}: not a directory (expected a Hugging Face RoBERTa directory)")
    problems, hf = [], {}
    if not (d / "config.json").is_file():
        problems.append("config.json is missing")
    else:
        try:
            hf = json.loads((d / "config.json").read_text())
        except ValueError as e:
            problems.append(f"config.json is not valid JSON ({e})")
        if not isinstance(hf, dict):
            problems.append("config.json is not a JSON object")
            hf = {}
        elif "model_type" in hf and hf["model_type"] != "roberta":
            problems.append(f"config.json has model_type {hf['model_type']!r}, this project continues "
                            "'roberta' only")
        elif hf and "model_type" not in hf:
            problems.append("config.json has no model_type (expected 'roberta')")
    if not any((d / w).is_file() for w in HF_WEIGHTS):
        problems.append(f"no weights ({' or '.join(HF_WEIGHTS)})")
    if not (d / "tokenizer.json").is_file():
        problems.append("tokenizer.json is missing (save the fast tokenizer there with tokenizer.save_pretrained)")
    if problems:
        raise ConfigError(f"{where}: {'; '.join(problems)}")
    return hf


def tokenizer_from_hf(cfg: ExperimentConfig, force: bool = False, log=print) -> Path:
    """`model.init_from`: its tokenizer (plus `tokenizer.extend_from`'s new tokens) becomes the run's tokenizer,
    so that shards and model use the ids the pretrained weights were trained with. `tokenizer.vocab_size` and
    `min_frequency` do not apply."""
    read_hf_dir(cfg.model.init_from)
    out = tokenizer_dir(cfg)
    source = Path(cfg.model.init_from) / "tokenizer.json"
    domain = Path(cfg.tokenizer.extend_from) / "tokenizer.json" if cfg.tokenizer.extend_from else None
    fingerprint = {"init_from": _sha256(source), "extend_from": _sha256(domain) if domain else None,
                   "tokenizers": tokenizers.__version__, "format": FORMAT_VERSION}
    if not force and up_to_date(out, "source_fingerprint", fingerprint):
        log(f"tokenizer: {out} is up to date with model.init_from={cfg.model.init_from} "
            "(delete it or pass --force to rebuild)")
        return out
    tok = load_tokenizer(source.parent, fix=RESAVE)
    if not isinstance(tok.model, models.BPE):
        raise TokenizerError(f"{source}: a {type(tok.model).__name__} model, not RoBERTa's byte-level BPE")
    added: list[str] = []
    if domain is not None:
        tok, added = extend(tok, load_tokenizer(domain.parent, fix=RESAVE))
        log(f"tokenizer: appended {len(added)} tokens of {domain.parent} after the "
            f"{tok.get_vocab_size() - len(added)} of model.init_from (old ids kept)")
    report = {"vocab_size": tok.get_vocab_size(), **evaluate(tok, Corpus.of_experiment(cfg).documents("valid")),
              "init_from": str(cfg.model.init_from), "extend_from": cfg.tokenizer.extend_from,
              # not "fingerprint": that names a trained tokenizer's corpus and settings, which data prep checks
              "added_tokens": len(added), "source_fingerprint": fingerprint}
    install(tok, report, out, cfg.data.seq_len)
    exact = report["exact_roundtrip"]
    log(f"tokenizer: wrote {out} from {source} ({report['vocab_size']} tokens, {report['bytes_per_token']} bytes "
        f"per token on the validation text, exact round trip {'n/a' if exact is None else f'{exact:.4%}'})")
    return out


def extend(old: Tokenizer, domain: Tokenizer) -> tuple[Tokenizer, list[str]]:
    """`old` plus the tokens of `domain` that it lacks, appended after its last id in `domain`'s id order; returns
    the new tokenizer and the added tokens. Every old id (<mask> included, so it is no longer the last id) and
    the priority of every old merge stay as they were: `domain`'s missing merges are appended after the old
    ones, so a new token appears where the domain's merge meets the pieces the old merges leave."""
    spec = json.loads(old.to_str())
    # Every old token, the specials and <mask> included, goes into the BPE vocabulary at its id, so the
    # appended ids follow the last id with no gap (a trained tokenizer keeps <mask> outside the BPE vocabulary).
    vocab = old.get_vocab(with_added_tokens=True)
    assert sorted(vocab.values()) == list(range(len(vocab))), "the old tokenizer's ids are not contiguous"
    added = [t for t, _ in sorted(domain.get_vocab(with_added_tokens=False).items(), key=lambda kv: kv[1])
             if t not in vocab]
    for t in added:
        vocab[t] = len(vocab)

    def pairs(model_spec: dict[str, Any]) -> list[tuple[str, str]]:
        # `tokenizers` writes a merge as "a b" (before 0.20) or ["a", "b"]
        return [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model_spec["merges"]]

    merges = pairs(spec["model"])
    known = set(merges)
    merges += [m for m in pairs(json.loads(domain.to_str())["model"]) if m not in known]
    spec["model"]["vocab"] = vocab
    spec["model"]["merges"] = [list(m) for m in merges]
    tok = Tokenizer.from_str(json.dumps(spec))
    assert all(tok.token_to_id(t) == i for t, i in old.get_vocab(with_added_tokens=True).items()), "old ids moved"
    return tok, added


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
