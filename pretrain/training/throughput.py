"""Throughput and model FLOPs utilisation (MFU) in every run's logs, measured without a host sync in the step.

MFU (Chowdhery et al. 2022, PaLM, appendix B) is the FLOPs the objective needs per token x tokens per second,
over the device's peak FLOP/s. The objective's FLOPs count the encoder's matmuls and attention for every token
and the LM head for the masked share only (the work MLM needs; a dense head would do ~6x more at 15% and
50K words, and count it as "useful"). Training is 3x the forward: one forward and a backward of twice its cost.

Lightning's `ThroughputMonitor` does this bookkeeping, but it synchronises the device after every batch to
time it, which is the host sync the step avoids. Here a window of steps is timed on the host between logging
steps (the device queue cannot run more than a step or so ahead, so over a window the host's clock is the
device's), and tokens are counted by the collator on the host (`num_tokens`).

The peak: `trainer.peak_flops` when set; on a GPU, the datasheet peak for the precision's dtype (Lightning's
table); elsewhere the best matmul FLOP/s torch reaches on this machine, measured once and cached.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

from ..model.config import RobertaConfig


def flops_per_token(cfg: RobertaConfig, seq_len: int, mask_probability: float, last_layer_subset: bool = False
                    ) -> float:
    """Training FLOPs per token of the MLM objective (sparse head), at rows of `seq_len` tokens; with
    `last_layer_subset` the last layer computes its keys and values for every token and the rest at the targets."""
    C, F_, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    per_layer = 2 * (4 * C * C + 2 * C * F_) + 2 * 2 * seq_len * C  # q, k, v, out, ffn; scores and values
    head = mask_probability * 2 * (C * C + C * V)  # dense + decoder on the masked tokens only
    layers = cfg.num_layers * per_layer
    if last_layer_subset:
        keys_values = 2 * 2 * C * C
        layers -= (1 - mask_probability) * (per_layer - keys_values)
    return 3.0 * (layers + head)


def precision_dtype(precision: str) -> torch.dtype:
    p = str(precision)
    return torch.bfloat16 if p.startswith("bf16") else torch.float16 if p.startswith("16") else torch.float32


def _cache_file() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "roberta-pretrain" / "peak_flops.json"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, max_n: int = 2048, budget_s: float = 1.0) -> float:
    """The best FLOP/s of a square matmul here (the practical peak a model's matmuls can reach): the size doubles
    from 256 while one product takes under 50 ms (up to max_n), then the best of repeats within `budget_s`. Bounded
    in time whatever the dtype: a CPU without fp16 kernels runs a 2048 fp16 matmul for tens of seconds."""

    def timed(n: int) -> float:
        a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return max(time.perf_counter() - t, 1e-9)

    n = 256
    while n < max_n and timed(n) < 0.05:
        n *= 2
    best, spent = 0.0, 0.0
    while spent < budget_s:
        seconds = timed(n)
        spent += seconds
        best = max(best, 2 * n**3 / seconds)
    return best


def peak_flops(device: torch.device, precision: str, configured: float = 0.0) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure comes from)."""
    if configured > 0:
        return configured, "trainer.peak_flops"
    dtype = precision_dtype(precision)
    if device.type == "cuda":
        from lightning_fabric.utilities.throughput import get_available_flops

        known = get_available_flops(device, dtype)
        if known:
            return float(known), f"datasheet, {torch.cuda.get_device_name(device)}"
    key = f"{_device_name(device)} | {dtype} | {torch.get_num_threads()} threads | torch {torch.__version__}"
    path = _cache_file()
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if not isinstance(cache.get(key), (int, float)):
        cache[key] = measure_matmul_flops(device, dtype)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache, indent=1))
            tmp.replace(path)
        except OSError:
            pass  # an unwritable cache only costs a measurement next time
    return float(cache[key]), f"best {dtype} matmul here, cached in {path}"


class Throughput(pl.Callback):
    """Logs `train/tokens_per_s` and `train/mfu` at logging steps; `summary()` gives the run's figures. The time
    of probes between steps (training/probing.py, whose `seconds` it reads) is not training time: left out."""

    def __init__(self, seq_len: int, mask_probability: float, precision: str, configured_peak: float,
                 log_every_n_steps: int, last_layer_subset: bool = False):
        self.seq_len, self.mask_probability = seq_len, mask_probability
        self.last_layer_subset = last_layer_subset
        self.precision, self.configured_peak = precision, configured_peak
        self.flops_per_token = 0.0
        self.log_every = max(1, log_every_n_steps)
        self.peak: float | None = None
        self.peak_source = ""
        self._tokens = 0  # this rank's real tokens since the window began
        self._window: tuple[float, int] | None = None  # (time, global step) at the window's start
        self._paused = 0.0  # probing seconds (training/probing.py) up to the window's start: not training time
        self._start: float | None = None
        self.warmup_s: float | None = None  # from the start of fit to the end of the first step
        self._steady = [0.0, 0]  # seconds and tokens (all ranks) of every window after the first
        self._world = 1

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = pl_module.model
        self.flops_per_token = flops_per_token(model.cfg, self.seq_len, self.mask_probability, self.last_layer_subset)
        self.peak, self.peak_source = peak_flops(pl_module.device, self.precision, self.configured_peak)
        self._world = trainer.world_size
        if trainer.global_rank == 0:  # instead of Lightning's table, whose FLOPs column reads 0 without an example
            params = sum(p.numel() for p in model.parameters())
            c = model.cfg
            print(f"model: {c.num_layers} layers x {c.hidden_size} ({c.num_heads} heads), {params / 1e6:.1f}M "
                  f"parameters, {self.flops_per_token / 1e6:.1f} MFLOPs per token trained (seq {self.seq_len}, "
                  f"sparse head{', last layer at the targets' if self.last_layer_subset else ''}); peak {self.peak / 1e12:.3g} TFLOP/s per device ({self.peak_source})", flush=True)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._tokens += int(batch.get("num_tokens", 0)) if isinstance(batch, dict) else 0  # a host int
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        now, step = time.perf_counter(), trainer.global_step
        paused = sum(float(getattr(c, "seconds", 0.0)) for c in trainer.callbacks if hasattr(c, "probe_seconds"))
        if self._window is None:  # the first step: compilation, allocator and loader warm-up
            self.warmup_s = now - (self._start or now)
            self._window, self._tokens, self._paused = (now, step), 0, paused
            return
        if step % self.log_every:
            return
        seconds = now - self._window[0] - (paused - self._paused)
        tokens = self._tokens * trainer.world_size  # ranks run equal shapes (by_tokens: equal budgets)
        self._window, self._tokens, self._paused = (now, step), 0, paused
        if seconds <= 0:
            return
        self._steady[0] += seconds
        self._steady[1] += tokens
        pl_module.log("train/tokens_per_s", tokens / seconds)
        if self.peak:
            pl_module.log("train/mfu", tokens / seconds * self.flops_per_token / (self.peak * trainer.world_size))

    def summary(self) -> str | None:
        """One line: steady tokens/s and MFU (after the first step), and the warm-up time; None before any."""
        seconds, tokens = self._steady
        if seconds <= 0:
            return None
        rate = tokens / seconds
        line = f"{rate:,.0f} tokens/s"
        if self.peak:
            line += f", MFU {rate * self.flops_per_token / (self.peak * self._world):.1%} of {self.peak / 1e12:.3g} TFLOP/s " \
                    f"per device ({self.peak_source})"
        if self.warmup_s is not None:
            line += f"; first step {self.warmup_s:.1f} s"
        return line
