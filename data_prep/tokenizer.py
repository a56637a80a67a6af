"""Train RoBERTa's byte-level BPE tokenizer from the streaming corpus reader and save it in Hugging Face's layout.

Special tokens have fixed ids, as in RoBERTa: `<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3 and `<mask>` the last id.
Byte-level BPE has 256 byte symbols in its alphabet, so no text ever maps to `<unk>` and every string decodes
back exactly. The post-processor wraps inputs as `<s> A </s>` and `<s> A </s></s> B </s>`.

Written to `run_dir/tokenizer/`: `tokenizer.json` (the `tokenizers` pipeline), `vocab.json` + `merges.txt` (the
BPE model, what the Python `RobertaTokenizer` reads), `tokenizer_config.json` and `special_tokens_map.json`
(what `transformers.AutoTokenizer` reads), and `quality.json` (the report below, plus the fingerprint of the
corpus and settings it was trained from, used to skip retraining).

Continued pretraining (`model.init_from`) trains nothing: the pretrained model's `tokenizer.json` is checked and
written here in the same layout, optionally extended with the new tokens of `tokenizer.extend_from` (`extend`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from .config import ConfigError, ExperimentConfig
from .corpus import Corpus, CorpusStats
from .sources import short_label

SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")  # ids 0..3; <mask> is added last
MASK = "<mask>"
FORMAT_VERSION = 2  # 2: trained on whole documents, newlines included (was: line by line)
FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
RESAVE = "save it again with the fast tokenizer's `save_pretrained(DIR)`"  # the fix for a tokenizer one brought
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


class TokenizerError(ValueError):
    """A missing or unusable tokenizer directory."""


def tokenizer_dir(cfg: ExperimentConfig) -> Path:
    return cfg.run_path / "tokenizer"


def special_ids(tok: Tokenizer) -> dict[str, int]:
    ids = {name: tok.token_to_id(t) for name, t in zip(("bos", "pad", "eos", "unk"), SPECIALS, strict=True)}
    ids["mask"] = tok.token_to_id(MASK)
    return ids


def load_tokenizer(directory: str | Path, fix: str = "delete it and run `make tokenizer` again") -> Tokenizer:
    """The tokenizer of `directory`/tokenizer.json, checked for RoBERTa's special ids; a missing, damaged or foreign
    file is a TokenizerError naming it and `fix` (for a file the user brought, say how to make it again)."""
    path = Path(directory) / "tokenizer.json"
    if not path.is_file():
        raise TokenizerError(f"{path} does not exist: run `make tokenizer` first")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # `tokenizers` raises a plain Exception for any file it cannot parse
        if (error := _os_error(e, path)) is not None:
            raise error from None  # unreadable, not damaged: the operating system's one line
        raise TokenizerError(f"{path}: not a tokenizer file ({_first_line(e)}); {fix}") from None
    ids = special_ids(tok)
    if ids["bos"] != 0 or ids["pad"] != 1 or ids["eos"] != 2 or ids["unk"] != 3 or ids["mask"] is None:
        raise TokenizerError(f"{path}: special tokens are not RoBERTa's (<s>=0, <pad>=1, </s>=2, <unk>=3, <mask>)")
    return tok


def build_untrained() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def finalize(tok: Tokenizer) -> Tokenizer:
    """Add `<mask>` as the last id and RoBERTa's post-processor."""
    tok.add_special_tokens([AddedToken(MASK, lstrip=True, rstrip=False, normalized=False, special=True)])
    # positional: the second argument is named `cls` in some `tokenizers` releases and `cls_token` in others
    tok.post_processor = processors.RobertaProcessing(
        ("</s>", tok.token_to_id("</s>")), ("<s>", tok.token_to_id("<s>")), True, False
    )
    return tok


def _settings(cfg: ExperimentConfig) -> dict[str, Any]:
    t = cfg.tokenizer
    return {"vocab_size": t.vocab_size, "min_frequency": t.min_frequency,
            "tokenizers": tokenizers.__version__, "format": FORMAT_VERSION,
            # only when set, so that tokenizers trained on all the text keep their fingerprint
            **({"max_train_bytes": t.max_train_bytes} if t.max_train_bytes else {})}


def training_documents(corpus: Corpus, max_bytes: int, stats: CorpusStats,
                       read: list[dict[str, Any]]) -> Iterator[list[str]]:
    """The documents the tokenizer learns from: the weighted train split, or with `max_bytes` a sample of it
    (`Corpus.sample`) whose sources share the bytes in proportion to weight x size, or to weight alone when a
    source's size is not known up front (.gz, .parquet, hf:). `read` gets one {name, path, weight, documents,
    bytes} per source and a "basis" entry naming the rule."""
    sizes = [_known_size(files) for files in corpus.source_files]
    by_size = None not in sizes
    read.extend({"name": s.label, "path": s.path, "weight": s.weight, "documents": 0, "bytes": 0}
                for s in corpus.sources)
    if max_bytes:
        shares = [s.weight * (size if by_size else 1) for s, size in zip(corpus.sources, sizes, strict=True)]
        docs = corpus.sample(max_bytes, shares, stats)
    else:
        docs = corpus.records("train", stats)
    for doc in docs:
        read[doc.source]["documents"] += 1
        read[doc.source]["bytes"] += doc.bytes
        yield doc.lines
    if max_bytes and not any(r["documents"] for r in read):
        raise ConfigError(f"tokenizer.max_train_bytes={max_bytes} is smaller than the first document of every "
                          "source (whole documents only): raise it, or set 0 for all the text")


def _document_texts(docs: Iterator[list[str]], size: int) -> Iterator[str]:
    """Each document as the shards encode it: its lines joined by "\n" (data_prep/pack.py encodes every line
    after a document's first as "\n" + line). A document longer than `size` characters comes in pieces cut
    between lines, so no item is larger than about `size` + one line (lines are at most max_line_bytes)."""
    for doc in docs:
        piece: list[str] = []
        chars = 0
        for line in doc:
            piece.append(line)
            chars += len(line) + 1
            if chars >= size:
                yield "\n".join(piece)
                piece, chars = [], 0
        if piece:
            yield "\n".join(piece)


def _batches(docs: Iterator[list[str]], stats: CorpusStats, bar: Any, size: int = 1 << 20) -> Iterator[list[str]]:
    """Document texts (`_document_texts`) in batches of about `size` characters. So the merges are learnt on
    the text the model will see, newlines and indentation included, and the Rust trainer gets few, large items:
    one item per line made it about 15% slower than `tokenizers` reading the file itself
    (bench/bench_tokenizer.py). The progress bar follows bytes read."""
    batch: list[str] = []
    chars = seen = 0
    for text in _document_texts(docs, size):
        batch.append(text)
        chars += len(text)
        if chars >= size:
            yield batch
            batch, chars = [], 0
            bar.update(stats.bytes - seen)
            seen = stats.bytes
    if batch:
        yield batch
    bar.update(stats.bytes - seen)


def train_tokenizer(cfg: ExperimentConfig, force: bool = False, log=print) -> Path:
    """Train (or reuse) the experiment's tokenizer; returns its directory. With `model.init_from`, take the
    pretrained model's tokenizer instead (`tokenizer_from_hf`)."""
    from tqdm import tqdm

    if cfg.model.init_from:
        return tokenizer_from_hf(cfg, force, log)
    out = tokenizer_dir(cfg)
    corpus = Corpus.of_experiment(cfg)
    fingerprint = {"corpus": corpus.fingerprint(), **_settings(cfg)}
    if not force and _up_to_date(out, "fingerprint", fingerprint):
        log(f"tokenizer: {out} is up to date for this corpus and these settings "
            "(delete it or pass --force to rebuild)")
        return out

    # 1) train on the train split only, streaming, so the validation numbers below are honest
    start = time.perf_counter()
    tok = build_untrained()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.tokenizer.vocab_size - 1,  # <mask> is added after training, as the last id
        min_frequency=cfg.tokenizer.min_frequency,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    stats = CorpusStats()
    cap = cfg.tokenizer.max_train_bytes
    total = _known_size(corpus.train_sources)
    total = min(total, cap) if total is not None and cap else cap or total
    read: list[dict[str, Any]] = []
    with tqdm(total=total, unit="B", unit_scale=True, desc="tokenizer: reading train", mininterval=1.0,
              disable=None) as bar:
        docs = training_documents(corpus, cap, stats, read)
        tok.train_from_iterator(_batches(docs, stats, bar), trainer=trainer)
    finalize(tok)
    train_seconds = time.perf_counter() - start

    # 2) measure on the validation split
    quality = evaluate(tok, corpus.documents("valid"))
    report = {
        "vocab_size": tok.get_vocab_size(),
        **quality,
        "train_seconds": round(train_seconds, 2),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "train_documents": sum(r["documents"] for r in read),
        "train_bytes": sum(r["bytes"] for r in read),
        "bytes_read": stats.bytes,
        "max_train_bytes": cap,
        "sources": read,
        "replaced_bytes": stats.replaced_bytes,
        "nul_bytes": stats.nul_bytes,
        "fingerprint": fingerprint,
    }
    if tok.get_vocab_size() < cfg.tokenizer.vocab_size:
        log(f"tokenizer: the corpus supports only {tok.get_vocab_size()} tokens of the requested "
            f"{cfg.tokenizer.vocab_size} at min_frequency={cfg.tokenizer.min_frequency}; <mask> is id "
            f"{tok.token_to_id(MASK)}")

    # 3) write into a fresh directory and swap it in, so a crash never leaves a half-written tokenizer
    _install(tok, report, out, cfg.data.seq_len)
    log(format_report(report, out))
    return out


def _install(tok: Tokenizer, report: dict[str, Any], out: Path, model_max_length: int) -> None:
    """Write the tokenizer into a fresh directory beside `out`, every file flushed to disk, and swap it in: `out`
    is then complete or absent (or the old one), whatever stops the write (a full disk, a kill, a power cut). A
    failed write removes the fresh directory and keeps the old one."""
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save(tok, tmp, model_max_length=model_max_length)
        _write_file(tmp / "quality.json", json.dumps(report, indent=2) + "\n")  # last: up to date (`_up_to_date`)
        _fsync(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(out.name + f".old{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    _fsync(out.parent)


_OS_ERROR = re.compile(r"\(os error (\d+)\)$")  # how Rust's std::io::Error ends its message


def _os_error(e: Exception, path: Path) -> OSError | None:
    """`tokenizers`' plain Exception for a failed read or write ("No space left on device (os error 28)") as the
    OSError (naming `path`) that Python's own I/O would raise; None when it is no OS error."""
    m = _OS_ERROR.search(str(e))
    return OSError(int(m[1]), os.strerror(int(m[1])), str(path)) if m else None


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _rust_write(path: Path, write: Callable[[], Any]) -> None:
    """A `tokenizers` save; its OS errors become OSErrors naming `path`, so the command ends with one line."""
    try:
        write()
    except Exception as e:
        if (error := _os_error(e, path)) is None:
            raise
        raise error from None


def _write_file(path: Path, text: str) -> None:
    """`text` into `path`, flushed to disk; a failed write names the file (a Python `write()` error does not)."""
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        if e.filename is None:
            e.filename = str(path)
        raise


def _fsync(path: Path) -> None:
    """Flush a directory's files (`tokenizers` writes without fsync) and then its entries to disk."""
    try:
        for p in [*path.iterdir(), path] if path.is_dir() else [path]:
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    except OSError as e:
        if e.filename is None:
            e.filename = str(path)
        raise


# ---------------------------------------------------------------------------------------------------------------
# Continued pretraining: the tokenizer of a Hugging Face RoBERTa directory, optionally extended


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
    if not force and _up_to_date(out, "source_fingerprint", fingerprint):
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
    _install(tok, report, out, cfg.data.seq_len)
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


def _up_to_date(out: Path, key: str, fingerprint: dict[str, Any]) -> bool:
    """All files present and quality.json records `fingerprint` under `key`; a damaged quality.json is not."""
    report = out / "quality.json"
    if not report.is_file() or not all((out / f).is_file() for f in FILES):
        return False
    try:
        found = json.loads(report.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError):
        return False
    return isinstance(found, dict) and found.get(key) == fingerprint


def save(tok: Tokenizer, directory: Path, model_max_length: int) -> None:
    """Write the five files `transformers` needs to load this as a RoBERTa tokenizer offline."""
    directory.mkdir(parents=True, exist_ok=True)
    _rust_write(directory / "tokenizer.json", lambda: tok.save(str(directory / "tokenizer.json")))
    _rust_write(directory / "vocab.json", lambda: tok.model.save(str(directory)))  # and merges.txt
    mask = {"content": MASK, "lstrip": True, "rstrip": False, "normalized": False, "single_word": False,
            "special": True}
    special_map = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "sep_token": "</s>",
                   "pad_token": "<pad>", "cls_token": "<s>", "mask_token": mask}
    added = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "rstrip": False, "normalized": False,
                                       "single_word": False, "special": True} for t in SPECIALS}
    added[str(tok.token_to_id(MASK))] = mask
    config = {
        "tokenizer_class": "RobertaTokenizer",
        "add_prefix_space": False,
        "trim_offsets": True,
        "errors": "replace",
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": added,
        **special_map,
        "mask_token": MASK,  # a plain string here; its lstrip lives in tokenizer.json and added_tokens_decoder
    }
    _write_file(directory / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
    _write_file(directory / "special_tokens_map.json", json.dumps(special_map, indent=2) + "\n")


def evaluate(tok: Tokenizer, docs: Iterator[list[str]], max_bytes: int = 4_000_000) -> dict[str, Any]:
    """Bytes per token, tokens per word and the share of text that decodes back exactly, on the first
    `max_bytes` of validation documents as the shards encode them (lines joined by "\n")."""
    n_bytes = n_tokens = n_words = exact_bytes = 0
    texts: list[str] = []
    total = 0
    for text in _document_texts(docs, 1 << 20):
        texts.append(text)
        total += len(text)
        if total >= max_bytes:
            break
    for start in range(0, len(texts), 64):
        batch = texts[start : start + 64]
        encs = tok.encode_batch(batch, add_special_tokens=False)
        decoded = tok.decode_batch([e.ids for e in encs], skip_special_tokens=False)
        for text, enc, back in zip(batch, encs, decoded, strict=True):
            size = len(text.encode("utf-8"))
            n_bytes += size
            n_tokens += len(enc.ids)
            n_words += len(text.split())
            exact_bytes += size if back == text else 0
    return {
        "valid_bytes": n_bytes,
        "bytes_per_token": round(n_bytes / max(n_tokens, 1), 3),
        "tokens_per_word": round(n_tokens / max(n_words, 1), 3),
        "exact_roundtrip": round(exact_bytes / max(n_bytes, 1), 6) if n_bytes else None,
    }


def format_report(report: dict[str, Any], directory: Path) -> str:
    exact = report["exact_roundtrip"]
    return (
        f"tokenizer: wrote {directory}\n"
        f"  vocab size        {report['vocab_size']}\n"
        f"  bytes per token   {report['bytes_per_token']} (validation text, {report['valid_bytes']:,} bytes)\n"
        f"  tokens per word   {report['tokens_per_word']}\n"
        f"  exact round trip  {'n/a (no validation text)' if exact is None else f'{exact:.4%}'}\n"
        f"  training time     {report['train_seconds']} s on {report['train_bytes']:,} bytes"
        + (f" (a sample: tokenizer.max_train_bytes={report['max_train_bytes']:,})" if report.get("max_train_bytes")
           else "") + "\n"
        f"  peak memory       {report['peak_rss_mb']} MB (process RSS)"
        + "".join(f"\n  read from {short_label(r['name']):24} {r['documents']:>10,} documents {r['bytes']:>14,} bytes"
                  f" (weight {r['weight']:g})" for r in report.get("sources", []) if len(report["sources"]) > 1)
    )


def _known_size(sources: list[str]) -> int | None:
    total = 0
    for s in sources:
        if s.startswith(("hf:", "builtin:")) or s.endswith(".gz") or s.endswith(".parquet"):
            return None  # compressed or remote: the byte count of the text is not known up front
        total += Path(s).stat().st_size
    return total


def _peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 / 1024 if sys.platform == "darwin" else rss / 1024
