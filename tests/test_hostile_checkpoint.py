"""A checkpoint from outside is data: one whose pickle would run code when loaded (a colleague's file, a download)
is refused with one line by every command that reads checkpoints, and its code never runs (`torch.load` with
`weights_only=True` everywhere: checkpoint.probe, load_full, export)."""

from __future__ import annotations

import pathlib
from pathlib import Path

import torch

from pretrain.__main__ import main as pretrain_main
from pretrain.training.checkpoint import probe, resumable_checkpoint


class _Payload:
    """Unpickling it calls `Path.touch(marker)`: code run by the load, which a weights-only load refuses."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (pathlib.Path.touch, (self.marker,))


def hostile_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"global_step": 7, "state_dict": {}, "payload": _Payload(marker)}, path)
    return path


def test_a_checkpoint_that_would_run_code_is_refused_and_its_code_never_runs(tmp_path: Path, capsys) -> None:
    marker = tmp_path / "pwned"
    ckpts = tmp_path / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    evil = hostile_checkpoint(ckpts / "last.ckpt", marker)

    step, problem = probe(evil)
    assert step is None and "UnpicklingError" in problem
    assert resumable_checkpoint(ckpts, log=lambda *_: None) is None  # resume passes over it
    # export, the command that takes a checkpoint from anywhere
    assert pretrain_main(["export", f"--run_dir={tmp_path / 'run'}", "--ckpt", str(evil),
                          "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: checkpoint {evil} is unreadable") and "\n" not in err
    assert not marker.exists() and not (tmp_path / "hf").exists()

