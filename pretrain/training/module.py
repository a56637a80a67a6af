"""The LightningModule: MLM loss on the masked positions only (plus NSP for BERT's pair inputs), AdamW with
RoBERTa's settings, the learning-rate schedule, and the metrics a pretraining run is judged by.

Optimisation (Liu et al. 2019, section 3.1 and Table 9): AdamW with betas (0.9, 0.98), eps 1e-6, decoupled
weight decay 0.01 on every weight matrix and embedding but not on biases and LayerNorm (as BERT and
`transformers`); the learning rate rises linearly from 0 to `peak_lr` over `warmup_steps`, then follows
`optim.schedule` (schedules.py; RoBERTa's is linear to 0 at `max_steps`); gradient clipping is off unless
`optim.grad_clip > 0` (Lightning clips).
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch

from data_prep.config import config_from_dict
from data_prep.redact import redact_config

from ..hf.convert import init_from_hf, model_config  # model_config: also imported from here (bench/, tests)
from ..model.encoder import RobertaForMLM
from .module_checkpoint import CheckpointHooks
from .module_step import TrainingStep
from .module_validation import Validation
from .objective import batch_inputs, mlm_objective
from .rollback import Diverged, DivergenceMonitor, RollbackState
from .schedules import LRSchedule


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


class MLMModule(CheckpointHooks, TrainingStep, Validation, pl.LightningModule):
    """Its parts, one module each: the training step and its metrics (module_step.py), validation
    (module_validation.py), what a checkpoint carries and a resume checks (module_checkpoint.py). Here: the model,
    the objective, the schedule and the optimizer."""

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

    def configure_model(self) -> None:
        """Lightning's hook once the devices are known: per-layer activation checkpointing when the config asks
        for it, and under `trainer.strategy: fsdp` the sharding over the device mesh (sharding.py). Lightning
        may call it again (validate after fit): it does its work once."""
        from .sharding import checkpoint_layers, is_sharded, shard_model

        t = self.cfg.trainer
        if t.activation_checkpointing:
            checkpoint_layers(self.model)
        if self.device_mesh is not None and not is_sharded(self.model):
            shard_model(self.model, self.device_mesh["data_parallel"], t.precision, t.fsdp_cpu_offload)

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

    # --- optimisation ------------------------------------------------------------------------------------

    def configure_optimizers(self) -> dict[str, Any]:
        o = self.cfg.optim
        optimizer = adamw(self.model, o.peak_lr, o.betas, o.eps, o.weight_decay, self.cfg.trainer.precision)

        def rate(step: int) -> float:  # x rollback_lr_factor per rollback so far (rollback.py)
            # read at every step: a time budget fixes max_steps after the first steps (budget.py)
            return self.lr_schedule(step) * o.rollback_lr_factor ** len(self.rollbacks.events)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, rate)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
