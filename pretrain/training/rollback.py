"""Divergence: detect a non-finite or spiking loss on the device, and roll the run back past its data.

Detection costs no host sync inside a step: `DivergenceMonitor.update` compares each step's token-weighted loss
(the same on every rank, module_step.py) with the mean of the last `optim.spike_window` good steps on the device and
remembers the first bad step. `RollbackGuard` reads that flag (one host sync) every `trainer.log_every_n_steps`
and always before a checkpoint is written, so no checkpoint ever holds weights from after a bad step; every rank
reads the same flag at the same step, so all of them raise `Diverged` together.

`train.fit` catches `Diverged`, restores the newest checkpoint that this run wrote (else the one it started from,
else the initial weights; never an older run's) and removes the data of the steps from the first bad one to the
one where it was seen from the stream: data is a function of the step (steps.py), so the skip is exact, and it
is recorded in `RollbackState`, which every later checkpoint carries. The learning rate can be lowered per
rollback (`optim.rollback_lr_factor`); after `optim.max_rollbacks` rollbacks the run stops.

Lightning's `SpikeDetection` callback was not used: it checks every micro-batch with a barrier and host syncs,
counts micro-batches rather than optimizer steps, and only writes the batches to skip to a file, leaving the
restart to the user.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytorch_lightning as pl
import torch

from .steps import data_step


class Diverged(FloatingPointError):
    """Raised out of `trainer.fit` on every rank when a bad step is seen; `train.fit` rolls back. Carries the
    run's rollback record as the module held it, so the rollback needs no checkpoint read."""

    def __init__(self, first_bad_step: int, detected_step: int, loss: float, rollbacks: RollbackState | None = None):
        super().__init__(f"loss {loss:.4g} at step {first_bad_step} (seen at step {detected_step})")
        self.first_bad_step, self.detected_step, self.loss = first_bad_step, detected_step, loss
        self.rollbacks = rollbacks if rollbacks is not None else RollbackState()


class TrainingDiverged(FloatingPointError):
    """The loss diverged again after `optim.max_rollbacks` rollbacks: the run stops."""


@dataclasses.dataclass
class RollbackState:
    """The run's rollbacks: what was skipped and why. Plain data, saved in every checkpoint.

    The law: a rollback resumed at step r whose bad steps first..d were seen (first = max(first bad step, r))
    removes the data that steps first..d read under the mapping so far from the stream; every step from `first`
    on reads the remaining data in order (steps.data_step). Steps r..first-1 read what they read before."""

    skipped_data: list[list[int]] = dataclasses.field(default_factory=list)
    """The data removed from the stream: (first data step, count) runs, sorted, disjoint and not adjacent."""
    events: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    """One dict per rollback: the bad step, its loss, where it was seen, the checkpoint step resumed from and
    the data it skipped (`skipped_data_steps`, inclusive [first, last] runs of data steps)."""

    def after(self, d: Diverged, resumed_from: int) -> RollbackState:
        """The state once `d` is rolled back to the checkpoint of step `resumed_from`."""
        first = max(d.first_bad_step, resumed_from)
        assert d.detected_step >= first, f"bad steps {first}..{d.detected_step} after resuming at {resumed_from}"
        removed = _runs(data_step(s, self.skipped_data) for s in range(first, d.detected_step + 1))
        event = {"step": d.first_bad_step, "loss": d.loss, "detected_at": d.detected_step,
                 "resumed_from": resumed_from,
                 "skipped_data_steps": [[start, start + count - 1] for start, count in removed]}
        return RollbackState(_merge([*self.skipped_data, *removed]), [*self.events, event])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> RollbackState:
        """From a checkpoint's record; one written before `skipped_data` existed holds `skips`, (optimizer step,
        count) pairs that each moved the data of the steps from that step on `count` further, and an event's
        `skipped_data_steps` was one [first, last] pair. Both are read as what they meant then."""
        d = d or {}
        skipped = _merge(d["skipped_data"]) if "skipped_data" in d else _from_offsets(d.get("skips", []))
        events = [dict(e) for e in d.get("events", [])]
        for e in events:
            runs = e.get("skipped_data_steps")
            if runs and not isinstance(runs[0], list | tuple):
                e["skipped_data_steps"] = [list(runs)]
        return cls(skipped, events)


def describe_skipped(runs: list[list[int]] | list[int], dash: str = "..") -> str:
    """An event's `skipped_data_steps` for people: "7..9" or "103..104, 110..110" (also an old event's single
    [first, last] pair)."""
    if runs and not isinstance(runs[0], list | tuple):
        runs = [runs]
    return ", ".join(f"{first}{dash}{last}" for first, last in runs)


def _runs(data_steps: Any) -> list[list[int]]:
    """Data steps as sorted (first, count) runs, adjacent ones merged."""
    return _merge([s, 1] for s in data_steps)


def _merge(runs: Any) -> list[list[int]]:
    """(first, count) runs as sorted, disjoint, not adjacent runs covering the same data steps."""
    out: list[list[int]] = []
    for first, count in sorted((int(f), int(c)) for f, c in runs if c > 0):
        if out and first <= out[-1][0] + out[-1][1]:
            out[-1][1] = max(out[-1][1], first + count - out[-1][0])
        else:
            out.append([first, count])
    return out


def _from_offsets(skips: list[list[int]]) -> list[list[int]]:
    """The data that a record of the old kind skipped. Under it step s read s + (the counts of the pairs at or
    before s): a strictly increasing map whose image misses, at each pair's step `at`, the `count` data steps
    from `at` + (the counts of the pairs before `at`) on. So the old mapping is kept exactly, even where two
    rollbacks made it read data that the first one had skipped."""
    runs, before = [], 0
    for at, count in sorted((int(at), int(count)) for at, count in skips):
        runs.append([at + before, count])
        before += count
    return _merge(runs)


class DivergenceMonitor:
    """Device-side: the last `window` good step losses and the first bad step since the run (re)started."""

    def __init__(self, spike_factor: float, window: int):
        self.factor, self.window = spike_factor, window
        self.history = torch.zeros(window, dtype=torch.float64)  # newest last
        self.filled = torch.zeros((), dtype=torch.long)
        self.bad_step = torch.full((), -1, dtype=torch.long)
        self.bad_loss = torch.zeros((), dtype=torch.float64)

    def to(self, device: torch.device) -> DivergenceMonitor:
        for name in ("history", "filled", "bad_step", "bad_loss"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    @torch.no_grad()
    def update(self, loss: torch.Tensor, step: int) -> None:
        """Step `step`'s loss (a 0-d tensor): bad when not finite, or above spike_factor x the mean of the last
        `window` good steps (once there are that many)."""
        loss = loss.to(self.history)
        bad = ~torch.isfinite(loss)
        if self.factor > 0:
            bad = bad | ((self.filled >= self.window) & (loss > self.factor * self.history.mean()))
        first = bad & (self.bad_step < 0)
        self.bad_step = torch.where(first, torch.full_like(self.bad_step, step), self.bad_step)
        self.bad_loss = torch.where(first, loss, self.bad_loss)
        self.history = torch.where(bad, self.history, torch.cat([self.history[1:], loss.reshape(1)]))
        self.filled = self.filled + (~bad).long()

    def poll(self) -> tuple[int, float] | None:
        """(first bad step, its loss), or None. Reads the device: call it at logging and checkpoint steps only."""
        step = int(self.bad_step)
        return None if step < 0 else (step, float(self.bad_loss))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"history": self.history.cpu(), "filled": self.filled.cpu()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state["history"].numel() == self.window:  # a changed window starts afresh
            self.history = state["history"].to(self.history)
            self.filled = state["filled"].to(self.filled)


class RollbackGuard(pl.Callback):
    """Raises `Diverged` at the end of an optimizer step when the monitor has seen a bad step, checking every
    `log_every_n_steps` and before every checkpoint (Lightning runs checkpoint callbacks after this one)."""

    def __init__(self, every_n_steps: int, log_every_n_steps: int):
        self.intervals = (max(1, every_n_steps), max(1, log_every_n_steps))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        step = trainer.global_step
        if step >= trainer.max_steps or any(step % n == 0 for n in self.intervals):
            pl_module.raise_if_diverged()
