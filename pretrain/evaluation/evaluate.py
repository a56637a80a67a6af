"""`make evaluate`: which checkpoint to ship, in minutes. Every checkpoint or export named is scored on one fixed
sample of held-out blocks: the same blocks, the same masks, the same probe tasks.

- fixed-mask MLM loss (`Yardstick.score`): the blocks masked once with `eval.heldout_seed` (RoBERTa's 15%,
  80/10/10; each block's mask a function of its index, so it does not depend on the sample size), nats per
  masked token;
- pseudo-perplexity (pppl.py, Salazar et al. 2020) on the first `eval.pppl_blocks` of the same sample: every real
  token masked in turn; it depends on no masking seed or rate;
- the linear probes of `eval.tasks` (probe.py), when set;
- tokens seen by each checkpoint (hf/card.py's `tokens_seen`, from the checkpoint's own config and shards; an
  export states them in its model card).

The sample: `eval.heldout_blocks` blocks of the config's validation split, drawn by `eval.heldout_seed` (not the
first ones, which would be the first few documents only). The inputs: `.ckpt` files, sharded (FSDP) checkpoint
directories, exported Hugging Face directories, or a directory of them (its `last.ckpt` dropped where a step
checkpoint holds the same step). Each is read once before any scoring: a missing file, a model that is not this
project's RoBERTa, or one of another tokenizer than the held-out blocks is one line before work.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_prep.config import ExperimentConfig, config_from_dict
from data_prep.prepare import sha256_file
from data_prep.shards import open_split, read_meta

from ..hf.card import tokens_seen
from ..hf.convert import from_hf_state_dict, model_config
from ..model.config import RobertaConfig
from ..model.encoder import RobertaForMLM
from ..training.batching import MaskingCollator
from ..training.checkpoint import load_full, probe, read_record
from .pppl import pseudo_perplexity
from .yardstick import Yardstick, YardstickError, check_compatible


class EvaluateError(ValueError):
    """A checkpoint that cannot be evaluated: one line naming it and why."""


@dataclass
class Candidate:
    """One checkpoint or export to score, as read before any work (its weights are loaded by `model`)."""

    path: Path
    kind: str
    """checkpoint, sharded checkpoint or export."""
    step: int | None
    tokens: float | None
    """Tokens seen in training (about: mean block lengths), None when unknown (an export without this project's
    card)."""
    meta: dict[str, Any]
    """What check_compatible reads: tokenizer_sha256 and seq_len (the positions the model has)."""

    @property
    def name(self) -> str:
        return self.path.name if self.path.name != "hf" else str(self.path)

    def model(self) -> RobertaForMLM:
        """The model in fp32, eval mode."""
        try:
            if self.kind == "export":
                cfg, weights = _export_model(self.path)
            else:
                state = load_full(self.path)
                hp = state["hyper_parameters"]
                cfg = model_config(config_from_dict(hp["config"]), hp["meta"])
                weights = {k.removeprefix("model.").removeprefix("_orig_mod."): v for k, v in
                           state["state_dict"].items() if k.startswith("model.")}
            model = RobertaForMLM(cfg)
            missing, unexpected = model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=False)
            if unexpected or any(not k.startswith("nsp_head.") for k in missing):
                raise KeyError(f"missing {missing[:3]}, unexpected {unexpected[:3]}")
        except EvaluateError:
            raise
        except Exception as e:  # a truncated or foreign file: torch and safetensors raise many types
            raise EvaluateError(f"{self.path} is unreadable or not this project's RoBERTa "
                                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        return model.eval()


_CARD_TOKENS = re.compile(r"steps: ([\d,]+); sequences seen [\d,]+; tokens seen about ([\d,]+)")


def _export_config(d: Path) -> RobertaConfig:
    hf = json.loads((d / "config.json").read_text())
    if hf.get("model_type") != "roberta":
        raise EvaluateError(f"{d}: model_type {hf.get('model_type')!r} is another architecture than this "
                            "project's RoBERTa (model_type roberta)")
    return RobertaConfig.from_hf_config(hf, dropout=0.0, attention_dropout=0.0)


def _export_model(d: Path) -> tuple[RobertaConfig, dict[str, torch.Tensor]]:
    from ..hf.convert import load_hf_weights

    cfg = _export_config(d)
    return cfg, from_hf_state_dict(load_hf_weights(d), cfg.num_layers)


def candidate(path: str | Path) -> Candidate:
    """`path` read without its weights: what it is, its step, tokens seen and tokenizer; EvaluateError if it is
    none of the inputs `evaluate` takes."""
    path = Path(path)
    if not path.exists():
        raise EvaluateError(f"{path} does not exist: name .ckpt files, sharded checkpoint directories or exported "
                            "Hugging Face directories (CKPTS=\"a b c\"), or a directory of them")
    if path.is_dir() and (path / "config.json").is_file():
        try:
            cfg = _export_config(path)
            sha = sha256_file(path / "tokenizer.json")
        except (OSError, ValueError, KeyError) as e:
            if isinstance(e, EvaluateError):
                raise
            raise EvaluateError(f"{path} is not a Hugging Face RoBERTa export ({type(e).__name__}: {e})") from None
        card = (path / "README.md").read_text(errors="replace") if (path / "README.md").is_file() else ""
        m = _CARD_TOKENS.search(card)
        step, tokens = (int(m[1].replace(",", "")), float(m[2].replace(",", ""))) if m else (None, None)
        return Candidate(path, "export", step, tokens, {"tokenizer_sha256": sha, "seq_len": cfg.max_seq_len})
    step, problem = probe(path)
    if problem is not None:
        raise EvaluateError(f"{path} is not a checkpoint of this project ({problem})")
    hp = read_record(path, "hyper_parameters")
    run_cfg, meta = config_from_dict(hp["config"]), hp["meta"]
    from ..hf.export import find_shards

    seen = tokens_seen(run_cfg, meta, find_shards(run_cfg.run_path, meta), step)[1]
    return Candidate(path, "sharded checkpoint" if path.is_dir() else "checkpoint", step, seen,
                     {"tokenizer_sha256": meta["tokenizer_sha256"], "seq_len": model_config(run_cfg, meta).max_seq_len})


def candidates(paths: list[str | Path]) -> list[Candidate]:
    """Each path read (`candidate`); a directory that is neither a checkpoint nor an export stands for its
    checkpoints (`*.ckpt`) and exports by step, without a `last.ckpt` whose step a step checkpoint holds."""
    found: list[Candidate] = []
    for p in map(Path, paths):
        if p.is_dir() and not (p / "config.json").is_file() and probe(p)[1] is not None:
            inside = [candidate(q) for q in sorted(p.iterdir()) if not q.name.startswith(".")
                      and (q.suffix == ".ckpt" or (q.is_dir() and (q / "config.json").is_file()))]
            if not inside:
                raise EvaluateError(f"{p} holds no checkpoints (*.ckpt) or exports (directories with config.json)")
            steps = {c.step for c in inside if c.path.name != "last.ckpt"}
            inside = [c for c in inside if c.path.name != "last.ckpt" or c.step not in steps]
            found += sorted(inside, key=lambda c: (c.step is None, c.step or 0, c.path.name))
        else:
            found.append(candidate(p))
    return found


def heldout_sample(meta_path: Path, blocks: int, seed: int) -> tuple[str, np.ndarray]:
    """(split, block indices in the order drawn): `blocks` of the validation split (train if it has none),
    a seeded permutation's first, so a smaller sample is a prefix of a larger one."""
    shards = open_split(meta_path, "valid")
    if shards.num_blocks == 0:
        shards = open_split(meta_path, "train")
    n = shards.num_blocks
    return shards.split, np.random.default_rng(seed).permutation(n)[: min(blocks, n)]


@dataclass
class HeldOut:
    """The fixed sample every candidate is scored on: its blocks, their masks, the PPPL subset."""

    meta_path: Path
    blocks: int = 256
    pppl_blocks: int = 16
    seed: int = 12345
    micro_size: int = 32

    def __post_init__(self) -> None:
        self.meta = read_meta(self.meta_path)
        self.split, order = heldout_sample(self.meta_path, self.blocks, self.seed)
        shards = open_split(self.meta_path, self.split)
        ids = self.meta["special_ids"]
        self.special_ids = tuple(sorted(set(ids.values())))
        self.mask_id = ids["mask"]
        collator = MaskingCollator(mask_token_id=ids["mask"], pad_token_id=ids["pad"], special_ids=self.special_ids,
                                   vocab_size=self.meta["vocab_size"], seed=self.seed)  # epoch 0: one pattern
        mlm = sorted(int(i) for i in order)
        self.mlm_blocks = len(mlm)
        items = [{"input_ids": shards.block(i), "index": i, "epoch": 0} for i in mlm]
        self.batches = [collator(items[i:i + self.micro_size]) for i in range(0, len(items), self.micro_size)]
        self.pppl = [np.asarray(shards.block(int(i)), np.int64) for i in sorted(order[: self.pppl_blocks])]

    def check(self, c: Candidate) -> None:
        try:
            check_compatible(self.meta, c.meta, str(c.path))
        except YardstickError as e:
            raise EvaluateError(f"{e}: evaluate checkpoints of the run of --config (or pass that run's --config)"
                                ) from None

    def score(self, model: RobertaForMLM) -> dict[str, float]:
        mlm = Yardstick(self.meta_path).score(model, self.batches)
        row = {"mlm_loss": mlm["loss"], "mlm_accuracy": mlm["accuracy"], "masked_tokens": mlm["tokens"]}
        if self.pppl_blocks:
            p = pseudo_perplexity(model, self.pppl, self.special_ids, self.mask_id, rows=self.micro_size * 2)
            row |= {"pppl": p["pppl"], "pppl_tokens": p["tokens"]}
        return row


def _probes(cfg: ExperimentConfig, held: HeldOut) -> Callable[[RobertaForMLM], dict[str, float]] | None:
    """The linear probes of eval.tasks (probe.py), their texts read and tokenized once; None without tasks."""
    if not cfg.eval.tasks:
        return None
    from data_prep.tokenizer import tokenizer_dir

    from .probe import load_probe_tasks, probe

    e = cfg.eval
    # the run's tokenizer: the held-out blocks' (training_data found or made them with it)
    tasks = load_probe_tasks(e, tokenizer_dir(cfg), held.meta["seq_len"])
    pad = held.meta["special_ids"]["pad"]
    return lambda model: probe(model, tasks, e.pooling, e.l2, e.max_iter, pad_id=pad)


def evaluate(cfg: ExperimentConfig, paths: list[str | Path] | None = None, out: str | Path | None = None,
             log=print) -> dict[str, Any]:
    """Score `paths` (default: the run's checkpoints directory) on the config's held-out sample and probe tasks;
    write the report under `out` (default: run_dir/evaluate). Returns {rows, paths (of the report's files)}."""
    from ..training.train import training_data
    from .evaluate_report import table, write_report

    e = cfg.eval
    # 1) every input read, the blocks and the tasks ready, every input checked against them: before any scoring
    found = candidates(paths or [cfg.run_path / "checkpoints"])
    held = HeldOut(training_data(cfg, log), e.heldout_blocks, e.pppl_blocks, e.heldout_seed)
    for c in found:
        held.check(c)
    probes = _probes(cfg, held)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    # 2) each candidate in turn: fixed-mask loss, pseudo-perplexity, probes
    rows = []
    for c in found:
        start = time.perf_counter()
        model = c.model().to(device)
        row = {"name": c.name, "path": str(c.path), "kind": c.kind, "step": c.step, "tokens_seen": c.tokens}
        row |= held.score(model)
        row |= probes(model) if probes else {}
        rows.append(row)
        log(f"evaluate: {c.name}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items() if isinstance(v, float)
                                                  and k != "tokens_seen") + f" ({time.perf_counter() - start:.1f} s)")
        del model

    # 3) the report
    target = Path(out) if out else cfg.run_path / "evaluate"
    what = (f"{held.mlm_blocks} {held.split} blocks of `{held.meta_path.parent.name}` drawn with eval.heldout_seed="
            f"{held.seed}: the fixed-mask loss over their masked tokens (the same masks for every checkpoint), the "
            f"pseudo-perplexity over the first {len(held.pppl)} of them, every real token masked in turn.")
    written = write_report(rows, target, {"what": what, "meta": str(held.meta_path), "seed": held.seed})
    log("\n" + table(rows) + "\n" + "\n".join(f"  {k:<6} {v}" for k, v in written.items()))
    return {"rows": rows, "paths": written}
