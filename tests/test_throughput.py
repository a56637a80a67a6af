"""Throughput (pretrain/training/throughput.py): tokens per second of training, probes left out. Driven with a
fake clock and light stand-ins for Lightning's trainer and module, so the figures are exact."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pretrain.training import throughput as throughput_module
from pretrain.training.throughput import Throughput


def test_probe_time_is_not_training_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Steps of 2 s and 1,000 tokens; a probe of 30 s after step 2 (inside the window of steps 2-4). The logged
    rate is 1,000 / 2 = 500 tokens/s with the probe left out; it read (2,000 / 34 =) 58.8 before."""
    now = [0.0]
    monkeypatch.setattr(throughput_module, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    probing = SimpleNamespace(probe_seconds=None, seconds=0.0)
    logged: dict[str, float] = {}
    trainer = SimpleNamespace(global_step=0, world_size=1, accumulate_grad_batches=1, callbacks=[probing])
    module = SimpleNamespace(log=lambda key, value: logged.__setitem__(key, value))
    callback = Throughput(seq_len=8, mask_probability=0.15, precision="32-true", configured_peak=0.0,
                          log_every_n_steps=2)
    for step in range(1, 5):
        now[0] += 2.0
        trainer.global_step = step
        callback.on_train_batch_end(trainer, module, None, {"num_tokens": 1000}, step - 1)
        if step == 2:  # the probe runs after the step's callbacks (train.fit puts Probing last)
            now[0] += 30.0
            probing.seconds, probing.probe_seconds = 30.0, 30.0
    assert logged["train/tokens_per_s"] == 500.0
    assert callback.summary().startswith("500 tokens/s")
