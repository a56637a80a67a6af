"""Real processes: SIGTERM saves and stops cleanly, SIGKILL loses only the steps after the last checkpoint,
and either way `resume` ends with the weights of a run that never stopped. Also: two DDP ranks on CPU."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from .test_train import QUIET, config, corpus_file, shards  # noqa: F401 - fixtures

ROOT = Path(__file__).resolve().parent.parent
STEPS = 60


def cli(command: str, run: Path, corpus: Path, *extra: str) -> list[str]:
    from .test_train import FAST

    args = [a for a in FAST if not a.startswith("--trainer.max_steps")]
    return [sys.executable, "-m", "pretrain", command, f"--run_dir={run}", f"--corpus.train={corpus}",
            "--corpus.valid_fraction=0.1", *args, f"--trainer.max_steps={STEPS}", *extra]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def reference(shards, corpus_file: Path, tmp_path_factory) -> dict[str, torch.Tensor]:  # noqa: F811
    """Final weights of a run that never stopped."""
    from pretrain.training.train import fit

    _, meta = shards
    run = tmp_path_factory.mktemp("reference")
    fit(config(run, corpus_file, f"--trainer.max_steps={STEPS}"), meta, resume=False, **QUIET)
    return weights(run / "checkpoints" / "last.ckpt")


def start_and_wait_for(run: Path, corpus: Path, checkpoint: str, *extra: str) -> subprocess.Popen:
    """Training in a process group of its own (its loader workers included), once `checkpoint` exists."""
    proc = subprocess.Popen(cli("fit", run, corpus, *extra), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while not (run / "checkpoints" / checkpoint).exists():
        assert proc.poll() is None, f"training ended early:\n{proc.stdout.read()}"
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.05)
    return proc


def assert_same(reference: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    assert reference.keys() == got.keys()
    for name, tensor in reference.items():
        assert torch.equal(tensor, got[name]), f"{name} differs from the uninterrupted run"


def test_sigterm_saves_stops_and_resumes_exactly(corpus_file: Path, tmp_path: Path, reference) -> None:  # noqa: F811
    """SIGTERM to the whole process group, as SLURM signals every process of a job step: the loader worker must
    leave it to the trainer (a worker killed by it used to fail the run instead of saving)."""
    run = tmp_path / "term"
    proc = start_and_wait_for(run, corpus_file, "step-0000010.ckpt", "--batch.num_workers=1")
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "DataLoader worker" not in out
    assert "preempted (signal 15): saved" in out and "`make resume` continues exactly from here" in out
    stopped_at = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
    assert 10 <= stopped_at < STEPS
    resumed = subprocess.run(cli("resume", run, corpus_file), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"done: {STEPS} of {STEPS} steps" in resumed.stdout
    assert_same(reference, weights(run / "checkpoints" / "last.ckpt"))


def test_sigkill_then_resume_ends_equal(corpus_file: Path, tmp_path: Path, reference) -> None:  # noqa: F811
    run = tmp_path / "kill"
    proc = start_and_wait_for(run, corpus_file, "step-0000015.ckpt")
    proc.kill()
    proc.communicate(timeout=60)
    resumed = subprocess.run(cli("resume", run, corpus_file), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same(reference, weights(run / "checkpoints" / "last.ckpt"))


def test_resume_cli_without_checkpoint_fails_clearly(corpus_file: Path, tmp_path: Path) -> None:  # noqa: F811
    proc = subprocess.run(cli("resume", tmp_path / "empty", corpus_file), cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith("last.ckpt does not exist: nothing to resume (run `make pretrain`)")
    assert "Traceback" not in proc.stderr


def test_two_cpu_ranks_train_like_one_device(shards, corpus_file: Path, tmp_path: Path) -> None:  # noqa: F811
    """DDP (gloo) with 2 ranks x 1 micro-batch = 1 device x 2 accumulated micro-batches: same data, same masks.
    Dropout is off, since each rank draws its own dropout masks."""
    import csv

    from pretrain.training.train import fit

    _, meta = shards
    no_dropout = ("--model.dropout=0", "--model.attention_dropout=0", "--trainer.max_steps=10")
    one = fit(config(tmp_path / "one", corpus_file, *no_dropout), meta, resume=False, **QUIET)
    expected = {k: v.detach() for k, v in one.lightning_module.model.state_dict().items()}
    run = tmp_path / "two"
    proc = subprocess.run(cli("fit", run, corpus_file, *no_dropout, "--trainer.devices=2", "--trainer.strategy=ddp"),
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sync_dist=True" not in proc.stderr  # validation sums are reduced by hand; Lightning's advice is noise
    got = {k[len("model."):]: v for k, v in weights(run / "checkpoints" / "last.ckpt").items()}
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")

    def val_losses(r: Path) -> list[float]:
        with open(r / "logs" / "metrics.csv") as f:
            return [float(row["val/loss"]) for row in csv.DictReader(f) if row.get("val/loss")]

    assert val_losses(run) == pytest.approx(val_losses(tmp_path / "one"), abs=1e-4)


def test_ctrl_c_ends_with_one_line_naming_the_checkpoint_to_resume_from(corpus_file: Path, tmp_path: Path,  # noqa: F811
                                                                        ctrl_c_reaches_children) -> None:
    """Ctrl-C (SIGINT to the whole group, a loader worker included): Lightning shuts down gracefully and used to
    exit 1 with no word; it ends as an interrupted command does and says where `make resume` continues."""
    run = tmp_path / "int"
    proc = start_and_wait_for(run, corpus_file, "step-0000010.ckpt", "--batch.num_workers=1")
    for _ in range(5):  # a KeyboardInterrupt raised where Python ignores exceptions is lost: press again
        os.killpg(proc.pid, signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=10)
            break
        except subprocess.TimeoutExpired:
            continue
    assert proc.returncode == 130, out
    last = out.strip().splitlines()[-1]
    assert last.startswith("interrupted: `make resume` continues from ") and last.endswith(")"), out
    # the newest complete checkpoint: a Ctrl-C between a step checkpoint's write and last.ckpt's leaves the former
    from pretrain.training.checkpoint import resumable_checkpoint

    path, step = resumable_checkpoint(run / "checkpoints")
    assert last.endswith(f"continues from {path} (step {step})") and "Traceback" not in out


def _signalled_as_it_starts(worker_id: int) -> None:
    """A worker's init that first receives SIGTERM, as one starting at the moment of a job's SIGTERM does."""
    from pretrain.training.data import leave_stop_signals_to_the_trainer

    os.kill(os.getpid(), signal.SIGTERM)
    leave_stop_signals_to_the_trainer(worker_id)


@pytest.mark.parametrize("safe", [True, False])
def test_a_loader_worker_signalled_as_it_starts_survives_only_in_the_signal_safe_loader(safe: bool) -> None:
    """Validation's workers start at the first validation, which a preemption can coincide with: a SIGTERM that
    reached a worker before its init ignored it killed it. The signal-safe loader starts workers with the stop
    signals blocked; the plain DataLoader shows what happened before."""
    from torch.utils.data import DataLoader

    from pretrain.training.data import SignalSafeLoader

    kind = SignalSafeLoader if safe else DataLoader
    loader = kind(list(range(8)), batch_size=2, num_workers=1, worker_init_fn=_signalled_as_it_starts)
    if safe:
        assert [b.tolist() for b in loader] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    else:
        with pytest.raises(RuntimeError, match="DataLoader worker"):
            list(loader)


class _Crash(BaseException):
    """The process dies here (nothing after this point runs, no handler cleans up)."""


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_sharded_swap_cut_short_between_its_renames_is_resumed_and_never_deleted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ShardedStrategy (sharding.py) swaps a sharded checkpoint in with two renames (NAME -> .NAME.old, .NAME.tmp -> NAME).
    A crash between them leaves `.last.ckpt.old` the only complete copy: resume must take it (it never looked),
    and the next save must not delete it (it did, first thing), even when that save fails too."""
    import pytorch_lightning.strategies.model_parallel as lightning_fsdp

    from pretrain.training.checkpoint import probe, resumable_checkpoint
    from pretrain.training.sharding import ShardedStrategy

    strategy, path = ShardedStrategy(), tmp_path / "last.ckpt"

    def checkpoint(step: int) -> dict:
        return {"state_dict": {"model.w": torch.full((4,), float(step))}, "optimizer_states": [],
                "global_step": step, "hyper_parameters": {}}

    strategy.save_checkpoint(checkpoint(4), path)
    replace = os.replace

    def crash_before_the_second_rename(src, dst):
        if Path(src).name == ".last.ckpt.tmp":
            raise _Crash
        replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_before_the_second_rename)
    with pytest.raises(_Crash):
        strategy.save_checkpoint(checkpoint(5), path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".last.ckpt.old", ".last.ckpt.tmp"]
    assert resumable_checkpoint(tmp_path) == (tmp_path / ".last.ckpt.old", 4)

    def out_of_space(state, directory):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lightning_fsdp, "_distributed_checkpoint_save", out_of_space)
    with pytest.raises(OSError, match="No space left"):
        strategy.save_checkpoint(checkpoint(6), path)
    monkeypatch.undo()
    assert resumable_checkpoint(tmp_path) == (path, 4)  # put back before the save began
    strategy.save_checkpoint(checkpoint(7), path)
    assert probe(path) == (7, None) and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


class _TermAt(pl.Callback):
    """SIGTERM to this process at the end of optimizer step `step`, as a scheduler's would arrive."""

    def __init__(self, step: int):
        self.step, self.sent = step, False

    def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:
        if trainer.global_step == self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)


def test_a_preemption_before_the_first_step_checkpoint_keeps_last_ckpt_the_newest(
        shards, corpus_file: Path, tmp_path: Path) -> None:  # noqa: F811
    """Lightning 2.6 saves `last` at train end when its callback has not saved it yet, and counts versions past a
    `last.ckpt` it did not write: a preemption before the first step checkpoint left `last-v1.ckpt` (an
    end-of-epoch copy) beside the exact `last.ckpt`, and the resumed run wrote `last-v2.ckpt`, so `last.ckpt` stayed
    at the preempted step for good."""
    from pretrain.training.train import fit

    _, meta = shards
    cfg = config(tmp_path / "run", corpus_file, "--trainer.max_steps=8", "--checkpoint.every_n_steps=100",
                 "--trainer.val_check_interval=100")
    checkpoints = tmp_path / "run" / "checkpoints"
    fit(cfg, meta, resume=False, callbacks=[_TermAt(2)], **QUIET)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt"]
    stopped_at = torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"]
    assert 2 <= stopped_at < 8
    fit(cfg, meta, resume=True, **QUIET)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt", "step-0000008.ckpt"]
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 8


class _CtrlCAsItStarts(torch.utils.data.Sampler):
    """A batch sampler that presses Ctrl-C when the loader's iterator asks for it: inside the iterator's
    construction, before its workers are recorded (torch builds the sampler's iterator first)."""

    def __iter__(self):
        os.kill(os.getpid(), signal.SIGINT)
        return iter([[0, 1], [2, 3]])

    def __len__(self) -> int:
        return 2


def test_ctrl_c_as_loader_workers_start_raises_once_built_and_prints_no_traceback(
        ctrl_c_reaches_children, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C as validation's workers started (the Ctrl-C test hit it now and then): with any other thread alive
    the process-directed SIGINT reaches that thread, and Python raised KeyboardInterrupt in the main thread in the
    middle of the loader iterator's construction; the half-built iterator's __del__ then printed 'Exception
    ignored ... no attribute _workers'. The signal-safe loader holds a Ctrl-C back until the iterator is built."""
    import gc
    import threading

    from pretrain.training.data import SignalSafeLoader

    unraisable = []  # what Python prints as 'Exception ignored in ...' (pytest would turn it into a warning)
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    stop = threading.Event()
    other = threading.Thread(target=stop.wait, daemon=True)  # as Lightning's and torch's threads are
    other.start()
    try:
        loader = SignalSafeLoader(list(range(4)), batch_sampler=_CtrlCAsItStarts(), num_workers=1)
        with pytest.raises(KeyboardInterrupt):
            iter(loader)
        gc.collect()
    finally:
        stop.set()
    assert [repr(u.exc_value) for u in unraisable] == []
