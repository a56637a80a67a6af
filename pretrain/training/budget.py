"""A wall-clock budget (`trainer.max_time`) turned into a number of steps, once, so the run stays exact.

The learning-rate schedule needs max_steps (linear, cosine and wsd decay towards it), and an exact resume needs
the same max_steps after every restart. So a budgeted run starts with max_steps open, trains
`trainer.calibration_steps` steps (all inside warmup, whose rate does not depend on max_steps: config.py checks
it), measures its time per training sequence over them (the first step of each process, with its warm-up and
compilation, counts in the time spent but not in the rate; so do validations), and fixes

    max_steps = calibration_steps + the steps that (budget - time so far) pays for, each at
                (its sequences x time per sequence) + validation time per step

(steps of the batch schedule, which grow during batch-size warmup), where the validation time is that of the
run's validations (every `trainer.val_check_interval` steps, each as long as a rank's share of the validation
blocks, which the ranks validate in parallel) at a third of a training sequence's time per sequence (a forward
pass without the backward), spread over the steps between them. Rank 0 decides and broadcasts. The decision is
printed, written to logs/budget.json and logged as `budget/max_steps`, and kept in every checkpoint
(`checkpoint["budget"]`): a resumed or rolled-back run reads it back (`train.py`) and never measures again, so
its schedule, data and masks are those of the uninterrupted run. Probes (`eval.tasks`, probing.py) are priced
like validations: the time of the probe at step 0 (its tokenizing aside) for every `eval.every_n_steps` steps, plus
one for the probe at the last step. A checkpoint written before the decision (a
preemption during calibration) carries the budget's progress instead (`TimeBudget.state_dict`): the resumed run
counts the time already spent and the steps already timed, so it decides what the uninterrupted run would have
at the same pace, and spends no more than the budget. Time lost to a restart (the restart itself, the steps
redone after the checkpoint resumed) is not charged: the budget buys steps, decided once, and a restart makes
the wall clock longer, not the run shorter.
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
                     validation_s_per_step: float, min_steps: int, batches: BatchSchedule) -> int:
    """The steps a budget buys: the calibration steps, then as many steps as the remaining time pays for, each
    at its sequences' measured time (the steps of the batch schedule, which grow during batch-size warmup) plus
    its share of the validations; never fewer than `min_steps` (the end of warmup, so the schedule is well
    formed)."""
    left = budget_s - elapsed_s
    step = calibration_steps
    while step < batches.ramp_steps and batches.size(step) * sequence_time_s + validation_s_per_step <= left:
        left -= batches.size(step) * sequence_time_s + validation_s_per_step
        step += 1
    if step >= batches.ramp_steps:
        step += int(max(0.0, left) // max(batches.G * sequence_time_s + validation_s_per_step, 1e-12))
    return max(step, min_steps, calibration_steps)


class TimeBudget(pl.Callback):
    """Times the calibration steps, then fixes the run's max_steps (module, trainer loop, progress bar).

    A stop before the decision loses none of it: every checkpoint until then carries the budget's progress
    (`state_dict`, which Lightning keeps under `checkpoint["callbacks"]`: the budget time spent up to the
    checkpoint's step, and the time and sequences of the steps timed so far), and the resumed run's TimeBudget
    takes it up (`load_state_dict`), so it decides at the same step, from the same time spent and the same
    measured rate, as a run that never stopped (but for one corner: a stop at step 1 with calibration_steps 2
    leaves no step timed, and the resumed run decides a step later, as honestly). From the decision on, checkpoints carry the decision
    (`checkpoint["budget"]`, module_checkpoint.py). It runs before the checkpoint callbacks (train.make_trainer), so a
    checkpoint of the decision step, a preemption's included, carries the decision.

    Timed are the steps of each process after its first (whose warm-up, compilation and loader start count in the
    time spent, not in the rate), without the validations between them (counted in the time spent, and priced
    separately, by `_validation_sequences`)."""

    def __init__(self, budget_s: float, calibration_steps: int, run_dir: Path):
        self.budget_s, self.K, self.run_dir = budget_s, calibration_steps, Path(run_dir)
        self.spent_s = 0.0  # the budget time of the processes before this one, up to the checkpoint resumed
        self.timed_s = 0.0  # time of the timed steps, over all processes
        self.timed_sequences = 0  # their training sequences (over all ranks)
        self.decided = False
        self._start: float | None = None  # this process's training start
        self._last_end: float | None = None  # the end of this process's last step
        self._validation_s = 0.0  # validation time since the last step's end
        self._validation_start: float | None = None

    def state_dict(self) -> dict[str, Any]:
        """The progress up to the end of the last step (a checkpoint's step: this callback runs before the
        checkpoint callbacks); nothing once decided (the checkpoint has the decision)."""
        if self.decided:
            return {}
        here = self._last_end - self._start if self._last_end is not None and self._start is not None else 0.0
        return {"spent_s": self.spent_s + here, "timed_s": self.timed_s, "timed_sequences": self.timed_sequences}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.spent_s = float(state.get("spent_s", 0.0))
        self.timed_s = float(state.get("timed_s", 0.0))
        self.timed_sequences = int(state.get("timed_sequences", 0))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start, self._last_end, self._validation_s = clock(), None, 0.0

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.decided and self._start is not None:
            self._validation_start = clock()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._validation_start is not None:
            self._validation_s += clock() - self._validation_start
            self._validation_start = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches or self.decided or pl_module.budget is not None:
            return
        now, step = clock(), trainer.global_step  # step: the steps done, this one included
        cfg = pl_module.cfg
        if self._last_end is not None:  # not this process's first step
            self.timed_s += now - self._last_end - self._validation_s
            self.timed_sequences += BatchSchedule.from_config(cfg.batch, cfg.data.seq_len).size(step - 1)
        self._last_end, self._validation_s = now, 0.0
        if step < self.K or not self.timed_sequences:
            return
        decision = self._decide(trainer, pl_module, now) if trainer.global_rank == 0 else None
        decision = trainer.strategy.broadcast(decision, src=0)
        self.decided = True
        apply_budget(trainer, pl_module, decision)
        if trainer.global_rank == 0:
            self._report(trainer, decision)

    def _decide(self, trainer: pl.Trainer, pl_module: pl.LightningModule, now: float) -> dict[str, Any]:
        cfg, step = pl_module.cfg, trainer.global_step
        batches = BatchSchedule.from_config(cfg.batch, cfg.data.seq_len)
        sequence_time = self.timed_s / self.timed_sequences
        elapsed = self.spent_s + (now - self._start)
        t = cfg.trainer
        # a validation sequence costs a forward pass, about a third of a training sequence's forward and backward
        val_per_step = _validation_sequences(trainer, cfg) * sequence_time / 3 / max(1, t.val_check_interval)
        probe_s, probe_every = _probe_price(trainer)
        # the probes to come: one every `probe_every` steps, plus the one at the last step
        eval_per_step = val_per_step + probe_s / probe_every
        min_steps = 0 if cfg.optim.schedule == "inverse_sqrt" else cfg.optim.warmup_steps + 1
        steps = decide_max_steps(self.budget_s, elapsed + probe_s, step, sequence_time, eval_per_step, min_steps,
                                 batches)
        return {"max_time_s": self.budget_s, "calibration_steps": step,
                "step_time_s": round(sequence_time * batches.G, 6), "elapsed_s": round(elapsed, 3),
                "validation_s_per_step": round(val_per_step, 6), "probe_s": round(probe_s, 3), "max_steps": steps,
                "world_size": trainer.world_size}

    def _report(self, trainer: pl.Trainer, decision: dict[str, Any]) -> None:
        print(f"\nbudget: trainer.max_time {self.budget_s:,.0f} s: {decision['calibration_steps']} steps in "
              f"{decision['elapsed_s']:.1f} s, {decision['step_time_s']:.3f} s/step -> trainer.max_steps "
              f"{decision['max_steps']:,} (kept in every checkpoint; logs/budget.json)", flush=True)
        (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        (self.run_dir / "logs" / "budget.json").write_text(json.dumps(decision, indent=2) + "\n")
        for logger in trainer.loggers:
            logger.log_metrics({"budget/max_steps": float(decision["max_steps"])}, step=trainer.global_step)


def _probe_price(trainer: pl.Trainer) -> tuple[float, int]:
    """(seconds of one probe, steps between probes) of the run's probes (training/probing.py), as this process
    measured its last probe (step 0 of a fresh run; tokenizing aside); (0, 1) without probes or before one ran (a
    run resumed during calibration at a step that was no probe step: its probes go unpriced)."""
    for callback in trainer.callbacks:
        seconds = getattr(callback, "probe_seconds", None)
        if seconds is not None:
            return float(seconds), max(1, int(callback.every))
    return 0.0, 1


def _validation_sequences(trainer: pl.Trainer, cfg: Any) -> int:
    """The sequences of one validation run, in the unit of the measured rate (wall time per training sequence of
    all ranks together): each rank validates its own share in parallel (data.ValidSampler splits the first
    limit_val_batches x micro_size blocks over the ranks), taking world_size x that rate per sequence, so a
    validation lasts as long as this rank's share (rank 0's, the largest) x world_size sequences would. Before
    the loaders are set up: the limit, which is already the sequences of all ranks together."""
    loaders = trainer.val_dataloaders
    if loaders is None:
        return cfg.trainer.limit_val_batches * cfg.batch.micro_size
    loaders = loaders if isinstance(loaders, (list, tuple)) else [loaders]
    return sum(len(loader.sampler) for loader in loaders) * trainer.world_size


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
