"""Checkpoint -> Hugging Face `RobertaForMaskedLM` directory, with proven parity.

Export (`make export`, `python -m pretrain export`) writes what `transformers` loads offline with no custom code:
`config.json`, `model.safetensors`, the run's tokenizer files and a `README.md` model card with the provenance.
The parameters go through the one name map, `model.HF_NAME_MAP` (`hf.to_hf`). The export is proven before it
is kept:
    1) the weights, config, tokenizer and card are written into a temporary directory beside the target;
    2) that directory is loaded with `AutoModelForMaskedLM` and `AutoTokenizer`; the logits on a padded batch
       of real validation blocks must match this project's model to `PARITY_ATOL` in fp32, and the exported
       tokenizer must give the project's ids on validation text; `fill-mask` answers on a corpus sentence;
    3) only then is it swapped into place (a previous export is replaced in two renames); a failure removes
       the temporary directory and leaves any previous export untouched.
An export directory carries the marker `.roberta-pretrain` (outputs.py): the target is replaced only when it is an
export (marked, or holding exactly an older export's files), empty or missing; anything else, or a symbolic link,
is refused with one line before the checkpoint is read (`make export OUT=~` deletes nothing).

The conversion itself, in both directions, is `convert.py`; the model card is `card.py`.

`transformers` is imported only inside the functions that use it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from data_prep.config import ExperimentConfig, config_from_dict
from data_prep.prepare import sha256_file
from data_prep.shards import ShardError, open_split
from data_prep.tokenizer import FILES, load_tokenizer, special_ids, tokenizer_dir

from ..model.encoder import RobertaForMLM
from ..training.checkpoint import load_full, resumable_checkpoint
from ..training.sharding import full_state_dict
from .average import average as average_checkpoints
from .average import last_checkpoints
from .card import model_card, validation_metrics
from .card import tokens_seen as tokens_seen  # re-exported: it used to live here
from .convert import model_config, to_hf
from .outputs import OutputDirError, Writer, check_replaceable, mark, remove, replace

PARITY_ATOL = 1e-4  # max |logit difference| allowed in fp32 between this project's model and `transformers`


class ExportError(ValueError):
    """No checkpoint to export, a tokenizer that is not the checkpoint's, or a target directory that is not an
    export: the message names the file."""


class ParityError(ExportError):
    """The exported directory does not reproduce the project's model; nothing was written in its place."""


EXPORT = Writer("an export", "choose another --out",
                files=frozenset({"config.json", "model.safetensors", "README.md", *FILES}),
                required=frozenset({"config.json", "model.safetensors"}))
"""An export directory; one written before markers holds exactly these files."""


def export_dir(cfg: ExperimentConfig) -> Path:
    return cfg.run_path / "hf"


def check_target(out: Path) -> Path:
    """`out` as an absolute path (symbolic links kept, `..` folded) that export may replace; ExportError if not."""
    out = Path(os.path.abspath(Path(out).expanduser()))
    if not out.name:  # the file system's root
        raise ExportError(f"{out} cannot be an export directory: choose another --out")
    try:
        check_replaceable(out, EXPORT)
    except OutputDirError as e:
        raise ExportError(str(e)) from None
    return out


# ---------------------------------------------------------------------------------------------------------------
# This project -> Hugging Face


def export(cfg: ExperimentConfig, ckpt: str | Path | None = None, out: str | Path | None = None,
           log=print, average: list[str | Path] | None = None) -> Path:
    """Export a checkpoint of the run (default: its newest readable one) to `out` (default: run_dir/hf); with
    `average` (`make average`), or `checkpoint.average_last` >= 2, the mean of those checkpoints (average.py)."""
    out = check_target(Path(out) if out else export_dir(cfg))  # before any work
    if average is None and cfg.checkpoint.average_last > 1:  # the last N, ending at ckpt when given
        average = last_checkpoints(Path(ckpt).parent if ckpt else cfg.run_path / "checkpoints",
                                   cfg.checkpoint.average_last, Path(ckpt) if ckpt else None, log)
    if average is not None:
        mean = average_checkpoints(average, log)
        run_cfg = dataclasses.replace(config_from_dict(mean.hyper_parameters["config"]), card=cfg.card)
        return export_weights(mean.weights, run_cfg, mean.hyper_parameters["meta"], out, tokenizer_dir(cfg),
                              step=mean.step, run_path=cfg.run_path, source=mean.source, log=log, metrics={},
                              rollbacks=mean.rollbacks, averaged=mean.members)
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
    # the checkpoint's experiment, with this config's card metadata (stated at export time too)
    run_cfg = dataclasses.replace(config_from_dict(hp["config"]), card=cfg.card)
    return export_weights(weights, run_cfg, hp["meta"], out, tokenizer_dir(cfg), step=step, run_path=cfg.run_path, source=str(ckpt), log=log,
                          rollbacks=(state.get("rollbacks") or {}).get("events", []))


def export_weights(weights: dict[str, torch.Tensor], run_cfg: ExperimentConfig, meta: dict[str, Any], out: Path,
                   tok_dir: Path, *, step: int, run_path: Path, source: str,
                   metrics: dict[str, float] | None = None, meta_path: Path | None = None, log=print,
                   rollbacks: list[dict[str, Any]] | None = None,
                   averaged: list[tuple[str, int]] | None = None) -> Path:
    """Write, verify and swap in the export of `weights` (this project's names) trained with `run_cfg`;
    `rollbacks`: the run's rollback events (training/rollback.py), `averaged`: (path, step) of the checkpoints
    whose mean `weights` is (average.py), for the model card."""
    import transformers

    out = check_target(out)
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
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        remove(tmp, EXPORT)  # a leftover of an earlier process with this id, checked like any export
    except OutputDirError as e:
        raise ExportError(str(e)) from None
    tmp.mkdir()
    try:
        mark(tmp, f"a Hugging Face export of {source}")
        to_hf(ours, meta["special_ids"]).save_pretrained(tmp)
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
        model_card(run_cfg, meta, mcfg, step, metrics, check, meta_path, source, rollbacks or [],
                   averaged).save(tmp / "README.md")

        # 3) swap it in (the target checked again: it is replaced only if it is still an export)
        try:
            replace(tmp, out, EXPORT)
        except OutputDirError as e:
            raise ExportError(str(e)) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # created above by this call (gone when swapped in)
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


class HFExportCallback(pl.Callback):
    """`checkpoint.export_hf`: each time a checkpoint is saved, export the same weights into run_dir/hf (rank 0
    only, with the parity check). A failed export warns, keeps the previous one and lets training go on."""

    def __init__(self, cfg: ExperimentConfig):
        check_target(export_dir(cfg))  # a run_dir/hf that is not an export: one line before training starts
        self.cfg = cfg
        self._exported_step = -1

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        step = trainer.global_step
        if step == self._exported_step:  # last.ckpt and step-N share a step
            return
        self._exported_step = step
        model = getattr(pl_module.model, "_orig_mod", pl_module.model)  # torch.compile's wrapper
        state = full_state_dict(model)  # sharded (FSDP2): gathered by every rank together, onto rank 0
        if not trainer.is_global_zero:
            return
        weights = {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in state.items()}
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
