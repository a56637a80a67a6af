"""Checkpoint averaging: the elementwise mean of the model weights of N checkpoints of one run.

A mean of checkpoints from the end of a run (the decay of a wsd or linear schedule) lands nearer the centre of
the basin the last steps circle than any one of them (Izmailov et al. 2018, "Averaging Weights Leads to Wider
Optima"; Sanyal et al. 2023, LAWA); ModernBERT-base ships the mean of its three best annealing checkpoints and
the final one. `make average CKPTS="a b c"` (`python -m pretrain average`), or `checkpoint.average_last: N` at
`make export`, exports the mean like any checkpoint: the same parity check (export.py), and the model card names
every checkpoint averaged.

The mean is taken in float64 (a running sum, divided by N once) and rounded once to each tensor's own dtype: a sum
of up to 2**29 fp32 (or bf16) values is exact in float64, so the mean of N copies of one checkpoint is that
checkpoint exactly, for any N (an fp32 sum of three copies already rounds), and the mean of two is the exact
(a + b) / 2 rounded once. Only checkpoints of one run are
averaged: the same run_dir, architecture and tokenizer. The mean of two runs' weights is not a model (their
hidden units are not aligned), and a checkpoint of another architecture or tokenizer would not even load; either
is refused with one line naming the checkpoint and the key, before any weights are read.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from data_prep.config import config_from_dict

from ..training.checkpoint import load_full, probe, read_record
from .convert import model_config


class AverageError(ValueError):
    """Checkpoints that cannot be averaged (missing, unreadable, of different runs): one line naming the file."""


@dataclass
class Averaged:
    """The mean's weights (this project's names) and what the export and its card need to know about it."""

    weights: dict[str, torch.Tensor]
    hyper_parameters: dict[str, Any]
    """The newest member's: its config and shards' meta."""
    step: int
    """The newest member's step (the tokens seen, on the card, are that step's)."""
    members: list[tuple[str, int]]
    """(path, step) of each checkpoint averaged, in the order given."""
    rollbacks: list[dict[str, Any]]

    @property
    def source(self) -> str:
        return f"the mean of {len(self.members)} checkpoints (steps {', '.join(str(s) for _, s in self.members)})"


def identity(path: Path) -> dict[str, Any]:
    """What must agree for two checkpoints to be averaged: run_dir, the architecture, the tokenizer."""
    hp = read_record(path, "hyper_parameters")
    run_cfg, meta = config_from_dict(hp["config"]), hp["meta"]
    arch = dataclasses.asdict(model_config(run_cfg, meta))
    # dropout is training, not architecture: the weights mean the same with any rate
    keys = {f"model.{k}": v for k, v in arch.items() if k not in ("dropout", "attention_dropout")}
    return {"run_dir": hp["config"].get("run_dir"), **keys, "tokenizer_sha256": meta.get("tokenizer_sha256")}


def check_members(paths: list[Path]) -> list[int]:
    """The step of each checkpoint, once every one reads back and all are of one run; else AverageError."""
    if len(paths) < 2:
        raise AverageError(f"averaging needs at least two checkpoints (got {len(paths)}): "
                           "CKPTS=\"a.ckpt b.ckpt ...\" or checkpoint.average_last >= 2")
    steps, first = [], None
    for path in paths:
        if not path.exists():
            raise AverageError(f"checkpoint {path} does not exist")
        step, problem = probe(path)
        if problem is not None:
            raise AverageError(f"checkpoint {path} is unreadable or not this project's ({problem})")
        ident = identity(path)
        if first is None:
            first = (path, ident)
        for key, value in ident.items():
            if value != first[1].get(key):
                raise AverageError(f"{path} differs from {first[0]} in {key} ({value!r} vs {first[1].get(key)!r}): "
                                   "average checkpoints of one run (same run_dir, architecture and tokenizer)")
        steps.append(step)
    return steps


def average(paths: list[str | Path], log=print) -> Averaged:
    """The elementwise mean of the model weights of `paths` (files or sharded directories), checked first."""
    paths = [Path(p) for p in paths]
    steps = check_members(paths)
    twice = {s for s in steps if steps.count(s) > 1}
    if twice:
        log(f"average: warning: step(s) {sorted(twice)} appear more than once (e.g. last.ckpt beside its step "
            "checkpoint): that state weighs more in the mean")
    total: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    newest: dict[str, Any] = {}
    for path, step in zip(paths, steps, strict=True):
        state = load_full(path)
        weights = {k.removeprefix("model.").removeprefix("_orig_mod."): v for k, v in state["state_dict"].items()
                   if k.startswith("model.")}
        if total and weights.keys() != total.keys():
            raise AverageError(f"{path} holds other tensors than {paths[0]} "
                               f"({sorted(weights.keys() ^ total.keys())[:3]}): not checkpoints of one model")
        for name, w in weights.items():
            if not w.is_floating_point():  # an integer buffer is not averaged: every member must agree
                if name in total and not torch.equal(total[name], w):
                    raise AverageError(f"{path} differs from {paths[0]} in the buffer {name}")
                total[name], dtypes[name] = w, w.dtype
                continue
            if name in total:
                total[name] += w.double()
            else:
                total[name], dtypes[name] = w.double(), w.dtype
        if not newest or step >= newest["global_step"]:
            newest = {"global_step": step, "hyper_parameters": state["hyper_parameters"],
                      "rollbacks": (state.get("rollbacks") or {}).get("events", [])}
        del state, weights
    n = len(paths)
    mean = {k: (v / n).to(dtypes[k]) if v.is_floating_point() else v for k, v in total.items()}
    return Averaged(mean, newest["hyper_parameters"], newest["global_step"],
                    [(str(p), s) for p, s in zip(paths, steps, strict=True)], newest["rollbacks"])


def last_checkpoints(directory: Path, n: int, upto: Path | None = None, log=print) -> list[Path]:
    """The `n` newest checkpoints of distinct steps in `directory` (`checkpoint.average_last`), oldest first,
    ending at `upto` when given: the step checkpoints (`step-*.ckpt`, files or sharded directories) and
    last.ckpt, one per step (the step checkpoint, or `upto` itself). Unreadable ones are reported and passed over."""
    by_step: dict[int, Path] = {}
    end = None
    if upto is not None:
        end, problem = probe(upto)
        if problem is not None:
            raise AverageError(f"checkpoint {upto} is unreadable or not this project's ({problem})")
        by_step[end] = upto
    for path in sorted(directory.glob("step-*.ckpt")) + [directory / "last.ckpt"]:
        if not path.exists():
            continue
        step, problem = probe(path)
        if problem is not None:
            log(f"warning: checkpoint {path} is unreadable ({problem}); not averaged")
            continue
        if (end is None or step <= end) and step not in by_step:
            by_step[step] = path
    chosen = [by_step[s] for s in sorted(by_step)[-n:]]
    if len(chosen) < n:
        raise AverageError(f"checkpoint.average_last={n} but {directory} holds {len(chosen)} checkpoint(s) of "
                           f"distinct steps{f' up to step {end}' if end is not None else ''}: lower it, or keep "
                           "more while training (checkpoint.keep_last)")
    return chosen
