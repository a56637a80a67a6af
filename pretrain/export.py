"""Checkpoint -> Hugging Face `RobertaForMaskedLM` directory with proven parity, and back (continued pretraining).

Export (`make export`, `python -m pretrain export`) writes what `transformers` loads offline with no custom code:
`config.json`, `model.safetensors`, the run's tokenizer files and a `README.md` model card with the provenance.
The parameters go through the one name map, `model.HF_NAME_MAP`, in both directions. The export is proven
before it is kept:
    1) the weights, config, tokenizer and card are written into a temporary directory beside the target;
    2) that directory is loaded with `AutoModelForMaskedLM` and `AutoTokenizer`; the logits on a padded batch
       of real validation blocks must match this project's model to `PARITY_ATOL` in fp32, and the exported
       tokenizer must give the project's ids on validation text; `fill-mask` answers on a corpus sentence;
    3) only then is it swapped into place (a previous export is replaced in two renames); a failure removes
       the temporary directory and leaves any previous export untouched.

Continued pretraining (`model.init_from: DIR`): `check_init_from` validates the directory against the config
(one error naming every differing key), the tokenizer step copies DIR's tokenizer (data_prep/tokenizer.py), and
`init_from_hf` loads DIR's weights into the freshly built model: the rows of the position table this run's
`seq_len` needs (so an export describes exactly the table it trained), and with `tokenizer.extend_from` the
appended tokens' rows initialised to the mean of their pieces under the old tokenizer.

`transformers` is imported only inside the functions that use it.
"""

from __future__ import annotations

import csv
import importlib.metadata
import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from data_prep.config import ConfigError, ExperimentConfig, config_from_dict
from data_prep.prepare import sha256_file
from data_prep.shards import ShardError, open_split, read_meta, short_phase
from data_prep.tokenizer import FILES, HF_WEIGHTS, load_tokenizer, read_hf_dir, special_ids, tokenizer_dir

from .checkpoint import load_full, resumable_checkpoint
from .data import length_schedule
from .model import RobertaConfig, RobertaForMLM, from_hf_state_dict, to_hf_state_dict
from .module import model_config

PARITY_ATOL = 1e-4  # max |logit difference| allowed in fp32 between this project's model and `transformers`


class ExportError(ValueError):
    """No checkpoint to export, or a tokenizer that is not the checkpoint's: the message names the file."""


class ParityError(ExportError):
    """The exported directory does not reproduce the project's model; nothing was written in its place."""


def export_dir(cfg: ExperimentConfig) -> Path:
    return cfg.run_path / "hf"


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face -> this project (continued pretraining)


def check_init_from(cfg: ExperimentConfig) -> dict[str, Any]:
    """`model.init_from`'s config.json, once it describes the model this config builds; otherwise one ConfigError
    naming the directory and every differing key."""
    path = cfg.model.init_from
    assert path, "check_init_from needs model.init_from"
    hf = read_hf_dir(path)
    m, problems = cfg.model, []
    for ours, theirs in (("hidden_size", "hidden_size"), ("num_layers", "num_hidden_layers"),
                         ("num_heads", "num_attention_heads"), ("intermediate_size", "intermediate_size")):
        if hf.get(theirs) != getattr(m, ours):
            problems.append(f"model.{ours}={getattr(m, ours)} but {theirs}={hf.get(theirs)}")
    # what this project's RoBERTa fixes (model.py); HF's defaults when config.json leaves them out
    fixed = {"hidden_act": "gelu", "type_vocab_size": 1, "position_embedding_type": "absolute", "pad_token_id": 1}
    problems += [f"{k}={hf[k]!r} (this model: {v!r})" for k, v in fixed.items() if k in hf and hf[k] != v]
    if "layer_norm_eps" in hf and not math.isclose(hf["layer_norm_eps"], 1e-5, rel_tol=1e-3):
        problems.append(f"layer_norm_eps={hf['layer_norm_eps']} (this model: 1e-05)")
    positions = hf.get("max_position_embeddings", 514)
    if positions < cfg.data.seq_len + 2:
        problems.append(f"data.seq_len={cfg.data.seq_len} needs {cfg.data.seq_len + 2} positions but "
                        f"max_position_embeddings={positions} (lower data.seq_len to {positions - 2})")
    vocab = load_tokenizer(path).get_vocab_size()
    if hf.get("vocab_size") != vocab:
        problems.append(f"vocab_size={hf.get('vocab_size')} but tokenizer.json has {vocab} tokens")
    if problems:
        raise ConfigError(f"model.init_from={path} does not match the config: {'; '.join(problems)} "
                          "(set the model section to the pretrained model's sizes)")
    return hf


def load_hf_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a Hugging Face directory: model.safetensors, its sharded index, or pytorch_model.bin."""
    from safetensors.torch import load_file

    d = Path(path)
    name = next(w for w in HF_WEIGHTS if (d / w).is_file())
    try:
        if name == "model.safetensors":
            return load_file(d / name)
        if name.endswith(".index.json"):
            shards = sorted(set(json.loads((d / name).read_text())["weight_map"].values()))
            return {k: v for shard in shards for k, v in load_file(d / shard).items()}
        return torch.load(d / name, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors, torch and json raise different types for a damaged file
        raise ConfigError(f"model.init_from={path}: {name} is unreadable ({type(e).__name__}: {e})") from None


def init_from_hf(model: RobertaForMLM, cfg: ExperimentConfig) -> None:
    """Load `model.init_from`'s weights into `model`, built for this run (model_config). The run's tokenizer
    (run_dir/tokenizer) must be init_from's, or its extension: old ids at their places, new ones after."""
    path = Path(cfg.model.init_from)
    check_init_from(cfg)
    try:
        sd = from_hf_state_dict(load_hf_weights(path), cfg.model.num_layers)
    except KeyError as e:
        raise ConfigError(f"model.init_from={path}: not a RobertaForMaskedLM checkpoint: {e.args[0]}") from None

    # 1) positions: the rows this run's seq_len uses; an export then states exactly the table it trained
    sd["embeddings.position.weight"] = sd["embeddings.position.weight"][: model.cfg.max_position_embeddings]

    # 2) vocabulary: old rows keep their ids; each appended token (tokenizer.extend_from) starts as the mean
    #    of the rows of its pieces under the old tokenizer, for the embedding (tied decoder) and the decoder bias
    old, new = load_tokenizer(path), load_tokenizer(tokenizer_dir(cfg))
    moved = [t for t, i in old.get_vocab(with_added_tokens=True).items() if new.token_to_id(t) != i]
    if moved or new.get_vocab_size() != model.cfg.vocab_size:
        raise ConfigError(
            f"{tokenizer_dir(cfg)} is not model.init_from's tokenizer or an extension of it ({len(moved)} of its "
            f"tokens have other ids, e.g. {moved[:3]}): delete {tokenizer_dir(cfg)} and {cfg.run_path / 'data'}, "
            "then run again"
        )
    word, bias = sd["embeddings.word.weight"], sd["lm_head.decoder.bias"]
    n_old = word.shape[0]
    if model.cfg.vocab_size > n_old:
        token_of = {i: t for t, i in new.get_vocab(with_added_tokens=True).items()}
        pieces = [[t.id for t in old.model.tokenize(token_of[i])] for i in range(n_old, model.cfg.vocab_size)]
        assert all(pieces), "a new token with no pieces under the old tokenizer"
        word = torch.cat([word, torch.stack([word[p].mean(0) for p in pieces])])
        bias = torch.cat([bias, torch.stack([bias[p].mean(0) for p in pieces])])
    sd["embeddings.word.weight"] = sd["lm_head.decoder.weight"] = word
    sd["lm_head.decoder.bias"] = bias

    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.startswith("nsp_head.") for k in missing), f"{missing=} {unexpected=}"


# ---------------------------------------------------------------------------------------------------------------
# This project -> Hugging Face


def export(cfg: ExperimentConfig, ckpt: str | Path | None = None, out: str | Path | None = None,
           log=print) -> Path:
    """Export a checkpoint of the run (default: its newest readable one) to `out` (default: run_dir/hf)."""
    if ckpt is None:
        directory = cfg.run_path / "checkpoints"
        found = resumable_checkpoint(directory, log) if directory.is_dir() else None
        if found is None:
            raise ExportError(f"{cfg.run_path / 'checkpoints'} has no readable checkpoint: train first "
                              "(`make pretrain`) or pass CKPT=path/to/file.ckpt")
        ckpt = found[0]
    ckpt = Path(ckpt)
    if not ckpt.exists():
        raise ExportError(f"checkpoint {ckpt} does not exist")
    try:
        state = load_full(ckpt)  # a file, or a sharded (FSDP) directory gathered here
        hp, step = state["hyper_parameters"], int(state["global_step"])
        weights = {k.removeprefix("model.").removeprefix("_orig_mod."): v for k, v in state["state_dict"].items()
                   if k.startswith("model.")}
    except Exception as e:  # a truncated or foreign file: torch raises many types
        raise ExportError(f"checkpoint {ckpt} is unreadable or not this project's "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    run_cfg = config_from_dict(hp["config"])
    return export_weights(weights, run_cfg, hp["meta"], Path(out) if out else export_dir(cfg),
                          tokenizer_dir(cfg), step=step, run_path=cfg.run_path, source=str(ckpt), log=log,
                          rollbacks=(state.get("rollbacks") or {}).get("events", []))


def export_weights(weights: dict[str, torch.Tensor], run_cfg: ExperimentConfig, meta: dict[str, Any], out: Path,
                   tok_dir: Path, *, step: int, run_path: Path, source: str,
                   metrics: dict[str, float] | None = None, meta_path: Path | None = None, log=print,
                   rollbacks: list[dict[str, Any]] | None = None) -> Path:
    """Write, verify and swap in the export of `weights` (this project's names) trained with `run_cfg`;
    `rollbacks`: the run's rollback events (rollback.py), for the model card."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    # 0) the checkpoint's model, and the tokenizer its shards were made with
    mcfg = model_config(run_cfg, meta)
    ours = RobertaForMLM(mcfg)
    ours.load_state_dict({k: v.float() for k, v in weights.items()})
    ours.eval()
    tok_json = tok_dir / "tokenizer.json"
    if not tok_json.is_file() or sha256_file(tok_json) != meta["tokenizer_sha256"]:
        raise ExportError(f"{tok_json} is not the tokenizer this checkpoint was trained with "
                          f"(sha256 {meta['tokenizer_sha256'][:12]}...): pass the --config/--run_dir of that run")
    meta_path = meta_path or find_shards(run_path, meta)

    # 1) write into a temporary directory beside the target
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        ids = meta["special_ids"]
        hf_cfg = transformers.RobertaConfig(**mcfg.hf_config_kwargs(), bos_token_id=ids["bos"],
                                            eos_token_id=ids["eos"])
        hf = transformers.RobertaForMaskedLM(hf_cfg)
        hf.load_state_dict(to_hf_state_dict(ours.state_dict(), mcfg.num_layers), strict=True)
        hf.save_pretrained(tmp)
        for name in FILES:
            shutil.copy2(tok_dir / name, tmp / name)
        tok_config = json.loads((tmp / "tokenizer_config.json").read_text())
        tok_config["model_max_length"] = mcfg.max_seq_len
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")

        # 2) prove it
        check = verify(tmp, ours, load_tokenizer(tok_dir), meta_path)
        if check["max_abs_diff"] > PARITY_ATOL or not check["same_ids"]:
            raise ParityError(
                f"export of {source} failed its parity check (max |logit difference| {check['max_abs_diff']:.3g}, "
                f"allowed {PARITY_ATOL}; tokenizer ids {'equal' if check['same_ids'] else 'DIFFER'}); "
                f"{out} was left as it was"
            )
        metrics = metrics if metrics is not None else validation_metrics(run_path / "logs" / "metrics.csv", step)
        (tmp / "README.md").write_text(model_card(run_cfg, meta, mcfg, step, metrics, check, meta_path, source,
                                                       rollbacks or []))

        # 3) swap it in
        if out.exists():
            old = out.with_name(f".{out.name}.old{os.getpid()}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"export: wrote {out} (step {step}, from {source})\n"
        f"  parity      max |logit difference| {check['max_abs_diff']:.2e} over {check['tokens']} tokens of "
        f"{check['batch']} (fp32, allowed {PARITY_ATOL:g}); tokenizer ids equal on {check['texts']} texts\n"
        f"  fill-mask   {check['fill_mask']['text']!r} -> "
        + ", ".join(f"{p['token']!r} {p['score']:.3f}" for p in check["fill_mask"]["top"]))
    return out


def find_shards(run_path: Path, meta: dict[str, Any]) -> Path | None:
    """The meta.json under run_dir/data made from the same corpus and tokenizer as `meta`, if it is still there."""
    for path in sorted((run_path / "data").glob("*/meta.json")):
        try:
            other = json.loads(path.read_text())
        except ValueError:
            continue
        if all(other.get(k) == meta.get(k) for k in ("tokenizer_sha256", "corpus_fingerprint", "settings")):
            return path
    return None


def parity_batch(meta_path: Path | None, meta: dict[str, Any], max_len: int, n: int = 8
                 ) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(input_ids, attention_mask, what): n validation blocks, every other one cut shorter so the batch pads;
    random ids when the shards are gone."""
    ids = meta["special_ids"]
    blocks: list[np.ndarray] = []
    what = "random ids (no shards found)"
    if meta_path is not None:
        try:
            split = open_split(meta_path, "valid")
            if split.num_blocks == 0:
                split = open_split(meta_path, "train")
            blocks = [np.asarray(split.block(i), np.int64)[:max_len] for i in range(min(n, split.num_blocks))]
            what = f"{len(blocks)} {split.split} blocks of {meta_path.parent.name}"
        except ShardError:
            blocks = []
    if not blocks:
        g = np.random.default_rng(0)
        blocks = [g.integers(4, meta["vocab_size"], max_len) for _ in range(n)]
    for j in range(1, len(blocks), 2):
        cut = max(2, len(blocks[j]) * (j + 1) // (len(blocks) + 1))
        blocks[j] = np.append(blocks[j][: cut - 1], ids["eos"])
    T = max(len(b) for b in blocks)
    input_ids = torch.full((len(blocks), T), ids["pad"], dtype=torch.long)
    for j, b in enumerate(blocks):
        input_ids[j, : len(b)] = torch.from_numpy(b)
    return input_ids, input_ids.ne(ids["pad"]).long(), what


@torch.no_grad()
def verify(directory: Path, ours: RobertaForMLM, tok: Any, meta_path: Path | None) -> dict[str, Any]:
    """Load `directory` as any `transformers` user would, and compare it with the project's model and tokenizer."""
    import transformers

    hf = transformers.AutoModelForMaskedLM.from_pretrained(directory, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(directory)
    meta = {"special_ids": special_ids(tok), "vocab_size": ours.cfg.vocab_size}
    input_ids, mask, what = parity_batch(meta_path, meta, ours.cfg.max_seq_len)

    # 1) logits on the real tokens of a padded batch, fp32
    real = mask.bool()
    diff = (ours(input_ids, mask)[real] - hf(input_ids=input_ids, attention_mask=mask).logits[real]).abs().max()

    # 2) the exported tokenizer gives the project's ids on text decoded from the batch (special tokens as text)
    texts = [tok.decode(row[m].tolist(), skip_special_tokens=True) for row, m in zip(input_ids, real, strict=True)]
    same_ids = all(hf_tok(t)["input_ids"] == tok.encode(t).ids for t in texts)

    # 3) fill-mask on a corpus sentence: in the longest line of the first block, the word nearest the middle
    #    that is all letters, masked
    line = max(texts[0].split("\n"), key=len).split()[:24] or ["The", "model", "works", "."]
    words = [i for i, w in enumerate(line) if w.isalpha()] or [len(line) // 2]
    mid = min(words, key=lambda i: abs(i - len(line) // 2))
    text = " ".join(line[:mid] + [hf_tok.mask_token] + line[mid + 1 :])
    fill = transformers.pipeline("fill-mask", model=hf, tokenizer=hf_tok, device="cpu")
    top = [{"token": p["token_str"], "score": float(p["score"])} for p in fill(text, top_k=5)]
    return {"max_abs_diff": float(diff), "tokens": int(real.sum()), "batch": what, "same_ids": same_ids,
            "texts": len(texts), "fill_mask": {"text": text, "answer": line[mid], "top": top}}


def validation_metrics(metrics_csv: Path, step: int) -> dict[str, float]:
    """The last validation loss and perplexity logged at or before `step` (run_dir/logs/metrics.csv)."""
    best: tuple[int, dict[str, float]] | None = None
    if metrics_csv.is_file():
        with open(metrics_csv, newline="") as f:
            for row in csv.DictReader(f):
                if row.get("val/loss") and row.get("step") and int(row["step"]) <= step:
                    if best is None or int(row["step"]) >= best[0]:
                        best = (int(row["step"]), {k: float(row[k]) for k in ("val/loss", "val/ppl") if row.get(k)})
    return best[1] | {"step": best[0]} if best else {}


def _blocks(meta: dict[str, Any], split: str) -> tuple[int, int]:
    rec = meta["splits"].get(split, {})
    parts = rec.get("parts", [rec])
    return sum(p.get("num_blocks", 0) for p in parts), sum(p.get("num_tokens", 0) for p in parts)


def tokens_seen(c: ExperimentConfig, meta: dict[str, Any], meta_path: Path | None,
                step: int) -> tuple[int, float, int]:
    """(sequences, tokens about, tokens at most) of `step` steps, phase by phase of the length schedule: each
    phase's sequences times the mean block length of its shards (its block length when they cannot be read).
    With batch.by_tokens a step has global_size / micro_size micro-batches of the size epoch 0's have on average."""
    if c.batch.by_tokens and meta_path is not None:
        from .data import epoch_permutation, token_bins

        try:
            lengths = open_split(meta_path, "train").block_lengths()
        except (ShardError, OSError, KeyError, ValueError):
            lengths = None
        if lengths is not None and len(lengths):
            budget = c.batch.micro_size * c.data.seq_len
            bins = len(token_bins(lengths[epoch_permutation(c.seed, 0, len(lengths))], budget)) - 1
            micro_batches = step * c.batch.global_size // c.batch.micro_size
            return (round(micro_batches * len(lengths) / bins), micro_batches * float(lengths.sum()) / bins,
                    micro_batches * budget)
    schedule = length_schedule(c)
    ends = [first for first, _ in schedule[1:]] + [max(step, c.trainer.max_steps)]
    short = None
    if len(schedule) > 1 and meta_path is not None:
        try:
            found = short_phase(meta_path)
            short = read_meta(found[1]) if found else None
        except (ShardError, OSError, KeyError, ValueError):
            short = None
    sequences, seen, most = 0, 0.0, 0
    for p, ((first, length), end) in enumerate(zip(schedule, ends, strict=True)):
        n = (min(step, end) - min(step, first)) * c.batch.global_size
        phase_meta = meta if p == len(schedule) - 1 else short
        blocks, tokens = _blocks(phase_meta, "train") if phase_meta else (0, 0)
        sequences, most = sequences + n, most + n * length
        seen += n * (tokens / blocks if blocks else length)
    return sequences, seen, most


def model_card(run_cfg: ExperimentConfig, meta: dict[str, Any], mcfg: RobertaConfig, step: int,
               metrics: dict[str, float], check: dict[str, Any], meta_path: Path | None, source: str,
               rollbacks: list[dict[str, Any]] = ()) -> str:
    c = run_cfg
    rolled = (f"{len(rollbacks)} (a non-finite or spiking loss restored the last checkpoint and skipped the data of "
              "steps " + ", ".join(f"{e['skipped_data_steps'][0]}-{e['skipped_data_steps'][1]} "
                                            f"(loss {e['loss']:.4g} at step {e['step']})" for e in rollbacks) + ")"
              if rollbacks else "none")
    blocks, tokens = _blocks(meta, "train")
    sequences, seen, most = tokens_seen(c, meta, meta_path, step)
    avg = seen / sequences if sequences else c.data.seq_len
    loss = metrics.get("val/loss")
    val = (f"{loss:.4f} nats ({loss / math.log(2):.4f} bits), perplexity {math.exp(loss):.2f}"
           + (f" (at step {metrics['step']})" if "step" in metrics else "")) if loss is not None else (
        f"not measured (no validation by step {step}; trainer.val_check_interval={c.trainer.val_check_interval})")
    params = sum(p.numel() for n, p in RobertaForMLM(mcfg).named_parameters() if not n.startswith("nsp_head."))
    try:
        version = importlib.metadata.version("roberta-pretrain")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    import transformers

    m = c.masking
    origin = (f"continued from `{c.model.init_from}`" + (f", vocabulary extended from `{c.tokenizer.extend_from}`"
                                                        if c.tokenizer.extend_from else "")
              if c.model.init_from else "trained from scratch")
    top = ", ".join(f"`{p['token']!r}` {p['score']:.3f}" for p in check["fill_mask"]["top"])
    return f"""---
library_name: transformers
pipeline_tag: fill-mask
tags: [roberta, fill-mask, masked-lm]
---

# {Path(c.run_dir).name}

A RoBERTa masked-language model ({mcfg.num_layers} layers, hidden {mcfg.hidden_size}, {mcfg.num_heads} heads,
FFN {mcfg.intermediate_size}, {params / 1e6:.2f}M parameters, vocabulary {mcfg.vocab_size}, up to {mcfg.max_seq_len}
tokens), {origin}, exported by roberta-pretrain {version} from `{source}` (transformers {transformers.__version__}).

```python
from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline

model = AutoModelForMaskedLM.from_pretrained("path/to/this/directory")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/directory")
print(pipeline("fill-mask", model=model, tokenizer=tokenizer)({check['fill_mask']['text']!r}))
```

## Training data

- corpus: train {c.corpus.train}, valid {c.corpus.valid or f'a seeded {c.corpus.valid_fraction:.1%} document split of train'}
- corpus fingerprint: `{meta.get('corpus_fingerprint')}`
- shards: `{meta_path.parent.name if meta_path else 'run_dir/data/<hash> (not found at export time)'}` ({blocks:,} train blocks, {tokens:,} tokens)
- tokenizer: byte-level BPE, {mcfg.vocab_size} tokens, sha256 of tokenizer.json `{meta['tokenizer_sha256']}`
- packing: {meta['packing']}, {meta['seq_len']} tokens per block

## Recipe

- masking: {m.probability:.0%} of non-special tokens; of those {m.mask_fraction:.0%} `<mask>`, {m.random_fraction:.0%} random,
  {1 - m.mask_fraction - m.random_fraction:.0%} unchanged; {'dynamic (a new mask every epoch)' if m.dynamic else f'static ({m.static_copies} copies)'}
- optimiser: AdamW, betas {tuple(c.optim.betas)}, eps {c.optim.eps:g}, weight decay {c.optim.weight_decay:g} (not on biases and LayerNorm),
  gradient clipping {c.optim.grad_clip or 'off'}
- schedule: linear warmup over {c.optim.warmup_steps:,} steps to {c.optim.peak_lr:g}, linear decay to 0 at {c.trainer.max_steps:,} steps
- batch: {c.batch.global_size:,} sequences per step (micro-batch {c.batch.micro_size}), precision {c.trainer.precision}, seed {c.seed}
- rollbacks: {rolled}
- steps: {step:,}; sequences seen {sequences:,}; tokens seen about {round(seen):,} ({avg:.1f} tokens per block
  on average; at most {most:,})

## Evaluation

- validation MLM loss: {val}
- parity: max |logit difference| {check['max_abs_diff']:.2e} between this directory in `transformers` and the
  training code, over {check['tokens']} tokens of {check['batch']} (fp32); tokenizer ids equal
- fill-mask: "{check['fill_mask']['text']}" (answer `{check['fill_mask']['answer']}`): {top}
"""


class HFExportCallback(pl.Callback):
    """`checkpoint.export_hf`: each time a checkpoint is saved, export the same weights into run_dir/hf (rank 0
    only, with the parity check). A failed export warns, keeps the previous one and lets training go on."""

    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg
        self._exported_step = -1

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        step = trainer.global_step
        if not trainer.is_global_zero or step == self._exported_step:  # last.ckpt and step-N share a step
            return
        self._exported_step = step
        model = getattr(pl_module.model, "_orig_mod", pl_module.model)  # torch.compile's wrapper
        weights = {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in model.state_dict().items()}
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k in ("val/loss", "val/ppl")}
        dm = trainer.datamodule
        try:
            export_weights(weights, self.cfg, pl_module.meta, export_dir(self.cfg), tokenizer_dir(self.cfg),
                           step=step, run_path=self.cfg.run_path, source=f"training step {step}", metrics=metrics,
                           meta_path=getattr(dm, "meta_path", None),
                           rollbacks=getattr(pl_module, "rollbacks", None) and pl_module.rollbacks.events)
        except Exception as e:  # noqa: BLE001 - an export must never end a long run; the message says why
            print(f"warning: Hugging Face export at step {step} failed ({type(e).__name__}: {e}); "
                  f"{export_dir(self.cfg)} keeps the previous export", file=sys.stderr)
