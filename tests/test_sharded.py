"""Sharded (FSDP2) checkpoints on one process: a directory of `torch.distributed.checkpoint` shards plus Lightning's
meta.pt, written by the strategy's own save (sharding.py's `ShardedStrategy`, Lightning's ModelParallelStrategy
underneath; without a process group its collectives are no-ops), from a CPU run's checkpoint: choosing, probing,
exporting and reading the rollback record work on it as on a file, and a save is swapped in whole. The same
layout written by 2 ranks that trained: tests/test_fsdp.py."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pretrain.hf.export import export
from pretrain.training.checkpoint import load_full, probe, resumable_checkpoint
from pretrain.training.sharding import ShardedStrategy
from pretrain.training.train import fit

from .test_train import QUIET, config, corpus_file  # noqa: F401 - fixtures


def to_sharded(ckpt: Path, directory: Path) -> None:
    """What `trainer.strategy: fsdp` writes: model and optimizer through torch.distributed.checkpoint (as
    `state_dict` and `optimizer_0`), everything else in meta.pt."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no process group: saving as one process"
        ShardedStrategy().save_checkpoint(torch.load(ckpt, map_location="cpu", weights_only=True), directory)


def test_a_sharded_checkpoint_is_found_probed_and_exported_like_a_file(corpus_file: Path,  # noqa: F811
                                                                       tmp_path: Path) -> None:
    from data_prep.prepare import prepare_data

    run = tmp_path / "run"
    cfg = config(run, corpus_file, "--trainer.max_steps=10")
    fit(cfg, prepare_data(cfg, log=lambda *_: None), resume=False, **QUIET)
    ckpts = run / "checkpoints"
    plain = export(cfg, ckpts / "step-0000010.ckpt", tmp_path / "from-file", log=lambda *_: None)

    to_sharded(ckpts / "step-0000010.ckpt", tmp_path / "sharded")
    assert sorted(p.name for p in (tmp_path / "sharded").iterdir()) == [".metadata", "__0_0.distcp", "meta.pt"]
    shutil.copy(ckpts / "step-0000010.ckpt", tmp_path / "step-0000010.ckpt")
    for p in ckpts.iterdir():
        p.unlink()
    shutil.copytree(tmp_path / "sharded", ckpts / "step-0000010.ckpt")
    assert probe(ckpts / "step-0000010.ckpt") == (10, None)
    assert resumable_checkpoint(ckpts, log=lambda *_: None) == (ckpts / "step-0000010.ckpt", 10)
    full = load_full(ckpts / "step-0000010.ckpt")
    written = torch.load(tmp_path / "step-0000010.ckpt", weights_only=True)
    assert full["global_step"] == 10 and "rollbacks" in full and full.keys() == written.keys()
    assert all(torch.equal(full["state_dict"][k], v) for k, v in written["state_dict"].items())
    assert full["optimizer_states"][0]["param_groups"] == written["optimizer_states"][0]["param_groups"]

    sharded = export(cfg, None, tmp_path / "from-shards", log=lambda *_: None)  # the newest: the directory
    a, b = load_file(plain / "model.safetensors"), load_file(sharded / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    (ckpts / "step-0000010.ckpt" / ".metadata").unlink()  # a damaged directory is reported, not used
    step, problem = probe(ckpts / "step-0000010.ckpt")
    assert step is None and problem
    seen = []
    assert resumable_checkpoint(ckpts, log=seen.append) is None
    assert "is unreadable" in seen[0]


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_sharded_saves_are_swapped_in_whole_and_a_failed_one_keeps_the_previous(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ShardedStrategy.save_checkpoint on one process (no process group: its collectives are no-ops)."""
    import pytorch_lightning.strategies.model_parallel as lightning_fsdp

    strategy = ShardedStrategy()
    path = tmp_path / "last.ckpt"

    def checkpoint(step: int) -> dict:
        return {"state_dict": {"model.w": torch.full((4,), float(step))}, "optimizer_states": [],
                "global_step": step, "hyper_parameters": {}}

    strategy.save_checkpoint(checkpoint(3), path)
    strategy.save_checkpoint(checkpoint(4), path)
    assert probe(path) == (4, None) and torch.equal(load_full(path)["state_dict"]["model.w"], torch.full((4,), 4.0))

    def interrupted(state, directory):  # a crash after some shards were written
        (Path(directory) / "__0_0.distcp").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lightning_fsdp, "_distributed_checkpoint_save", interrupted)
    with pytest.raises(OSError, match="No space left"):
        strategy.save_checkpoint(checkpoint(5), path)
    assert probe(path) == (4, None)  # the previous checkpoint, whole
    monkeypatch.undo()
    strategy.save_checkpoint(checkpoint(6), path)  # the leftover temporary directory is cleared
    assert probe(path) == (6, None) and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
