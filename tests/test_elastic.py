"""Many processes for real (Lightning DDP, gloo, 2 CPU ranks): a run resumes on another device count at the exact
step and data position and runs to max_steps; every rank resumes exactly without stored RNG state; and each
rank's dropout is the one its micro-batch has on any device count."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain.training.steps import reseed, step_seed
from pretrain.training.train import fit

from .test_train import FAST, QUIET, config, corpus_file, shards  # noqa: F401 - fixtures

ROOT = Path(__file__).resolve().parent.parent
STEPS = 12
EVERY = ("--checkpoint.every_n_steps=4", "--checkpoint.keep_last=5", f"--trainer.max_steps={STEPS}")
TWO = ("--trainer.devices=2", "--trainer.strategy=ddp")


def cli(command: str, run: Path, corpus: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pretrain", command, f"--run_dir={run}", f"--corpus.train={corpus}",
            "--corpus.valid_fraction=0.1", *FAST, *EVERY, *extra]


def run_cli(*args: str | Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(cli(*args), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def model_weights(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return {k.removeprefix("model."): v for k, v in state.items()}


def assert_close(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor], exact: bool = False) -> None:
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        if exact:
            assert torch.equal(got[name], tensor), f"{name} differs"
        else:  # DDP sums the ranks' gradients in another order than accumulation does
            torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_different_keys_draw_different_dropout_masks() -> None:
    """What each rank's micro-batch draws: (seed, step, micro-batch over ranks) keys give distinct masks, drawn
    after `reseed` as the module's training step reseeds (the CPU's whole mt19937 state, steps.py)."""
    masks = []
    for micro in (0, 1):
        reseed(0, 3, micro)
        masks.append(torch.nn.functional.dropout(torch.ones(1000), 0.1) == 0)
    reseed(0, 3, 0)
    assert torch.equal(masks[0], torch.nn.functional.dropout(torch.ones(1000), 0.1) == 0)
    assert not torch.equal(masks[0], masks[1]) and 50 < int(masks[1].sum()) < 150
    assert len({step_seed(s, t, m) for s in range(3) for t in range(50) for m in range(8)}) == 3 * 50 * 8


@pytest.mark.filterwarnings("ignore:The dirpath has changed")  # the 2 -> 1 leg runs in a copy of the run_dir
def test_one_to_two_to_one_process_resume_runs_to_max_steps_equal_to_uninterrupted(
        shards, corpus_file: Path, tmp_path: Path) -> None:  # noqa: F811
    """Dropout on: 1 process (2 micro-batches per step) to step 4, then 2 ranks (1 each) to max_steps; also
    from the 2-rank run's step-8 checkpoint back to 1 process. Each micro-batch holds the same sequences with the
    same masks and the same dropout on 1 or 2 devices, so all end within float summation order of a run that
    never stopped. (Rank 1 computing with rank 0's dropout, as before, would not.)"""
    _, meta = shards
    reference = fit(config(tmp_path / "ref", corpus_file, *EVERY), meta, resume=False, **QUIET)
    expected = {k: v.detach() for k, v in reference.lightning_module.model.state_dict().items()}

    run = tmp_path / "elastic"
    fit(config(run, corpus_file, *EVERY), meta, resume=False, max_steps=4, **QUIET)
    proc = run_cli("resume", run, corpus_file, *TWO)
    assert f"done: {STEPS} of {STEPS} steps" in proc.stdout
    # the console: one model line with its FLOPs (not Lightning's table with "Total FLOPs: 0", nor its adverts),
    # and the run's throughput over both ranks at the end
    assert proc.stdout.count("MFLOPs per token trained") == 1 and "Total FLOPs" not in proc.stdout
    assert "litlogger" not in proc.stdout + proc.stderr
    assert re.search(r"throughput  [\d,]+ tokens/s, MFU [\d.]+% of", proc.stdout), proc.stdout[-1500:]
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == STEPS and last["geometry"]["world_size"] == 2
    assert "rng" not in last
    assert_close(expected, model_weights(run / "checkpoints" / "last.ckpt"))

    back = tmp_path / "back"  # 2 -> 1 from the 2-rank run's step 8
    shutil.copytree(run, back, ignore=shutil.ignore_patterns("last.ckpt", "step-0000012.ckpt"))
    resumed = fit(config(back, corpus_file, *EVERY), meta, resume=True, **QUIET)
    assert resumed.global_step == STEPS
    assert_close(expected, {k: v.detach() for k, v in resumed.lightning_module.model.state_dict().items()})


def test_a_changed_global_batch_is_refused_naming_both(shards, corpus_file: Path, tmp_path: Path) -> None:  # noqa: F811
    from data_prep.config import ConfigError

    _, meta = shards
    run = tmp_path / "batch"
    fit(config(run, corpus_file, *EVERY), meta, resume=False, max_steps=4, **QUIET)
    with pytest.raises(ConfigError, match=r"batch.global_size \(checkpoint 8, config 16\)"):
        fit(config(run, corpus_file, *EVERY, "--batch.global_size=16"), meta, resume=True, **QUIET)
