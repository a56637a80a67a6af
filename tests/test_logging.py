"""logger.tensorboard: a tiny run writes TensorBoard event files under run_dir/logs/tensorboard with the metrics
the CSV log has; off by default."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from data_prep.config import load_config
from data_prep.prepare import prepare_data
from pretrain.training.train import fit

from .conftest import make_documents, write_txt

pytest.importorskip("tensorboardX")

FAST = ["--corpus.valid_fraction=0.1", "--tokenizer.vocab_size=300", "--data.seq_len=32", "--model.hidden_size=32",
        "--model.num_layers=2", "--model.num_heads=2", "--model.intermediate_size=64", "--optim.warmup_steps=1",
        "--batch.global_size=8", "--batch.micro_size=4", "--batch.num_workers=0", "--trainer.accelerator=cpu",
        "--trainer.devices=1", "--trainer.max_steps=4", "--trainer.val_check_interval=4",
        "--trainer.limit_val_batches=1", "--trainer.log_every_n_steps=1", "--checkpoint.every_n_steps=4"]
QUIET = {"enable_progress_bar": False, "enable_model_summary": False}


def scalars(directory: Path) -> dict[str, list[int]]:
    """{tag: steps} of the scalar summaries in the event files under `directory` (TFRecord framing: length,
    its crc, the Event proto, its crc)."""
    from tensorboardX.proto.event_pb2 import Event

    found: dict[str, list[int]] = {}
    for path in sorted(directory.rglob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (n,) = struct.unpack("<Q", data[at : at + 8])
            event = Event.FromString(data[at + 12 : at + 12 + n])
            at += 12 + n + 4
            for value in event.summary.value:
                found.setdefault(value.tag, []).append(event.step)
    return found


def test_tensorboard_logger_writes_the_metrics_under_the_runs_logs(tmp_path: Path) -> None:
    corpus = write_txt(tmp_path / "c.txt", make_documents(120, seed=1))
    cfg = load_config(None, [f"--run_dir={tmp_path / 'run'}", f"--corpus.train={corpus}", *FAST,
                             "--logger.tensorboard=true"])
    assert not load_config(None, []).logger.tensorboard, "off by default"
    fit(cfg, prepare_data(cfg, log=lambda *_: None), resume=False, **QUIET)
    board = cfg.run_path / "logs" / "tensorboard"
    assert list(board.glob("events.out.tfevents.*")), "no event file"
    tags = scalars(board)
    assert tags["train/loss"] == [0, 1, 2, 3] and tags["val/loss"] == [3]  # Lightning logs step - 1
    assert (cfg.run_path / "logs" / "metrics.csv").is_file(), "CSV is still written"
