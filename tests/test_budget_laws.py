"""The time budget (`trainer.max_time`, pretrain/training/budget.py) as laws: a run stopped at any step, during calibration
or after, and resumed from its checkpoint decides the max_steps of a run that never stopped and spends no more
than the budget; validation is priced once, not once per rank. The laws drive the callback's hooks with a fake
clock and light stand-ins for Lightning's trainer and module; one real run is stopped by SIGTERM during
calibration and resumed."""

from __future__ import annotations

import copy
import json
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data_prep.config import ExperimentConfig, load_config
from pretrain.training import budget as budget_module
from pretrain.training.budget import OPEN_ENDED, TimeBudget
from pretrain.training.schedules import BatchSchedule
from pretrain.training.train import fit

from .test_train import QUIET, config, corpus_file, final_weights, shards  # noqa: F401 - fixtures


class Clock:
    """budget.clock, moved by the simulation: whole seconds, so that every sum is exact."""

    def __init__(self) -> None:
        self.now = 0

    def __call__(self) -> int:
        return self.now


class Trainer(SimpleNamespace):
    """What TimeBudget reads of Lightning's Trainer."""

    def __init__(self, step: int, world_size: int, validation_share: int):
        super().__init__(global_step=step, world_size=world_size, global_rank=0, accumulate_grad_batches=1,
                         callbacks=[], loggers=[], fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(max_steps=0)),
                         strategy=SimpleNamespace(broadcast=lambda obj, src=0: obj),
                         # this rank's validation loader: its share of the validation blocks
                         val_dataloaders=SimpleNamespace(sampler=range(validation_share)))


class Module(SimpleNamespace):
    """What TimeBudget reads and sets of MLMModule."""

    def __init__(self, cfg: ExperimentConfig, decision: dict | None):
        super().__init__(cfg=cfg, budget=decision)

    def set_max_steps(self, max_steps: int) -> None:
        self.max_steps = max_steps


def simulate(cfg: ExperimentConfig, budget_s: int, pace: int, world_size: int, share: int, stop_at: int | None,
             run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """A budgeted run whose steps take `pace` seconds per training sequence and whose validations (every
    val_check_interval steps, after the step) take as long as the budget prices them (`share` sequences a rank x
    world_size x a third of `pace`). Stopped right after the checkpoint of step `stop_at` and resumed from it as
    train.budgeted does (with the decision when the checkpoint has one, else with a TimeBudget that takes up the
    checkpoint's progress); the validation owed at the stop step runs after the restart. Each process has a clock
    origin of its own. Returns the decided max_steps, the decision step and the seconds spent in all."""
    clock = Clock()
    monkeypatch.setattr(budget_module, "clock", clock)
    batches = BatchSchedule.from_config(cfg.batch, cfg.data.seq_len)
    interval = cfg.trainer.val_check_interval
    validation_s = share * world_size * pace // 3
    step, spent, checkpoint, owed = 0, 0, None, False
    max_steps, decided_at = OPEN_ENDED, None
    for process in range(2):
        clock.now = 1000 * process + 17  # no clock is shared between processes
        origin = clock.now
        decision = checkpoint["budget"] if checkpoint else None
        module = Module(cfg, decision)
        callback = None if decision else TimeBudget(budget_s, cfg.trainer.calibration_steps, run_dir)
        if callback is not None and checkpoint and checkpoint["callbacks"] is not None:
            callback.load_state_dict(copy.deepcopy(checkpoint["callbacks"]))
        trainer = Trainer(step, world_size, share)
        if callback is not None:
            callback.on_train_start(trainer, module)
        if owed:
            _validate(clock, validation_s, callback, trainer, module)
        stopped = False
        while step < max_steps:
            clock.now += pace * batches.size(step)
            step += 1
            trainer.global_step = step
            if callback is not None:
                callback.on_train_batch_end(trainer, module, None, None, step - 1)
            if module.budget is not None and decided_at is None and callback is not None:
                decided_at, max_steps = step, module.budget["max_steps"]
                assert trainer.fit_loop.epoch_loop.max_steps == module.max_steps == max_steps  # applied everywhere
            elif module.budget is not None:
                max_steps = module.budget["max_steps"]
            if process == 0 and step == stop_at:  # a checkpoint at this step (the callback ran before it), then stop
                checkpoint = {"budget": module.budget, "callbacks": callback.state_dict() if callback else None}
                owed, stopped = step % interval == 0, True
                break
            if step % interval == 0:
                _validate(clock, validation_s, callback, trainer, module)
        spent += clock.now - origin
        if not stopped:
            break
    return {"max_steps": max_steps, "decided_at": decided_at, "spent": spent, "step_s": pace * batches.G,
            "validation_s": validation_s}


def _validate(clock: Clock, seconds: int, callback: TimeBudget | None, trainer: Trainer, module: Module) -> None:
    if callback is not None:
        callback.on_validation_start(trainer, module)
    clock.now += seconds
    if callback is not None:
        callback.on_validation_end(trainer, module)


@st.composite
def budgeted_runs(draw) -> tuple[list[str], int, int, int, int]:
    """(config arguments, budget, pace, world size, validation share of a rank)."""
    calibration = draw(st.integers(2, 8))
    warmup = draw(st.integers(calibration, 12))
    global_size, micro = draw(st.sampled_from([(8, 4), (16, 4), (16, 8)]))
    n = global_size // micro
    start = draw(st.sampled_from([0, n, 2 * n])) if n * 2 < global_size else 0
    args = [f"--trainer.calibration_steps={calibration}", f"--optim.warmup_steps={warmup}",
            f"--batch.global_size={global_size}", f"--batch.micro_size={micro}", "--data.seq_len=32",
            f"--trainer.val_check_interval={draw(st.integers(1, 12))}"]
    if start:
        args += [f"--batch.start_size={start}", f"--batch.warmup_tokens={draw(st.sampled_from([256, 2048]))}"]
    pace = 3 * draw(st.integers(1, 4))  # a multiple of 3: a validation sequence costs a third of a training one
    world_size, share = draw(st.sampled_from([1, 2, 4])), draw(st.integers(0, 24))
    # enough for the warmup at least twice over, so that the budget (not the end of warmup) decides
    step_s = pace * global_size + share * world_size * pace // 3
    budget = (warmup + 2) * step_s * 2 + draw(st.integers(0, 200 * step_s))
    return [f"--trainer.max_time={budget}", *args], budget, pace, world_size, share


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(run=budgeted_runs(), data=st.data())
def test_a_budget_decision_survives_a_stop_at_any_step(run, data, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The law: stopped after any step s and resumed from that step's checkpoint, the run decides the same
    max_steps as the run that never stopped (at the same pace), and all its processes together spend no more
    than the budget plus one validation run (the validations are priced on average over the steps between
    them), nor leave more than a step and a validation of it unused.

    One corner decides a step later: calibration_steps <= 2 and a stop at step 1 leave no timed step (the first
    step of each process is not timed), so the resumed run decides at step 3, still within the budget."""
    args, budget, pace, world, share = run
    cfg = load_config(None, args)
    whole = simulate(cfg, budget, pace, world, share, None, tmp_path, monkeypatch)
    assert whole["max_steps"] > cfg.optim.warmup_steps + 1  # the budget decided, not the floor
    # stops during calibration are the interesting ones: draw them more often
    stop = data.draw(st.one_of(st.integers(1, whole["decided_at"] + 1), st.integers(1, whole["max_steps"])))
    stopped = simulate(cfg, budget, pace, world, share, stop, tmp_path, monkeypatch)
    if not (stop == 1 and cfg.trainer.calibration_steps <= 2):
        assert stopped["decided_at"] == whole["decided_at"]
        assert stopped["max_steps"] == whole["max_steps"], (stop, whole, stopped)
        assert stopped["spent"] == whole["spent"]
    for result in (whole, stopped):
        assert result["spent"] <= budget + result["validation_s"], result
        assert budget - result["spent"] < result["step_s"] + 2 * result["validation_s"] + 1, result


def test_the_progress_of_a_checkpoint_before_the_decision_is_taken_up(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """An example of the law, with the numbers: 8 sequences a step at 3 s a sequence (24 s a step), a budget of
    1,000 s, calibration over 4 steps, stopped after step 2. Before the fix the resumed run calibrated afresh:
    it counted the time from its own start only (48 s less) and decided 2 more steps than the budget buys."""
    cfg = load_config(None, ["--trainer.max_time=1000", "--trainer.calibration_steps=4", "--optim.warmup_steps=4",
                             "--batch.global_size=8", "--batch.micro_size=4", "--trainer.val_check_interval=100"])
    whole = simulate(cfg, 1000, 3, 1, 0, None, tmp_path, monkeypatch)
    assert whole["max_steps"] == 41 and whole["spent"] == 41 * 24  # 1,000 // 24
    stopped = simulate(cfg, 1000, 3, 1, 0, 2, tmp_path, monkeypatch)
    assert stopped == whole
    state = TimeBudget(1000, 4, tmp_path)
    state.load_state_dict({"spent_s": 48.0, "timed_s": 24.0, "timed_sequences": 8})
    assert state.state_dict() == {"spent_s": 48.0, "timed_s": 24.0, "timed_sequences": 8}  # before its first step


def test_validation_is_priced_once_not_once_per_rank(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """limit_val_batches x micro_size blocks are split over the ranks (data.ValidSampler), which validate their
    shares in parallel: on 4 ranks a validation of 16 blocks lasts as long as 4 x 4 sequences at a rank's pace.
    It was priced as 4 x 4 x 4 (the limit times the ranks)."""
    cfg = load_config(None, ["--trainer.max_time=1000", "--trainer.calibration_steps=2", "--optim.warmup_steps=2",
                             "--batch.global_size=16", "--batch.micro_size=4", "--trainer.val_check_interval=10",
                             "--trainer.limit_val_batches=4"])
    clock = Clock()
    monkeypatch.setattr(budget_module, "clock", clock)
    callback, module = TimeBudget(1000.0, 2, tmp_path), Module(cfg, None)
    trainer = Trainer(0, 4, 4)  # 16 blocks over 4 ranks: 4 each
    callback.on_train_start(trainer, module)
    for step in (1, 2):
        clock.now += 48  # 3 s a sequence of the 16 of a step
        trainer.global_step = step
        callback.on_train_batch_end(trainer, module, None, None, step - 1)
    decision = json.loads((tmp_path / "logs" / "budget.json").read_text())
    # 16 sequences x 3 s / 3, every 10 steps: 1.6 s a step; (1000 - 96) / (48 + 1.6) = 18.2 -> 2 + 18 steps
    assert decision["validation_s_per_step"] == pytest.approx(1.6) and decision["step_time_s"] == 48.0
    assert decision["max_steps"] == module.max_steps == 20
    # and before the loaders exist, the limit: the blocks of all ranks already
    trainer.val_dataloaders = None
    assert budget_module._validation_sequences(trainer, cfg) == 16


def test_probes_are_priced_like_validations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A probe (training/probing.py) of 48 s every 10 steps costs 4.8 s a step, and the one at the last step 48 s
    more: (1000 - 96 - 48) / (48 + 4.8) = 16.2 -> 2 + 16 steps, where the run without probes decides 2 + 18
    (the example above, without validation). Before probes were priced, a budgeted run with probes overran its
    budget by their share."""
    cfg = load_config(None, ["--trainer.max_time=1000", "--trainer.calibration_steps=2", "--optim.warmup_steps=2",
                             "--batch.global_size=16", "--batch.micro_size=4", "--trainer.val_check_interval=10",
                             "--trainer.limit_val_batches=0"])
    decisions = []
    for probes in ([], [SimpleNamespace(probe_seconds=48.0, every=10, seconds=48.0)]):
        clock = Clock()
        monkeypatch.setattr(budget_module, "clock", clock)
        callback, module = TimeBudget(1000.0, 2, tmp_path), Module(cfg, None)
        trainer = Trainer(0, 1, 0)
        trainer.callbacks = probes
        callback.on_train_start(trainer, module)
        for step in (1, 2):
            clock.now += 48  # 3 s a sequence of the 16 of a step
            trainer.global_step = step
            callback.on_train_batch_end(trainer, module, None, None, step - 1)
        decisions.append(json.loads((tmp_path / "logs" / "budget.json").read_text()))
    assert [d["max_steps"] for d in decisions] == [20, 18]
    assert [d["probe_s"] for d in decisions] == [0.0, 48.0]


BUDGETED = ["--trainer.max_time=12", "--trainer.calibration_steps=4", "--optim.warmup_steps=4",
            "--trainer.max_steps=5"]  # ignored: the budget decides


class Signal(pl.Callback):
    """Sends this process SIGTERM at the end of step `at` (PreemptionCheckpoint sees it at the next step's end,
    as a real signal between two steps)."""

    def __init__(self, at: int):
        self.at = at

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.at:
            os.kill(os.getpid(), signal.SIGTERM)


class Tick:
    """budget.clock: `seconds` per reading, so a step takes that long."""

    def __init__(self, seconds: float = 1.0) -> None:
        self.now, self.seconds = 0.0, seconds

    def __call__(self) -> float:
        self.now += self.seconds
        return self.now


def test_sigterm_during_calibration_and_at_the_decision_resumes_the_same_decision(
        shards, corpus_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """A real run stopped by SIGTERM at step 2 (mid-calibration), resumed, stopped again at step 4 (the decision's
    step) and resumed: it decides what the run that never stopped decides at this pace (test_schedules runs that
    one, with a budget of 30 s): 4 steps in 4 s, 1 s a step plus 16 validation blocks x 1/8 s / 3 every 10 steps
    = 1.0667 s a step, so (12 - 4) / 1.0667 = 7.5 -> 4 + 7 = 11 steps; logs/budget.json and the checkpoints say
    11. Before: the checkpoint of step 2 held no progress (the resumed run calibrated afresh from its own start),
    and the preemption checkpoint of step 4 was saved before the budget decided: 13 or 15 steps."""
    _, meta = shards
    run = tmp_path / "stopped"
    last = run / "checkpoints" / "last.ckpt"
    monkeypatch.setattr(budget_module, "clock", Tick())
    first = fit(config(run, corpus_file, *BUDGETED), meta, resume=False, callbacks=[Signal(1)], **QUIET)
    saved = torch.load(last, weights_only=True)
    assert first.global_step == saved["global_step"] == 2 and "budget" not in saved
    # 2 steps since its start; step 2 timed (the first is not): 1 s for its 8 sequences
    assert saved["callbacks"]["TimeBudget"] == {"spent_s": 2.0, "timed_s": 1.0, "timed_sequences": 8}

    monkeypatch.setattr(budget_module, "clock", Tick())
    second = fit(config(run, corpus_file, *BUDGETED), meta, resume=True, callbacks=[Signal(3)], **QUIET)
    saved = torch.load(last, weights_only=True)
    assert second.global_step == saved["global_step"] == 4
    assert saved["budget"]["max_steps"] == 11  # decided before the preemption saved
    assert "TimeBudget" not in saved["callbacks"]  # the decision replaces the progress

    monkeypatch.setattr(budget_module, "clock", Tick(10.0))  # a slower machine: the decision stays
    resumed = fit(config(run, corpus_file, *BUDGETED), meta, resume=True, **QUIET)
    assert resumed.global_step == resumed.max_steps == 11
    decision = json.loads((run / "logs" / "budget.json").read_text())
    assert decision["max_steps"] == 11 and decision["calibration_steps"] == 4 and decision["elapsed_s"] == 4.0
    assert torch.load(run / "checkpoints" / "step-0000011.ckpt", weights_only=True)["budget"] == decision
