"""A wall-clock budget (`trainer.max_time`) turned into a number of steps, once, so the run stays exact.

The learning-rate schedule needs max_steps (linear, cosine and wsd decay towards it), and an exact resume needs
the same max_steps after every restart. So a budgeted run starts with max_steps open, trains
`trainer.calibration_steps` steps (all inside warmup, whose rate does not depend on max_steps: config.py checks
it), measures its time per training sequence over them (the first step, with its warm-up and compilation, counts
in the time spent but not in the rate), and fixes

    max_steps = calibration_steps + the steps holding (budget - time so far) / (time per sequence + validation
                time per sequence) sequences

(steps of the batch schedule, which grow during batch-size warmup), where the validation time is that of the
run's validations (every `trainer.val_check_interval` steps, `limit_val_batches` micro-batches each) at a third of
a training sequence's time per sequence (a forward pass without the backward). Rank 0 decides and broadcasts. The decision is printed, written to logs/budget.json and logged as
`budget/max_steps`, and kept in every checkpoint (`checkpoint["budget"]`): a resumed or rolled-back run reads it
back (`train.py`) and never measures again, so its schedule, data and masks are those of the uninterrupted run.
Time lost to a restart is not given back: the budget buys steps, decided once.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from .schedules import BatchSchedule

clock = time.perf_counter
"""The budget's clock (a module attribute, so a test can give it a fixed pace)."""

OPEN_ENDED = 10**9
"""max_steps of a budgeted run until the budget is decided: the data stream is lazy, so nothing is that long."""


def decide_max_steps(budget_s: float, elapsed_s: float, calibration_steps: int, sequence_time_s: float,
                     validation_s_per_sequence: float, min_steps: int, batches: BatchSchedule) -> int:
    """The steps a budget buys: the calibration steps, then the sequences the remaining time pays for at the
    measured rate, in the steps of the batch schedule (which grow during batch-size warmup); never fewer than
    `min_steps` (the end of warmup, so the schedule is well formed)."""
    sequences = int(max(0.0, budget_s - elapsed_s) // max(sequence_time_s + validation_s_per_sequence, 1e-12))
    step = calibration_steps
    while step < batches.ramp_steps and batches.size(step) <= sequences:
        sequences -= batches.size(step)
        step += 1
    if step >= batches.ramp_steps:
        step += sequences // batches.G
    return max(step, min_steps, calibration_steps)


class TimeBudget(pl.Callback):
    """Times the calibration steps, then fixes the run's max_steps (module, trainer loop, progress bar)."""

    def __init__(self, budget_s: float, calibration_steps: int, run_dir: Path):
        self.budget_s, self.K, self.run_dir = budget_s, calibration_steps, Path(run_dir)
        self.start: float | None = None
        self.step_ends: list[float] = []
        self.first_timed: int | None = None  # the step whose end is step_ends[0]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = clock()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches or pl_module.budget is not None:
            return
        self.step_ends.append(clock())
        if self.first_timed is None:
            self.first_timed = trainer.global_step
        if trainer.global_step < self.K or len(self.step_ends) < 2:
            return
        decision = self._decide(trainer, pl_module) if trainer.global_rank == 0 else None
        decision = trainer.strategy.broadcast(decision, src=0)
        apply_budget(trainer, pl_module, decision)
        if trainer.global_rank == 0:
            self._report(trainer, decision)

    def _decide(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        cfg, step = pl_module.cfg, trainer.global_step
        batches = BatchSchedule.from_config(cfg.batch, cfg.data.seq_len)
        timed = batches.offset(step) - batches.offset(self.first_timed)  # sequences of the steps after the first
        sequence_time = (self.step_ends[-1] - self.step_ends[0]) / timed
        elapsed = self.step_ends[-1] - (self.start or self.step_ends[0])
        t = cfg.trainer
        val_sequences = (t.limit_val_batches or _all_val_batches(trainer)) * cfg.batch.micro_size * trainer.world_size
        # a validation sequence costs a forward pass, about a third of a training sequence's forward and backward
        val_per_sequence = val_sequences * sequence_time / 3 / (max(1, t.val_check_interval) * cfg.batch.global_size)
        min_steps = 0 if cfg.optim.schedule == "inverse_sqrt" else cfg.optim.warmup_steps + 1
        steps = decide_max_steps(self.budget_s, elapsed, step, sequence_time, val_per_sequence, min_steps, batches)
        return {"max_time_s": self.budget_s, "calibration_steps": step,
                "step_time_s": round(sequence_time * batches.G, 6), "elapsed_s": round(elapsed, 3),
                "validation_s_per_step": round(val_per_sequence * batches.G, 6), "max_steps": steps,
                "world_size": trainer.world_size}

    def _report(self, trainer: pl.Trainer, decision: dict[str, Any]) -> None:
        print(f"\nbudget: trainer.max_time {self.budget_s:,.0f} s: {decision['calibration_steps']} steps in "
              f"{decision['elapsed_s']:.1f} s, {decision['step_time_s']:.3f} s/step -> trainer.max_steps "
              f"{decision['max_steps']:,} (kept in every checkpoint; logs/budget.json)", flush=True)
        (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        (self.run_dir / "logs" / "budget.json").write_text(json.dumps(decision, indent=2) + "\n")
        for logger in trainer.loggers:
            logger.log_metrics({"budget/max_steps": float(decision["max_steps"])}, step=trainer.global_step)


def _all_val_batches(trainer: pl.Trainer) -> int:
    batches = trainer.num_val_batches
    return int(sum(batches)) if batches else 0


def apply_budget(trainer: pl.Trainer | None, pl_module: Any, decision: dict[str, Any]) -> None:
    """Make `decision["max_steps"]` the run's length everywhere it is read."""
    pl_module.budget = decision
    pl_module.set_max_steps(int(decision["max_steps"]))
    if trainer is None:
        return
    trainer.fit_loop.epoch_loop.max_steps = int(decision["max_steps"])
    for callback in trainer.callbacks:
        if hasattr(callback, "set_total_steps"):
            callback.set_total_steps(trainer)
