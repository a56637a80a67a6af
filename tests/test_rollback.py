"""A non-finite or spiking loss is rolled back: the run restores its last checkpoint, skips the bad steps' data
exactly, and finishes; after optim.max_rollbacks it stops with a message. Also the device-side monitor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pretrain.training.module import MLMModule
from pretrain.training.rollback import DivergenceMonitor, RollbackState, TrainingDiverged
from pretrain.training.steps import data_step
from pretrain.training.train import fit

from .test_train import QUIET, config, corpus_file, final_weights, shards  # noqa: F401 - fixtures


def poison(monkeypatch: pytest.MonkeyPatch, bad, factor: float = float("nan")) -> list[int]:
    """Multiply the loss of the steps for which bad(optimizer step, data step, rollbacks so far) holds by
    `factor`; returns the list of (optimizer) steps poisoned, one entry per micro-batch."""
    original, hits = MLMModule._losses, []

    def losses(self, batch):
        out = original(self, batch)
        step = self.global_step
        if self.training and bad(step, data_step(step, self.rollbacks.skipped_data), len(self.rollbacks.events)):
            hits.append(step)
            out["mlm_sum"] = out["mlm_sum"] * factor
        return out

    monkeypatch.setattr(MLMModule, "_losses", losses)
    return hits


def test_a_nan_from_bad_data_is_rolled_back_past_that_data_and_the_run_finishes(
        shards, corpus_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    _, meta = shards
    run = tmp_path / "nan"
    hits = poison(monkeypatch, lambda step, data, _: data == 7)  # the data of step 7 is "corrupt"
    trainer = fit(config(run, corpus_file), meta, resume=False, **QUIET)
    assert trainer.global_step == 20 and hits == [7, 7]  # 2 micro-batches of step 7, once
    events = [json.loads(line) for line in (run / "logs" / "rollbacks.jsonl").read_text().splitlines()]
    assert len(events) == 1 and events[0]["step"] == 7 and events[0]["detected_at"] == 7
    assert events[0]["resumed_from"] == 5 and events[0]["skipped_data_steps"] == [[7, 7]]
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["rollbacks"]["skipped_data"] == [[7, 1]] and len(last["rollbacks"]["events"]) == 1
    assert all(torch.isfinite(v).all() for v in final_weights(trainer).values())
    # exact: a run that is told from the start to skip step 7's data ends with the same weights
    monkeypatch.undo()
    from pretrain.training import train

    reference = train._fit_once(config(tmp_path / "told", corpus_file), meta, None,
                                RollbackState([[7, 1]], []), None, dict(QUIET))
    expected = final_weights(reference)
    assert all(torch.equal(final_weights(trainer)[k], v) for k, v in expected.items())


def test_divergence_that_persists_stops_after_max_rollbacks(
        shards, corpus_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    _, meta = shards
    run = tmp_path / "persist"
    poison(monkeypatch, lambda step, data, _: step >= 7)  # the model, not the data: every step from 7 on
    with pytest.raises(TrainingDiverged, match=r"loss nan at step 7 \(seen at step 7\) after 2 rollback\(s\) "
                       r"\(optim.max_rollbacks=2\): stopping. Last good checkpoint: .*last.ckpt \(step 5\)"):
        fit(config(run, corpus_file, "--optim.max_rollbacks=2", "--checkpoint.keep_last=5"), meta, resume=False,
            **QUIET)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt", "step-0000005.ckpt"]
    assert len((run / "logs" / "rollbacks.jsonl").read_text().splitlines()) == 2


def test_a_spike_is_rolled_back_and_the_rate_lowered(
        shards, corpus_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    _, meta = shards
    run = tmp_path / "spike"
    poison(monkeypatch, lambda step, data, _: data == 12, factor=5.0)
    trainer = fit(config(run, corpus_file, "--optim.spike_window=3", "--optim.spike_factor=2",
                         "--optim.rollback_lr_factor=0.5"), meta, resume=False, **QUIET)
    assert trainer.global_step == 20
    event = json.loads((run / "logs" / "rollbacks.jsonl").read_text())
    assert event["step"] == 12 and event["resumed_from"] == 10 and event["loss"] > 2 * 3
    # the schedule after the rollback is the normal one x 0.5
    from pretrain.training.schedules import LRSchedule

    lr = trainer.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(3e-3 * LRSchedule("linear", 4, 20)(20) * 0.5, abs=1e-12)


def test_monitor_flags_the_first_nonfinite_or_spiking_step_on_the_device() -> None:
    m = DivergenceMonitor(spike_factor=2.0, window=3)
    for step, loss in enumerate([6.0, 5.0, 4.0, 7.9]):  # 7.9 < 2 x mean(6, 5, 4) = 10: no spike
        m.update(torch.tensor(loss, dtype=torch.float64), step)
    assert m.poll() is None
    m.update(torch.tensor(13.0), 4)  # > 2 x mean(5, 4, 7.9)
    m.update(torch.tensor(float("nan")), 5)
    assert m.poll() == (4, 13.0)  # the first bad step, and bad steps never enter the window
    assert m.history.tolist() == [5.0, 4.0, 7.9]
    early = DivergenceMonitor(spike_factor=2.0, window=3)
    early.update(torch.tensor(1.0), 0)
    early.update(torch.tensor(100.0), 1)  # no spike before the window is full
    assert early.poll() is None
    early.update(torch.tensor(float("inf")), 2)
    assert early.poll() == (2, float("inf"))


def test_data_steps_skip_past_each_rollback() -> None:
    skipped = RollbackState().after(_diverged(7, 9), resumed_from=5).skipped_data  # steps 7..9's data skipped
    assert skipped == [[7, 3]]
    assert [data_step(s, skipped) for s in range(5, 10)] == [5, 6, 10, 11, 12]
    state = RollbackState(skipped, [])
    later = state.after(_diverged(11, 11), resumed_from=10)  # optimizer step 11 read data step 14
    assert later.skipped_data == [[7, 3], [14, 1]] and later.events[0]["skipped_data_steps"] == [[14, 14]]
    assert [data_step(s, later.skipped_data) for s in range(9, 13)] == [12, 13, 15, 16]


def test_a_second_rollback_earlier_than_the_first_skip_reads_none_of_the_skipped_data() -> None:
    """The issue's case: data 105-109 skipped, then a replay diverges at step 103 (seen at 104). Summed offsets
    made steps 103-104 read the skipped data 105-106 and dropped the good data 110-111."""
    first = RollbackState().after(_diverged(105, 109), resumed_from=100)
    second = first.after(_diverged(103, 104), resumed_from=100)
    assert second.events[-1]["skipped_data_steps"] == [[103, 104]]
    assert [data_step(s, second.skipped_data) for s in range(100, 106)] == [100, 101, 102, 110, 111, 112]
    across = first.after(_diverged(103, 105), resumed_from=100)  # its bad steps read 103, 104 and 110
    assert across.events[-1]["skipped_data_steps"] == [[103, 104], [110, 110]]
    assert across.skipped_data == [[103, 8]]


def test_an_old_checkpoints_skips_keep_their_meaning() -> None:
    """Records written before `skipped_data`: (optimizer step, count) pairs whose counts were summed, events
    with one [first, last] pair. Loaded, every step reads what it read then, even the buggy double skip."""
    old = {"skips": [[105, 5], [103, 2]], "events": [{"skipped_data_steps": [105, 109]}]}
    state = RollbackState.from_dict(old)
    assert state.skipped_data == [[103, 2], [107, 5]]
    summed = [s + sum(c for at, c in old["skips"] if s >= at) for s in range(100, 110)]
    assert [data_step(s, state.skipped_data) for s in range(100, 110)] == summed
    assert state.events[0]["skipped_data_steps"] == [[105, 109]]
    assert RollbackState.from_dict(state.to_dict()) == state


def _diverged(first: int, seen: int):
    from pretrain.training.rollback import Diverged

    return Diverged(first, seen, float("nan"))


def test_a_replay_that_diverges_earlier_reads_none_of_the_data_skipped_before(
        shards, corpus_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """Data step 12 diverges; the replay from step 10 then diverges at step 11 (as with a lowered rate or
    nondeterministic kernels): step 11 must read data 13, not the data 12 skipped before, and the run must end
    as one told from the start to skip data 11 and 12."""
    _, meta = shards
    run = tmp_path / "earlier"
    hits = poison(monkeypatch, lambda step, data, rollbacks: data == 12 if not rollbacks else (rollbacks, step) == (1, 11))
    trainer = fit(config(run, corpus_file, "--trainer.max_steps=14"), meta, resume=False, **QUIET)
    assert trainer.global_step == 14 and hits == [12, 12, 11, 11]
    events = [json.loads(line) for line in (run / "logs" / "rollbacks.jsonl").read_text().splitlines()]
    assert [(e["step"], e["resumed_from"], e["skipped_data_steps"]) for e in events] == [
        (12, 10, [[12, 12]]), (11, 10, [[11, 11]])]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["rollbacks"]["skipped_data"] == [[11, 2]]
    monkeypatch.undo()
    from pretrain.training import train

    reference = train._fit_once(config(tmp_path / "told", corpus_file, "--trainer.max_steps=14"), meta, None,
                                RollbackState([[11, 2]], []), None, dict(QUIET))
    expected = final_weights(reference)
    assert all(torch.equal(final_weights(trainer)[k], v) for k, v in expected.items())



@pytest.fixture(scope="module")
def stable(shards, corpus_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """A finished 15-step run with a checkpoint every 5 steps, all kept: a stable phase to continue from."""
    run = tmp_path_factory.mktemp("stable")
    fit(config(run, corpus_file, "--trainer.max_steps=15", "--checkpoint.keep_last=5"), shards[1], resume=False,
        **QUIET)
    return run


@pytest.mark.parametrize("run_dir", ["new", "same"])
def test_a_run_started_from_a_checkpoint_rolls_back_to_it_never_to_an_older_runs_file(
        run_dir: str, stable: Path, shards, corpus_file: Path, tmp_path: Path,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's decay recipe, `make resume CKPT=.../step-0000010.ckpt` with max_steps=14, diverging at step
    12, before its first save (step 14). It used to restart from random weights at step 0 in a new run_dir, and
    in the stable run's own run_dir to take that run's last.ckpt (step 15, past max_steps) and end at once."""
    _, meta = shards
    run = tmp_path / "decay"
    if run_dir == "same":
        shutil.copytree(stable, run)
    ckpt = (run if run_dir == "same" else stable) / "checkpoints" / "step-0000010.ckpt"
    hits = poison(monkeypatch, lambda step, data, rollbacks: data == 12 and not rollbacks)
    trainer = fit(config(run, corpus_file, "--trainer.max_steps=14"), meta, ckpt=ckpt, **QUIET)
    assert trainer.global_step == 14 and hits == [12, 12]
    event = json.loads((run / "logs" / "rollbacks.jsonl").read_text())
    assert (event["step"], event["resumed_from"], event["skipped_data_steps"]) == (12, 10, [[12, 12]])
    monkeypatch.undo()
    from pretrain.training import train

    told = train._fit_once(config(tmp_path / "told", corpus_file, "--trainer.max_steps=14"), meta,
                           (stable / "checkpoints" / "step-0000010.ckpt", 10), RollbackState([[12, 1]], []), None,
                           dict(QUIET))
    expected = final_weights(told)
    assert all(torch.equal(final_weights(trainer)[k], v) for k, v in expected.items())
