"""The LightningModule: MLM loss on the masked positions only (plus NSP for BERT's pair inputs), AdamW with
RoBERTa's settings, the learning-rate schedule, and the metrics a pretraining run is judged by.

Optimisation (Liu et al. 2019, section 3.1 and Table 9): AdamW with betas (0.9, 0.98), eps 1e-6, decoupled
weight decay 0.01 on every weight matrix and embedding but not on biases and LayerNorm (as BERT and
`transformers`); the learning rate rises linearly from 0 to `peak_lr` over `warmup_steps`, then follows
`optim.schedule` (schedules.py; RoBERTa's is linear to 0 at `max_steps`); gradient clipping is off unless
`optim.grad_clip > 0` (Lightning clips).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import FSDPStrategy

from data_prep.config import config_from_dict
from data_prep.redact import redact_config

from .checkpoint import check_compatible
from .data import seq_len_at
from .hf import init_from_hf, model_config  # model_config: also imported from here (bench/, tests)
from .masking import IGNORE
from .model.encoder import RobertaForMLM
from .objective import batch_inputs, mlm_objective
from .rollback import Diverged, DivergenceMonitor, RollbackState
from .schedules import LRSchedule
from .steps import reseed


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay on matrices and embeddings; none on biases and LayerNorm parameters (all 1-d tensors here)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(model: torch.nn.Module, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
          precision: str = "32-true") -> torch.optim.AdamW:
    """AdamW over `param_groups`, with torch's fused kernel where it runs (CPU and CUDA tensors).

    Fused is one pass over each parameter instead of a dozen elementwise kernels: on a CPU it makes the update
    of a base model's 125M parameters about 3x faster than the default per-tensor loop (torch picks the loop for
    CPU tensors; `transformers.Trainer` defaults to fused), and it is deterministic, so resume stays bitwise.
    Not with fp16 loss scaling: a fused optimizer unscales gradients itself, inside its step, so Lightning could
    neither clip nor report the true gradient norm before it (it would see the gradients x the loss scale)."""
    fused = all(p.device.type in ("cpu", "cuda") for p in model.parameters()) and not str(precision).startswith("16")
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=eps,
                             fused=fused or None)


class MLMModule(pl.LightningModule):
    def __init__(self, config: dict[str, Any], meta: dict[str, Any]):
        """`config` is the experiment as a plain dict (so checkpoints carry it); `meta` the shards' meta.json.

        The hyperparameters, which every checkpoint, hparams.yaml and tracker config carry, hold the config with
        its secrets redacted (data_prep/redact.py): `self.cfg`, what this run uses, keeps the real storage options. A
        resume takes them from the config it is started with; nothing reads them from a checkpoint."""
        super().__init__()
        self.save_hyperparameters({"config": redact_config(config), "meta": meta})
        self.cfg = config_from_dict(config)
        self.meta = meta
        self.model = RobertaForMLM(model_config(self.cfg, meta))
        if self.cfg.model.init_from:  # continued pretraining; a resumed run's checkpoint then replaces these
            init_from_hf(self.model, self.cfg)
        # compile runs static shapes, padded (data.py): unpadded shapes would vary with every batch
        self.model.unpad = self.cfg.trainer.unpad and not self.cfg.trainer.compile
        self._objective = None if self.cfg.trainer.compile else mlm_objective  # compiled at first use: `objective`
        self.mask_id = meta["special_ids"]["mask"]
        o = self.cfg.optim
        self.rollbacks = RollbackState()
        """Rollbacks so far and the data they skipped; restored from the checkpoint (train.fit may override)."""
        self.rollback_override: RollbackState | None = None
        self.monitor = DivergenceMonitor(o.spike_factor, o.spike_window)
        self._step_sums: dict[str, torch.Tensor] = {}  # name -> (numerator, denominator) over the step's micro-batches
        self._step_log: dict[str, torch.Tensor] = {}  # the finished step's sums over all ranks, to log
        self._step_counts: torch.Tensor | None = None  # (targets, sequences) of the step over all ranks
        self.shown_loss: float | None = None  # the last logged training loss, read at a logging step
        self.lr_schedule = LRSchedule.from_config(self.cfg.optim, self.cfg.trainer.max_steps)
        self.budget: dict[str, Any] | None = None
        """A time budget's decision (budget.py), kept in every checkpoint."""

    def set_max_steps(self, max_steps: int) -> None:
        """The run's length, when a time budget decides it (budget.py): the schedule ends there."""
        self.cfg.trainer.max_steps = max_steps
        self.hparams["config"]["trainer"]["max_steps"] = max_steps  # the config checkpoints carry
        self.lr_schedule = LRSchedule.from_config(self.cfg.optim, max_steps)

    # --- checkpoints: what a step computes is a function of the step, so no RNG state is stored -------------

    def geometry(self) -> dict[str, Any]:
        b = self.cfg.batch
        trainer = self._trainer
        return {"global_size": b.global_size, "micro_size": b.micro_size, "by_tokens": b.by_tokens,
                "seq_len": self.cfg.data.seq_len,
                "world_size": trainer.world_size if trainer else 1,
                "accumulation": trainer.accumulate_grad_batches if trainer else b.global_size // b.micro_size}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Plain types only, so Lightning's weights_only loading accepts the checkpoint.
        checkpoint["geometry"] = self.geometry()
        checkpoint["rollbacks"] = self.rollbacks.to_dict()
        checkpoint["divergence_monitor"] = self.monitor.state_dict()
        if self.budget is not None:
            checkpoint["budget"] = dict(self.budget)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("hyper_parameters", {})
        path = Path(self.trainer.ckpt_path) if self._trainer else Path("checkpoint")
        check_compatible(saved.get("config", {}), self.cfg, path, saved.get("meta"), self.meta)
        self.rollbacks = self.rollback_override or RollbackState.from_dict(checkpoint.get("rollbacks"))
        if "divergence_monitor" in checkpoint:
            self.monitor.load_state_dict(checkpoint["divergence_monitor"])
        self.budget = checkpoint.get("budget", self.budget)
        loops = checkpoint.get("loops", {}).get("fit_loop", {})
        progress = loops.get("epoch_loop.batch_progress")
        if progress is None:
            return
        # The whole run is one Lightning epoch whose stream ends at max_steps, so the checkpoint of a finished
        # run says "last batch seen". Resumed with a larger max_steps, the epoch goes on: the sampler starts
        # at the saved step (data.py), and Lightning must not think the epoch is over.
        step = int(checkpoint.get("global_step", 0))
        if step < self.cfg.trainer.max_steps:
            progress["is_last_batch"] = False
        # Elastic resume: Lightning counts micro-batches, whose number per step changes with the device count
        # (accumulation = global batch / (micro-batch x devices)). Rescale its counters to the new
        # accumulation, or it would end the epoch early (at the old count of micro-batches).
        old = checkpoint.get("geometry", {}).get("accumulation") or (
            progress["total"]["ready"] // step if step else 1)
        new = self.trainer.accumulate_grad_batches if self._trainer else old
        if old != new:
            for counters in (progress["total"], progress["current"]):
                for key, value in counters.items():
                    counters[key] = value - step * old + step * new

    def on_train_start(self) -> None:
        self.monitor.to(self.device)
        # The learning rate of the next update, from the schedule (x the rollbacks' factor), not the restored
        # optimizer's value: equal on a plain resume, lowered after a rollback.
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            lrs = [base * lam(scheduler.last_epoch) for base, lam in zip(scheduler.base_lrs, scheduler.lr_lambdas,
                                                                          strict=True)]  # as LambdaLR.get_lr
            for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
                group["lr"] = lr

    def raise_if_diverged(self) -> None:
        """Reads the divergence flag (a host sync): raises `Diverged` when a bad step was seen."""
        found = self.monitor.poll()
        if found is not None:
            raise Diverged(found[0], self.global_step - 1, found[1], self.rollbacks)

    # --- loss ---------------------------------------------------------------------------------------------

    @property
    def objective(self):
        """`mlm_objective`, or under `trainer.compile` the objective as one function of tensors through
        `torch.compile`: one graph with the sparse head and the loss, and the module's parameters keep their names
        (no `_orig_mod.` in checkpoints). Built at first use, when the device is known: on a CPU inductor draws
        dropout's random numbers with ATen's kernels (`fallback_random`), 9% faster a step there than its own
        generator (small model, fp32), and the same masks as eager; on a GPU its fused generator is kept."""
        if self._objective is None:
            options = {"fallback_random": True} if self.device.type == "cpu" else None
            self._objective = torch.compile(mlm_objective, options=options)
        return self._objective

    def _losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Sums over the micro-batch (the step normalises them), on the device: objective.py."""
        out = self.objective(self.model, **batch_inputs(batch, self.model.unpad))
        out["mlm_loss"] = out["mlm_sum"] / out["n_masked"].clamp(min=1)
        return out

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        A, W = self.trainer.accumulate_grad_batches, self.trainer.world_size
        a = batch_idx % A
        if "step_counts" in batch:  # the step's first micro-batch: the divisors of the whole step
            assert a == 0, f"step counts on micro-batch {a} of {A}: the sampler is out of step"
            counts = batch["step_counts"].to(self.device, torch.float64)
            self._step_counts = self.trainer.strategy.reduce(counts, reduce_op="sum") if W > 1 else counts
        assert self._step_counts is not None, "a training batch without step counts (data.py's StepBatches)"
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

    def _val_names(self) -> list[str]:
        """The sources of the validation loaders when there is one per named source (data.py), else []."""
        trainer = self._trainer
        datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
        return list(getattr(datamodule, "val_names", []) or [])

    def on_validation_epoch_start(self) -> None:
        # sums, not means: reduced over ranks at the end, so the result is the exact token-weighted mean over the
        # whole validation set, the same on one device or many; a row per validation loader (per source)
        self._val_sums = torch.zeros(max(1, len(self._val_names())), 5, dtype=torch.float64, device=self.device)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        out = self._losses(batch)
        n, b = out["n_masked"], batch["input_ids"].shape[0]
        self._val_sums[dataloader_idx] += torch.stack([
            out["mlm_sum"].double(), out["mlm_correct"].double(), n.double(),
            out["nsp_sum"].double() if "nsp_sum" in out else torch.zeros((), device=self.device),
            self._device_scalar(b),
        ]).to(self._val_sums)

    def on_validation_epoch_end(self) -> None:
        sums = self.trainer.strategy.reduce(self._val_sums, reduce_op="sum") if self.trainer.world_size > 1 \
            else self._val_sums
        per_source = sums.tolist()  # one read of the device; the totals are the columns' sums
        loss_sum, acc_sum, n, nsp_sum, b = (sum(column) for column in zip(*per_source, strict=True))
        if n == 0:
            return
        loss = loss_sum / n
        log = {"val/loss": loss, "val/ppl": math.exp(min(loss, 50.0)), "val/mlm_acc": acc_sum / n}
        names = self._val_names()
        if len(names) == len(per_source):
            log.update({f"val/loss/{name}": row[0] / row[2] for name, row in zip(names, per_source, strict=True) if row[2]})
        self.log_dict(log, prog_bar=False, rank_zero_only=True)
        if self.model.nsp_head is not None and b:
            self.log("val/nsp_loss", nsp_sum / b, rank_zero_only=True)

    # --- optimisation ------------------------------------------------------------------------------------

    def configure_optimizers(self) -> dict[str, Any]:
        o = self.cfg.optim
        optimizer = adamw(self.model, o.peak_lr, o.betas, o.eps, o.weight_decay, self.cfg.trainer.precision)

        def rate(step: int) -> float:  # x rollback_lr_factor per rollback so far (rollback.py)
            # read at every step: a time budget fixes max_steps after the first steps (budget.py)
            return self.lr_schedule(step) * o.rollback_lr_factor ** len(self.rollbacks.events)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Lightning calls this after the step's last backward and the unscaling of fp16 gradients (fused
        # AdamW is not used under 16-mixed, see `adamw`), before clipping: the norm logged is the true one.
        self._finish_step()
        if (self.global_step + 1) % max(1, self.cfg.trainer.log_every_n_steps):  # Lightning's logging steps
            return
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        squares = torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]).square().sum()
        if isinstance(self.trainer.strategy, FSDPStrategy):  # each rank holds a shard of every gradient
            squares = self.trainer.strategy.reduce(squares, reduce_op="sum")
        norm = squares.sqrt()
        self.log("train/grad_norm", norm)
        self.log("train/lr", optimizer.param_groups[0]["lr"])

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if (batch_idx + 1) % self.trainer.accumulate_grad_batches == 0:  # the end of an optimizer step
            self._log_step_means()
