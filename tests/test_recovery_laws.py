"""Laws of recovery, stated once and searched for a counter-example (hypothesis, bounded to seconds):

- The step -> data mapping under any sequence of rollbacks (steps.data_step, rollback.RollbackState) equals a
  brute-force replay of the data stream: each step reads what the replay reads, no data reported as skipped is
  ever read, and no data is dropped that was not skipped; a checkpoint's record keeps the mapping, also an old
  record of summed offsets.
- Resume from any set of surviving checkpoint files (last.ckpt, step-*.ckpt, truncated files, damaged or intact
  sharded directories, a sharded swap's `.NAME.old`, Lightning's `-vK` names) picks the newest complete one by
  its step (on a tie the later write, then last.ckpt); and, given the files an older run left, only among those
  written since.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pretrain.training.checkpoint import AtomicCheckpointIO, checkpoint_versions, resumable_checkpoint
from pretrain.training.rollback import Diverged, RollbackState
from pretrain.training.steps import data_step

# --- the step -> data mapping ------------------------------------------------------------------------------


class Replay:
    """The data stream as a run consumes it, step by step: a step takes the next datum; a rollback to step r
    whose bad steps first..d were seen drops what they read and puts back, in order, what steps r..first-1
    read (they were good and read it again)."""

    def __init__(self) -> None:
        self.read: list[int] = []  # read[s]: the datum of step s in the current history
        self.pending: list[int] = []  # read once, put back by a rollback, to be read again first
        self.fresh = 0  # the next datum never read

    def train_to(self, steps: int) -> None:
        while len(self.read) < steps:
            if self.pending:
                self.read.append(self.pending.pop(0))
            else:
                self.read.append(self.fresh)
                self.fresh += 1

    def roll_back(self, resumed_from: int, first_bad: int) -> list[int]:
        """The data dropped; the bad steps run up to the last step trained (where the divergence is seen)."""
        first = max(first_bad, resumed_from)
        dropped = self.read[first:]
        self.pending = self.read[resumed_from:first] + self.pending
        del self.read[resumed_from:]
        return dropped


@st.composite
def rollback_histories(draw) -> list[tuple[int, int, int]]:
    """(steps trained to, resumed from, first bad step) per rollback: a run trains on, diverges at any step
    since its last restart, and resumes from any step up to it, also earlier than an earlier bad step."""
    history, restart = [], 0
    for _ in range(draw(st.integers(0, 6))):
        end = draw(st.integers(restart + 1, restart + 12))  # detected at step end - 1
        first_bad = draw(st.integers(restart, end - 1))
        resumed_from = draw(st.integers(0, first_bad))
        history.append((end, resumed_from, first_bad))
        restart = resumed_from
    return history


def expand(runs: list[list[int]]) -> list[int]:
    """Inclusive [first, last] runs as the data steps they hold."""
    return [s for first, last in runs for s in range(first, last + 1)]


@settings(max_examples=300, deadline=None)
@given(rollback_histories())
def test_step_to_data_under_any_rollbacks_equals_a_replay_of_the_stream(history) -> None:
    replay, state, skipped = Replay(), RollbackState(), []
    for end, resumed_from, first_bad in history:
        replay.train_to(end)
        dropped = replay.roll_back(resumed_from, first_bad)
        state = state.after(Diverged(first_bad, end - 1, float("nan")), resumed_from)
        assert expand(state.events[-1]["skipped_data_steps"]) == dropped  # the event says what was skipped
        skipped += dropped
        state = RollbackState.from_dict(state.to_dict())  # as a checkpoint carries it
    horizon = max((end for end, _, _ in history), default=0) + 10
    replay.train_to(horizon)
    assert [data_step(s, state.skipped_data) for s in range(horizon)] == replay.read
    assert not set(skipped) & set(replay.read)  # skipped data is never read
    assert sorted(skipped + replay.read) == list(range(replay.fresh))  # nothing else is dropped
    assert expand([[f, f + c - 1] for f, c in state.skipped_data]) == sorted(skipped)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 6)), max_size=6))
def test_an_old_record_of_summed_offsets_keeps_its_mapping(skips) -> None:
    """Checkpoints written before `skipped_data` hold `skips`, (optimizer step, count) pairs whose counts were
    summed: loaded, every step reads what it read then (also where that mapping was the bug)."""
    state = RollbackState.from_dict({"skips": [list(s) for s in skips], "events": []})
    old = [s + sum(count for at, count in skips if s >= at) for s in range(60)]
    assert [data_step(s, state.skipped_data) for s in range(60)] == old
    firsts = [f for f, _ in state.skipped_data]
    assert firsts == sorted(firsts) and all(c > 0 for _, c in state.skipped_data)
    assert all(f + c < nxt for (f, c), nxt in zip(state.skipped_data, firsts[1:], strict=False))  # disjoint, merged


# --- choosing what to resume from ------------------------------------------------------------------------

KINDS = ("file", "truncated", "dir", "damaged_dir", "old_dir", "damaged_old_dir", "dir_beside_old")
"""How a checkpoint name survives: a whole file or sharded directory, a truncated file, a sharded directory
without its `.metadata`, only `.NAME.old` (a sharded swap cut short between its renames, whole or not), or NAME
beside a stale `.NAME.old` (a swap cut short while removing the old copy: it is never considered)."""


@pytest.fixture(scope="module")
def sharded_template(tmp_path_factory) -> Path:
    """The shards of a sharded checkpoint (torch.distributed.checkpoint on one process); meta.pt is added per
    copy, as Lightning's FSDP writes it."""
    import torch.distributed.checkpoint as dcp

    directory = tmp_path_factory.mktemp("sharded") / "template"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no process group: saving as one process"
        dcp.save({"model": {"w": torch.zeros(2)}}, checkpoint_id=directory)
    return directory


def write(path: Path, step: int, kind: str, template: Path) -> None:
    """A checkpoint of `step` at `path` as a run writes it: a file by AtomicCheckpointIO (a temporary file
    renamed), a directory written aside and renamed in."""
    if kind in ("file", "truncated"):
        AtomicCheckpointIO().save_checkpoint({"global_step": step, "state_dict": {}}, path)
        if kind == "truncated":
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])
        return
    tmp = path.with_name(f"{path.name}.writing")
    shutil.copytree(template, tmp)
    torch.save({"global_step": step}, tmp / "meta.pt")
    if kind.startswith("damaged"):
        (tmp / ".metadata").unlink()
    tmp.rename(path)


def lay_out(directory: Path, name: str, step: int, kind: str, stale_step: int, template: Path) -> tuple[Path, bool]:
    """Write `name` as `kind`; returns the path resume should consider for it and whether it is complete."""
    old = directory / f".{name}.old"
    if kind in ("old_dir", "damaged_old_dir"):
        write(old, step, "dir" if kind == "old_dir" else "damaged_dir", template)
        return old, kind == "old_dir"
    if kind == "dir_beside_old":
        write(old, stale_step, "dir", template)
        kind = "dir"
    write(directory / name, step, kind, template)
    return directory / name, kind in ("file", "dir")


survivors = st.tuples(
    st.one_of(st.none(), st.tuples(st.integers(0, 30), st.sampled_from(KINDS), st.integers(0, 30), st.booleans())),
    st.dictionaries(st.tuples(st.integers(0, 30), st.integers(0, 1)),
                    st.tuples(st.sampled_from(KINDS), st.integers(0, 30), st.booleans()), max_size=4),
)
"""(last.ckpt: (step, kind, stale .old's step, written by an older run) or None, {(step, K): (kind, stale step,
older)} of the step checkpoints, `step-NNNNNNN-vK.ckpt` for K > 0 as Lightning names one whose name is taken)."""


@settings(max_examples=100, deadline=None)
@given(survivors)
def test_resume_picks_the_newest_complete_checkpoint_of_any_survivors(sharded_template: Path, files) -> None:
    last, steps = files
    entries = ([("last.ckpt", *last)] if last else []) + [
        (f"step-{step:07d}{f'-v{k}' if k else ''}.ckpt", step, kind, stale, older)
        for (step, k), (kind, stale, older) in steps.items()]
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        considered = {}  # path -> (step, complete, written by an older run)
        # the older run's files first, then this run's: a checkpoint written since has a version not seen before
        for phase in (True, False):
            for name, step, kind, stale, older in entries:
                if older == phase:
                    path, complete = lay_out(directory, name, step, kind, stale, sharded_template)
                    considered[path] = (step, complete, older)
            if phase:
                before = checkpoint_versions(directory)

        def newest(paths) -> tuple[Path, int] | None:
            """The highest step; on a tie the one written last, then last.ckpt, then the highest K."""
            whole = [((step, p.stat().st_mtime_ns, p.name in ("last.ckpt", ".last.ckpt.old"), "-v1" in p.name), p)
                     for p in paths for step, complete, _ in [considered[p]] if complete]
            return (max(whole)[1], max(whole)[0][0]) if whole else None

        warned: list[str] = []
        assert resumable_checkpoint(directory, warned.append) == newest(considered)
        assert all(not considered[Path(w.split()[2])][1] for w in warned)  # only incomplete ones are reported
        assert resumable_checkpoint(directory, lambda _: None, before) == newest(
            [p for p, (_, _, older) in considered.items() if not older])


def test_a_step_checkpoint_newer_than_last_ckpt_wins(tmp_path: Path) -> None:
    """A kill between the two writes of a save (step checkpoint first, then last.ckpt) leaves last.ckpt a save
    behind: resume takes the newer step checkpoint; on a tie the later write, last.ckpt within a run."""
    io = AtomicCheckpointIO()
    for name, step in (("step-0000010.ckpt", 10), ("last.ckpt", 5), ("step-0000005.ckpt", 5)):
        io.save_checkpoint({"global_step": step, "state_dict": {}}, tmp_path / name)
    assert resumable_checkpoint(tmp_path) == (tmp_path / "step-0000010.ckpt", 10)
    io.save_checkpoint({"global_step": 10, "state_dict": {}}, tmp_path / "last.ckpt")
    assert resumable_checkpoint(tmp_path) == (tmp_path / "last.ckpt", 10)
    # another run in this run_dir saves step 10 again (Lightning names it -v1) and dies before its last.ckpt
    io.save_checkpoint({"global_step": 10, "state_dict": {}}, tmp_path / "step-0000010-v1.ckpt")
    os.utime(tmp_path / "step-0000010-v1.ckpt", ns=(time.time_ns() + 10**9,) * 2)  # written after last.ckpt
    assert resumable_checkpoint(tmp_path) == (tmp_path / "step-0000010-v1.ckpt", 10)
