"""Schedules over the optimizer step: each learning-rate schedule against its formula in `transformers`, the
masking-rate schedule in the collator, decay from a stable-phase checkpoint, and a wall-clock budget
(`trainer.max_time`) that decides max_steps once and keeps it on resume. Every phase change resumes exactly."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from data_prep.config import ConfigError, load_config
from pretrain.training import budget as budget_module
from pretrain.training.batching import MaskingCollator
from pretrain.training.budget import decide_max_steps
from pretrain.training.masking import IGNORE
from pretrain.training.schedules import BatchSchedule, LRSchedule, MaskSchedule
from pretrain.training.train import TrainingIncomplete, fit

from .test_train import QUIET, config, corpus_file, final_weights, shards  # noqa: F401 - fixtures


def _hf_rates(make, steps: int) -> list[float]:
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sched = make(opt)
    rates = []
    for _ in range(steps):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return rates


def _transformers_twin(s: LRSchedule):
    """(transformers' LambdaLR multiplier for the same schedule, the tolerance: 0 for the same float), or None
    where transformers has none (linear with a floor ending at its warmup)."""
    import transformers.optimization as hf

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    w, total, m = s.warmup_steps, s.max_steps, s.min_lr_ratio
    if s.schedule == "linear" and not m:
        made, tolerance = hf.get_linear_schedule_with_warmup(opt, w, total), 0.0
    elif s.schedule == "linear":  # fairseq's polynomial decay of power 1 to lr_end: the same line, computed otherwise
        if total == w:
            return None
        made, tolerance = hf.get_polynomial_decay_schedule_with_warmup(opt, w, total, lr_end=m, power=1.0), 1e-12
    elif s.schedule == "cosine":
        made = (hf.get_cosine_with_min_lr_schedule_with_warmup(opt, w, total, min_lr_rate=m) if m
                else hf.get_cosine_schedule_with_warmup(opt, w, total))
        tolerance = 0.0
    elif s.schedule == "wsd":
        made = hf.get_wsd_schedule(opt, w, s.decay_steps, num_training_steps=total, decay_type=s.decay_shape,
                                   min_lr_ratio=m)
        tolerance = 0.0
    else:
        made, tolerance = hf.get_inverse_sqrt_schedule(opt, w, timescale=s.timescale or None), 0.0
    return made.lr_lambdas[0], tolerance


@st.composite
def lr_schedules(draw) -> LRSchedule:
    schedule = draw(st.sampled_from(["linear", "cosine", "wsd", "inverse_sqrt"]))
    total = draw(st.one_of(st.integers(1, 300), st.integers(301, 2_000_000)))
    warmup = draw(st.one_of(st.just(0), st.integers(0, min(total, 40)), st.integers(0, total)))
    decay = draw(st.one_of(st.just(0), st.integers(0, total - warmup)))  # from_config bounds it so
    ratio = draw(st.one_of(st.just(0.0), st.sampled_from([0.1, 0.5]), st.floats(0.0, 0.99)))
    timescale = draw(st.one_of(st.just(0), st.integers(1, 20_000)))
    return LRSchedule(schedule, warmup, total, decay, draw(st.sampled_from(["linear", "1-sqrt", "cosine"])), ratio,
                      timescale)


@settings(max_examples=400, deadline=None)
@given(lr_schedules(), st.lists(st.floats(0.0, 1.0), max_size=40))
def test_every_schedule_equals_transformers_step_by_step(s: LRSchedule, where: list[float]) -> None:
    """The law: at every step 0..max_steps (all of them up to 300 steps, else the phase boundaries and a sample)
    our multiplier is transformers' LambdaLR multiplier for the same schedule, the same float (linear with a
    floor, which transformers computes as a polynomial decay: within 1e-12)."""
    twin = _transformers_twin(s)
    if twin is None:
        return
    theirs, tolerance = twin
    T, w = s.max_steps, s.warmup_steps
    if T <= 300:
        steps = range(T + 1)
    else:
        edges = [0, w - 1, w, w + 1, s.decay_start - 1, s.decay_start, s.decay_start + 1, T - 1, T]
        steps = sorted({min(T, max(0, x)) for x in edges} | {round(f * T) for f in where})
    for step in steps:
        ours, expected = s(step), theirs(step)
        if tolerance:
            assert abs(ours - expected) <= tolerance, (step, ours, expected)
        else:
            assert ours == expected, (step, ours, expected)


@pytest.mark.parametrize("warmup", [0, 7])
def test_each_schedule_drives_torch_as_transformers_does(warmup: int) -> None:
    """The rates an optimizer sees through LambdaLR, step by step, as with transformers' schedulers."""
    import transformers.optimization as hf

    total = 50
    cases = {
        "linear": (LRSchedule("linear", warmup, total),
                   lambda o: hf.get_linear_schedule_with_warmup(o, warmup, total)),
        "cosine-floor": (LRSchedule("cosine", warmup, total, min_lr_ratio=0.1),
                         lambda o: hf.get_cosine_with_min_lr_schedule_with_warmup(o, warmup, total, min_lr_rate=0.1)),
        "inverse_sqrt": (LRSchedule("inverse_sqrt", warmup, total),
                         lambda o: hf.get_inverse_sqrt_schedule(o, warmup)),
    }
    for shape in ("linear", "1-sqrt", "cosine"):
        cases[f"wsd-{shape}"] = (
            LRSchedule("wsd", warmup, total, decay_steps=12, decay_shape=shape, min_lr_ratio=0.2),
            lambda o, s=shape: hf.get_wsd_schedule(o, warmup, 12, num_training_steps=total, decay_type=s,
                                                   min_lr_ratio=0.2))
    for name, (ours, theirs) in cases.items():
        assert [ours(s) for s in range(total + 1)] == _hf_rates(theirs, total + 1), name
    wsd = LRSchedule("wsd", warmup, total, decay_steps=12)
    assert [wsd(s) for s in range(warmup, total - 12 + 1)] == [1.0] * (total - 12 - warmup + 1)  # the plateau
    assert wsd(total) == 0.0 and LRSchedule("cosine", warmup, total)(total) == pytest.approx(0.0, abs=1e-15)


def test_the_corners_where_the_schedules_used_to_differ_from_transformers() -> None:
    # inverse_sqrt without warmup or timescale: transformers' timescale 10,000 (was 1: 1/sqrt(s + 1))
    assert LRSchedule("inverse_sqrt", 0, 100)(30) == 1.0 / math.sqrt(10_030 / 10_000)
    assert LRSchedule("inverse_sqrt", 8, 100)(8 + 8) == 1.0 / math.sqrt(2)  # timescale 0: warmup_steps
    # wsd with a floor warms up from it (get_wsd_schedule), and ends at it even with no decay steps
    assert LRSchedule("wsd", 10, 100, 20, min_lr_ratio=0.2)(0) == 0.2
    assert LRSchedule("wsd", 10, 100, 20, min_lr_ratio=0.2)(5) == 0.5 * 0.8 + 0.2
    assert LRSchedule("wsd", 10, 100, 0)(99) == 1.0 and LRSchedule("wsd", 10, 100, 0)(100) == 0.0
    # past max_steps (never reached by a run) cosine keeps its floor; transformers' turns back up
    assert LRSchedule("cosine", 0, 100, min_lr_ratio=0.1)(150) == pytest.approx(0.1)


def test_min_lr_ratio_floors_the_decay_and_wsd_takes_its_length_from_the_config() -> None:
    cfg = load_config(None, ["--optim.schedule=wsd", "--optim.warmup_steps=10", "--trainer.max_steps=100",
                             "--optim.decay_fraction=0.25", "--optim.min_lr_ratio=0.1"])
    s = LRSchedule.from_config(cfg.optim, 100)
    assert (s.decay_steps, s.decay_start) == (25, 75)
    assert s(5) == 0.55 and s(75) == 1.0 and s(100) == pytest.approx(0.1) and s(150) == pytest.approx(0.1)
    assert s(80) == pytest.approx(0.1 + 0.9 * (1 - 5 / 25))
    assert LRSchedule.from_config(load_config(None, ["--optim.schedule=wsd", "--optim.decay_steps=30",
                                                     "--optim.warmup_steps=10", "--trainer.max_steps=100"]).optim,
                                  100).decay_start == 70


@pytest.mark.parametrize("args, message", [
    (["--optim.schedule=step"], r"optim.schedule='step' must be one of linear, cosine, wsd, inverse_sqrt"),
    (["--optim.decay_shape=exp"], r"optim.decay_shape='exp' must be one of linear, 1-sqrt, cosine"),
    (["--optim.schedule=wsd", "--optim.warmup_steps=10", "--optim.decay_steps=95", "--trainer.max_steps=100"],
     r"optim.warmup_steps=10 \+ optim.decay_steps=95 is more than trainer.max_steps=100"),
    (["--masking.start_probability=0.3"], r"masking.anneal_steps=0 must be at least 1"),
    (["--trainer.max_time=soon"], r"trainer.max_time='soon' is not a duration"),
    (["--trainer.max_time=00:10:00", "--optim.warmup_steps=5"],
     r"trainer.max_time needs optim.warmup_steps=5 >= trainer.calibration_steps=10"),
])
def test_bad_schedule_settings_are_one_line_naming_the_key(args: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, args)


def test_max_time_reads_hh_mm_ss_and_seconds() -> None:
    from data_prep.config import parse_duration

    cfg = load_config(None, ["--trainer.max_time=00:30:00", "--optim.warmup_steps=10"])  # YAML reads it as 1800
    assert parse_duration(cfg.trainer.max_time, "k") == 1800.0
    assert parse_duration("1:02:03:04", "k") == 86400 + 2 * 3600 + 3 * 60 + 4 and parse_duration(90, "k") == 90.0


def _collator(**kw) -> MaskingCollator:
    return MaskingCollator(mask_token_id=99, pad_token_id=1, special_ids=(0, 1, 2, 3), vocab_size=100, seed=5, **kw)


def test_the_masking_rate_follows_its_schedule_per_step() -> None:
    c = _collator(probability=0.15, start_probability=0.4, anneal_steps=10)
    assert MaskSchedule(0.15, 0.4, 10)(5) == pytest.approx(0.275) and c.rate(None) == 0.15 and c.rate(99) == 0.15
    rng = np.random.default_rng(0)
    rows = [np.concatenate([[0], rng.integers(4, 99, size=98), [2]]) for _ in range(4)]  # 98 candidates each
    for step, rate in ((0, 0.4), (5, 0.275), (10, 0.15), (None, 0.15)):
        items = [{"input_ids": r, "index": i, "epoch": 0, **({} if step is None else {"step": step})}
                 for i, r in enumerate(rows)]
        batch = c(items)
        real = batch["masked_targets"] != IGNORE
        assert int(real.sum()) == 4 * int(np.floor(rate * 98 + 0.5)), step
        # one static shape for the whole schedule: slots bounded at the highest rate
        assert batch["masked_targets"].shape == (4 * int(np.floor(0.4 * 100 + 0.5)),)
        again = c(items)
        assert torch.equal(batch["input_ids"], again["input_ids"])  # a pure function of (seed, epoch, index, step)
    # the step's divisor counts at the step's rate
    items[0]["step_blocks"] = rows
    items[0]["step"] = 0
    assert c([items[0]])["step_counts"].tolist() == [4 * int(np.floor(0.4 * 98 + 0.5)), 4]


def test_decide_max_steps_spends_the_rest_of_the_budget_at_the_measured_rate() -> None:
    # 30 s budget, 4 steps took 4 s, 1 s a step of 8 sequences plus validation 0.1 s a step: 26 / 1.1 = 23 more
    fixed = BatchSchedule(8, 4)
    assert decide_max_steps(30.0, 4.0, 4, 1 / 8, 0.1, 5, fixed) == 27
    assert decide_max_steps(3.0, 4.0, 4, 1 / 8, 0.0, 9, fixed) == 9  # over budget already: still past warmup
    # during batch-size warmup the remaining time buys sequences, in the growing steps
    growing = BatchSchedule(8, 4, start_size=2, warmup_tokens=48, seq_len=4)  # 2 micro-batches a step
    # tokens before each step 0, 8, 16, 32: 2 + 6 x tokens / 48 -> 2, 3, 4, 6 in multiples of 2; then full
    assert [growing.size(s) for s in range(6)] == [2, 2, 4, 6, 8, 8] and growing.offset(6) == 30
    assert decide_max_steps(10.0, 0.0, 2, 1.0, 0.0, 0, growing) == 4  # 10 sequences: steps 2 and 3 (4 + 6)
    assert decide_max_steps(40.0, 0.0, 2, 1.0, 0.0, 0, growing) == 7  # 4 + 6, then 30 left: 3 steps of 8


SCHEDULED = ["--masking.start_probability=0.3", "--masking.anneal_steps=16", "--optim.schedule=wsd"]


def test_a_stable_phase_checkpoint_decays_into_the_same_run_bitwise(
        shards, corpus_file: Path, tmp_path: Path) -> None:  # noqa: F811
    """wsd over 20 steps with the last 6 decaying, in one go; and a stable-only run of 14 steps whose step-10
    checkpoint is continued in a new run_dir with max_steps 20 and decay_steps 6 (crossing the masking anneal
    too): the same weights."""
    _, meta = shards
    whole = fit(config(tmp_path / "whole", corpus_file, *SCHEDULED, "--optim.decay_steps=6"), meta, resume=False,
                **QUIET)
    run = tmp_path / "branch"
    stable = fit(config(run, corpus_file, *SCHEDULED, "--optim.decay_fraction=0", "--trainer.max_steps=14"), meta,
                 resume=False, **QUIET)
    # every update at the peak; the rate after the last one (never applied) is the floor, as transformers'
    assert [stable.lightning_module.lr_schedule(s) for s in range(4, 14)] == [1.0] * 10
    assert stable.optimizers[0].param_groups[0]["lr"] == 0.0
    decayed = fit(config(tmp_path / "decay", corpus_file, *SCHEDULED, "--optim.decay_steps=6"), meta, resume=True,
                  ckpt=run / "checkpoints" / "step-0000010.ckpt", **QUIET)
    assert decayed.global_step == 20 and decayed.optimizers[0].param_groups[0]["lr"] == 0.0
    expected = final_weights(whole)
    assert all(torch.equal(final_weights(decayed)[k], v) for k, v in expected.items())


class FakeClock:
    """time.perf_counter for budget.py: `tick` seconds per call, so the decision is the same on every machine."""

    def __init__(self, tick: float):
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


def test_max_time_decides_max_steps_once_and_a_resumed_run_keeps_it(
        shards, corpus_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    _, meta = shards
    budgeted = ["--trainer.max_time=30", "--trainer.calibration_steps=4", "--optim.warmup_steps=4",
                "--trainer.max_steps=5"]  # ignored: the budget decides
    monkeypatch.setattr(budget_module, "clock", FakeClock(1.0))
    whole = fit(config(tmp_path / "whole", corpus_file, *budgeted), meta, resume=False, **QUIET)
    # start 1 s, steps end at 2..5 s: 1 s a step, 4 s spent; validation 4 batches / 2 micro-batches / 3 every
    # 10 steps = 0.0667 s a step: (30 - 4) / 1.0667 = 24.4 -> 4 + 24 steps
    assert whole.global_step == 28 == whole.max_steps
    decision = json.loads((tmp_path / "whole" / "logs" / "budget.json").read_text())
    assert decision["max_steps"] == 28 and decision["calibration_steps"] == 4 and decision["step_time_s"] == 1.0
    last = torch.load(tmp_path / "whole" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["budget"] == decision and last["hyper_parameters"]["config"]["trainer"]["max_steps"] == 28
    assert whole.optimizers[0].param_groups[0]["lr"] == 0.0  # the linear schedule ended at the decided step

    # the same run stopped at step 12 (checkpoint of step 10), resumed on a machine 10x slower: same max_steps,
    # same weights
    import pytorch_lightning as pl

    class StopAt(pl.Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            trainer.should_stop = trainer.should_stop or trainer.global_step >= 12

    monkeypatch.setattr(budget_module, "clock", FakeClock(1.0))
    run = tmp_path / "stopped"
    with pytest.raises(TrainingIncomplete, match="training stopped at step 12 of trainer.max_steps=28"):
        fit(config(run, corpus_file, *budgeted), meta, resume=False, callbacks=[StopAt()], **QUIET)
    monkeypatch.setattr(budget_module, "clock", FakeClock(10.0))
    resumed = fit(config(run, corpus_file, *budgeted), meta, resume=True, **QUIET)
    assert resumed.global_step == 28
    expected = final_weights(whole)
    assert all(torch.equal(final_weights(resumed)[k], v) for k, v in expected.items())


def _stream(world: int, growth: BatchSchedule, steps: int, start: int = 0) -> list[list[list[int]]]:
    """Per step, the positions each micro-batch of each rank reads, in global micro-batch order (a x W + r)."""
    from pretrain.training.samplers import StepBatches, StepSampler

    per_rank = []
    for rank in range(world):
        sampler = StepSampler(10_000, 0, growth.G, growth.G // growth.n, world, rank, start, steps, batches=growth)
        sampler._at = lambda g: (0, g)  # positions, not blocks: the arithmetic is under test
        batches = StepBatches(sampler, lambda s: growth.micro(s), growth.n // world, start)
        per_rank.append([[g for _, g in mb] for mb in batches])
    A = growth.n // world
    out = []
    for s in range(steps - start):
        out.append([per_rank[r][s * A + a] for a in range(A) for r in range(world)])
    return out


def test_batch_warmup_grows_in_whole_sequences_per_micro_batch_and_the_order_ignores_the_device_count() -> None:
    cfg = load_config(None, ["--batch.global_size=16", "--batch.micro_size=4", "--batch.start_size=4",
                             "--batch.warmup_tokens=256", "--data.seq_len=8"])
    growth = BatchSchedule.from_config(cfg.batch, cfg.data.seq_len)
    sizes = [growth.size(s) for s in range(12)]
    assert sizes[0] == 4 and sizes[-1] == 16 and sizes == sorted(sizes) and all(s % 4 == 0 for s in sizes)
    one, two = _stream(1, growth, 12), _stream(2, growth, 12)
    assert one == two  # the same sequences in the same micro-batch slots on 1 device or 2
    flat = [g for step in one for mb in step for g in mb]
    assert flat == list(range(growth.offset(12)))  # contiguous: no sequence skipped or read twice
    assert [sum(len(mb) for mb in step) for step in one] == sizes
    assert _stream(2, growth, 12, start=5) == one[5:]  # a resume finds its place by arithmetic
    with pytest.raises(ConfigError, match=r"batch.start_size=6 must be a multiple of the 4 micro-batches per step"):
        load_config(None, ["--batch.global_size=16", "--batch.micro_size=4", "--batch.start_size=6",
                           "--batch.warmup_tokens=100"])


def test_batch_warmup_trains_and_resumes_bitwise_mid_ramp(
        shards, corpus_file: Path, tmp_path: Path) -> None:  # noqa: F811
    _, meta = shards
    import pytorch_lightning as pl

    ramp = ["--batch.start_size=2", "--batch.warmup_tokens=1024"]  # 2 -> 8 sequences over ~9 steps of seq 32
    rows: list[int] = []

    class Rows(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            rows.append(batch["input_ids"].shape[0])

    whole = fit(config(tmp_path / "whole", corpus_file, *ramp), meta, resume=False, callbacks=[Rows()], **QUIET)
    growth = BatchSchedule(8, 4, 2, 1024, 32)
    assert rows == [growth.micro(s) for s in range(20) for _ in range(2)] and rows[0] == 1 and rows[-1] == 4
    run = tmp_path / "stopped"
    fit(config(run, corpus_file, *ramp), meta, resume=False, max_steps=5, **QUIET)
    resumed = fit(config(run, corpus_file, *ramp), meta, resume=True, **QUIET)
    assert resumed.global_step == 20
    expected = final_weights(whole)
    assert all(torch.equal(final_weights(resumed)[k], v) for k, v in expected.items())
