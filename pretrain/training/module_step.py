"""MLMModule's training step: the step's loss as fairseq's token-weighted mean over every micro-batch and rank,
and the step's metrics, summed on the device over its micro-batches and reduced over the ranks once at its end
(no host sync per micro-batch), logged at logging steps only; the gradient norm and learning rate before the update.

A mixin of module.py's `MLMModule`: it reads the module's `cfg`, `mask_id`, `monitor`, `_losses` and the step
sums `__init__` sets up.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from .data import seq_len_at
from .masking import IGNORE
from .steps import reseed


class TrainingStep:
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        A, W = self.trainer.accumulate_grad_batches, self.trainer.world_size
        a = batch_idx % A
        if "step_counts" in batch:  # the step's first micro-batch: the divisors of the whole step
            assert a == 0, f"step counts on micro-batch {a} of {A}: the sampler is out of step"
            counts = batch["step_counts"].to(self.device, torch.float64)
            self._step_counts = self.trainer.strategy.reduce(counts, reduce_op="sum") if W > 1 else counts
        assert self._step_counts is not None, "a training batch without step counts (samplers.py's StepBatches)"
        # dropout as a function of (seed, step, micro-batch over all ranks): steps.py
        reseed(self.cfg.seed, self.global_step, a * W + self.global_rank)
        out = self._losses(batch)
        # fairseq's token-weighted mean over the whole step: the sum of per-token losses of every micro-batch
        # and rank over the step's target count. x A undoes Lightning's division by the accumulation, x W
        # DDP's mean over ranks; the NSP term is the mean over the step's sequences.
        targets, sequences = self._step_counts.clamp(min=1.0).unbind()
        loss = out["mlm_sum"] * (A * W / targets).float()
        if "nsp_sum" in out:
            loss = loss + out["nsp_sum"] * (A * W / sequences).float()
        self._add_step_sums(batch, out)
        return loss

    @torch.no_grad()
    def _add_step_sums(self, batch: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> None:
        """Adds this micro-batch's numerators and denominators to the optimizer step's; at the step's end they
        are summed over the ranks, so the logged metrics are the step's token-weighted means."""
        n, b = out["n_masked"], batch["input_ids"].shape[0]
        pos, targets = batch["masked_positions"], batch["masked_targets"]
        seen = batch["input_ids"].flatten()[pos]  # what the model saw at the target slots
        as_mask = ((seen == self.mask_id) & (targets != IGNORE)).sum()
        kept = (seen == targets).sum()  # an IGNORE slot never equals its token
        sums = {"train/loss": (out["mlm_sum"], n), "train/mlm_acc": (out["mlm_correct"], n),
                # the realised mask rate (over the tokens that may be chosen: no specials, no pads) and the
                # 80/10/10 split, so a misconfigured collator shows in the logs
                "mask/rate": (n, batch["num_candidates"]), "mask/mask": (as_mask, n), "mask/random": (n - as_mask - kept, n),
                "mask/kept": (kept, n)}
        if "nsp_sum" in out:
            sums.update({"train/nsp_loss": (out["nsp_sum"], b), "train/nsp_acc": (out["nsp_correct"], b)})
        for name, (num, den) in sums.items():  # on the device: no host sync per micro-batch
            pair = torch.stack([self._device_scalar(num), self._device_scalar(den)])
            self._step_sums[name] = self._step_sums[name] + pair if name in self._step_sums else pair

    def _device_scalar(self, value: torch.Tensor | float) -> torch.Tensor:
        """A float64 scalar on the device. A host number is filled in by a kernel, not copied: a blocking
        host-to-device copy waits for the device queue to drain, as a read does."""
        if torch.is_tensor(value):
            return value.to(torch.float64)
        return torch.scalar_tensor(value, dtype=torch.float64, device=self.device)

    def _finish_step(self) -> None:
        """After the step's last backward: its sums over all ranks (one all-reduce), and the divergence check
        of its loss, on the device."""
        sums, self._step_sums = self._step_sums, {}
        if not sums:
            return
        names = sorted(sums)
        stacked = torch.stack([sums[k] for k in names])  # (metrics, 2)
        if self.trainer.world_size > 1:
            stacked = self.trainer.strategy.reduce(stacked, reduce_op="sum")
        self._step_log = dict(zip(names, stacked.unbind(), strict=True))
        loss_sum, n = self._step_log["train/loss"]
        self.monitor.update(loss_sum / n.clamp(min=1.0), self.global_step)

    def _log_step_means(self) -> None:
        """At logging steps only: Lightning turns a host number logged into a device tensor with a blocking copy,
        and its progress bar reads the value it shows (a host sync); values logged between logging steps would
        be dropped anyway."""
        sums, self._step_log = self._step_log, {}
        if self.global_step % max(1, self.cfg.trainer.log_every_n_steps):
            return
        log = {name: (pair[0] / pair[1].clamp(min=1.0)).float() for name, pair in sums.items()}
        if "train/loss" not in log:
            return
        log["train/loss_bits"] = log["train/loss"] / math.log(2)
        # BERT's length schedule shows as a step in this curve (data.short_seq_len); the step just taken
        log["train/seq_len"] = float(seq_len_at(self.cfg, self.global_step - 1))
        self.log_dict(log, prog_bar=False)
        # For the progress bar (train.StepLossBar), read here: a metric logged with prog_bar=True would be read
        # on the host by Lightning after every later batch too.
        self.shown_loss = float(log["train/loss"])

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Lightning calls this after the step's last backward and the unscaling of fp16 gradients (fused
        # AdamW is not used under 16-mixed, see `adamw`), before clipping: the norm logged is the true one.
        self._finish_step()
        if (self.global_step + 1) % max(1, self.cfg.trainer.log_every_n_steps):  # Lightning's logging steps
            return
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        sharded = bool(grads) and isinstance(grads[0], DTensor)  # FSDP2: each rank holds a shard of every gradient
        grads = [g.to_local() for g in grads] if sharded else grads
        squares = torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]).square().sum()
        if sharded and self.trainer.world_size > 1:
            squares = self.trainer.strategy.reduce(squares, reduce_op="sum")
        norm = squares.sqrt()
        self.log("train/grad_norm", norm)
        self.log("train/lr", optimizer.param_groups[0]["lr"])

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if (batch_idx + 1) % self.trainer.accumulate_grad_batches == 0:  # the end of an optimizer step
            self._log_step_means()
