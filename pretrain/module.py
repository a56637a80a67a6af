"""The LightningModule: MLM loss on the masked positions only (plus NSP for BERT's pair inputs), AdamW with
RoBERTa's settings, linear warmup then linear decay to zero, and the metrics a pretraining run is judged by.

Optimisation (Liu et al. 2019, section 3.1 and Table 9): AdamW with betas (0.9, 0.98), eps 1e-6, decoupled
weight decay 0.01 on every weight matrix and embedding but not on biases and LayerNorm (as BERT and
`transformers`); the learning rate rises linearly from 0 to `peak_lr` over `warmup_steps`, then falls linearly
to 0 at `max_steps`; gradient clipping is off unless `optim.grad_clip > 0` (Lightning clips).
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from data_prep.config import ExperimentConfig, config_from_dict

from .checkpoint import check_compatible
from .data import seq_len_at
from .model import RobertaConfig, RobertaForMLM

PAIR_PACKINGS = ("segment_pair", "sentence_pair")


def model_config(cfg: ExperimentConfig, meta: dict[str, Any]) -> RobertaConfig:
    """The architecture: sizes from the experiment, vocabulary and ids from the shards' metadata."""
    m = cfg.model
    return RobertaConfig(
        vocab_size=meta["vocab_size"],
        max_position_embeddings=meta["seq_len"] + meta["special_ids"]["pad"] + 1,
        pad_token_id=meta["special_ids"]["pad"],
        hidden_size=m.hidden_size, num_layers=m.num_layers, num_heads=m.num_heads,
        intermediate_size=m.intermediate_size, dropout=m.dropout, attention_dropout=m.attention_dropout,
        nsp=meta["packing"] in PAIR_PACKINGS,
    )


def lr_lambda(step: int, warmup_steps: int, max_steps: int) -> float:
    """Multiplier of the peak rate at optimizer step `step` (the rate used for the update that makes step+1)."""
    # 1) linear warmup from 0 to 1 over warmup_steps
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    # 2) linear decay from 1 to 0 at max_steps
    return max(0.0, (max_steps - step) / max(1, max_steps - warmup_steps))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay on matrices and embeddings; none on biases and LayerNorm parameters (all 1-d tensors here)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def adamw(model: torch.nn.Module, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
          precision: str = "32-true", grad_clip: float = 0.0) -> torch.optim.AdamW:
    """AdamW over `param_groups`, with torch's fused kernel where it runs (CPU and CUDA tensors).

    Fused is one pass over each parameter instead of a dozen elementwise kernels: on a CPU it makes the update
    of a base model's 125M parameters about 3x faster than the default per-tensor loop (torch picks the loop for
    CPU tensors; `transformers.Trainer` defaults to fused), and it is deterministic, so resume stays bitwise.
    Not with fp16 loss scaling plus clipping: a fused optimizer unscales gradients itself, so Lightning cannot
    unscale them before clipping."""
    fused = all(p.device.type in ("cpu", "cuda") for p in model.parameters()) and not (
        str(precision).startswith("16") and grad_clip > 0)
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=tuple(betas), eps=eps,
                             fused=fused or None)


class MLMModule(pl.LightningModule):
    def __init__(self, config: dict[str, Any], meta: dict[str, Any]):
        """`config` is the experiment as a plain dict (so checkpoints carry it); `meta` the shards' meta.json."""
        super().__init__()
        self.save_hyperparameters()
        self.cfg = config_from_dict(config)
        self.meta = meta
        self.model = RobertaForMLM(model_config(self.cfg, meta))
        if self.cfg.model.init_from:  # continued pretraining; a resumed run's checkpoint then replaces these
            from .export import init_from_hf

            init_from_hf(self.model, self.cfg)
        self.mask_id = meta["special_ids"]["mask"]
        self._tokens_since = 0
        self._step_sums: dict[str, torch.Tensor] = {}  # name -> (numerator, denominator) over the step's micro-batches
        self._t_last: float | None = None
        self._restored_rng: dict[str, Any] | None = None

    # --- exact resume: the random state travels with the checkpoint ----------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Dropout draws from torch's global generator; the data order and masks need no state (see data.py).
        # Plain types only, so Lightning's weights_only loading accepts the checkpoint.
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        checkpoint["rng"] = {"torch": torch.get_rng_state(), "python": random.getstate(),
                             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]}
        if torch.cuda.is_available():
            checkpoint["rng"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("hyper_parameters", {})
        check_compatible(saved.get("config", {}), self.cfg,
                         Path(self.trainer.ckpt_path) if self._trainer else Path("checkpoint"), saved.get("meta"), self.meta)
        self._restored_rng = checkpoint.get("rng")
        # The whole run is one Lightning epoch whose stream ends at max_steps, so the checkpoint of a finished
        # run says "last batch seen". Resumed with a larger max_steps, the epoch goes on: the sampler starts
        # at the saved step (data.py), and Lightning must not think the epoch is over.
        progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.batch_progress")
        if progress is not None and checkpoint.get("global_step", 0) < self.cfg.trainer.max_steps:
            progress["is_last_batch"] = False

    def on_train_start(self) -> None:
        # Applied here, not in on_load_checkpoint: nothing between here and the first step draws from it.
        rng, self._restored_rng = self._restored_rng, None
        if rng is None:
            return
        torch.set_rng_state(rng["torch"])
        kind, keys, pos, has_gauss, cached = rng["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        random.setstate(rng["python"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    # --- loss --------------------------------------------------------------------------------------------

    def _losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        hidden = self.model.encode(batch["input_ids"], batch["attention_mask"])  # (B, T, C)
        logits = self.model.mlm_logits(hidden, batch["masked_positions"])  # (N, V): sparse prediction
        targets = batch["masked_targets"]
        out = {"mlm_loss": F.cross_entropy(logits.float(), targets), "n_masked": targets.numel()}
        with torch.no_grad():
            out["mlm_acc"] = (logits.argmax(-1) == targets).float().mean()
        out["loss"] = out["mlm_loss"]
        if self.model.nsp_head is not None and "nsp_labels" in batch:
            nsp_logits = self.model.nsp_logits(hidden)  # (B, 2)
            out["nsp_loss"] = F.cross_entropy(nsp_logits.float(), batch["nsp_labels"])
            out["nsp_acc"] = (nsp_logits.argmax(-1) == batch["nsp_labels"]).float().mean()
            out["loss"] = out["loss"] + out["nsp_loss"]
        return out

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        out = self._losses(batch)
        if not torch.isfinite(out["loss"]):
            raise FloatingPointError(
                f"loss is {out['loss'].item()} at step {self.global_step}: stopping; the last good checkpoint "
                "is kept (lower optim.peak_lr, raise optim.warmup_steps or set optim.grad_clip)"
            )
        self._tokens_since += int(batch["attention_mask"].sum())
        self._add_step_sums(batch, out)
        return out["loss"]

    @torch.no_grad()
    def _add_step_sums(self, batch: dict[str, torch.Tensor], out: dict[str, torch.Tensor]) -> None:
        """Adds this micro-batch's numerators and denominators to the optimizer step's, so the logged training
        metrics cover every micro-batch of an accumulated step (token-weighted), not only the last one."""
        n, b = out["n_masked"], batch["input_ids"].shape[0]
        pos, targets = batch["masked_positions"], batch["masked_targets"]
        seen = batch["input_ids"].flatten()[pos]
        as_mask, kept = (seen == self.mask_id).sum(), (seen == targets).sum()
        real = batch["attention_mask"].sum() - 2 * b  # <s> and </s> of each row
        sums = {"train/loss": (out["mlm_loss"] * n, n), "train/mlm_acc": (out["mlm_acc"] * n, n),
                # the realised mask rate and 80/10/10 split, so a misconfigured collator shows in the logs
                "mask/rate": (n, real), "mask/mask": (as_mask, n), "mask/random": (n - as_mask - kept, n),
                "mask/kept": (kept, n)}
        if "nsp_loss" in out:
            sums.update({"train/nsp_loss": (out["nsp_loss"] * b, b), "train/nsp_acc": (out["nsp_acc"] * b, b)})
        for name, (num, den) in sums.items():  # tensors on the device: no host sync per micro-batch
            pair = torch.stack([torch.as_tensor(num, dtype=torch.float64, device=self.device),
                                torch.as_tensor(den, dtype=torch.float64, device=self.device)])
            self._step_sums[name] = self._step_sums[name] + pair if name in self._step_sums else pair

    def _log_step_means(self) -> None:
        sums, self._step_sums = self._step_sums, {}
        log = {name: (pair[0] / pair[1].clamp(min=1.0)).float() for name, pair in sums.items()}
        if "train/loss" not in log:
            return
        log["train/loss_bits"] = log["train/loss"] / math.log(2)
        # BERT's length schedule shows as a step in this curve (data.short_seq_len); the step just taken
        log["train/seq_len"] = float(seq_len_at(self.cfg, self.global_step - 1))
        self.log_dict(log, prog_bar=False)
        self.log("loss", log["train/loss"], prog_bar=True, logger=False)

    def on_validation_epoch_start(self) -> None:
        # sums, not means: reduced over ranks at the end, so the result is the exact token-weighted mean over the
        # whole validation set, the same on one device or many
        self._val_sums = torch.zeros(5, dtype=torch.float64, device=self.device)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        out = self._losses(batch)
        n, b = out["n_masked"], batch["input_ids"].shape[0]
        self._val_sums += torch.stack([
            out["mlm_loss"].double() * n, out["mlm_acc"].double() * n, torch.tensor(float(n), device=self.device),
            out["nsp_loss"].double() * b if "nsp_loss" in out else torch.zeros((), device=self.device),
            torch.tensor(float(b), device=self.device),
        ]).to(self._val_sums)

    def on_validation_epoch_end(self) -> None:
        sums = self.trainer.strategy.reduce(self._val_sums, reduce_op="sum") if self.trainer.world_size > 1 \
            else self._val_sums
        loss_sum, acc_sum, n, nsp_sum, b = sums.tolist()
        if n == 0:
            return
        loss = loss_sum / n
        self.log_dict({"val/loss": loss, "val/ppl": math.exp(min(loss, 50.0)), "val/mlm_acc": acc_sum / n},
                      prog_bar=False, rank_zero_only=True)
        if self.model.nsp_head is not None and b:
            self.log("val/nsp_loss", nsp_sum / b, rank_zero_only=True)

    # --- optimisation ------------------------------------------------------------------------------------

    def configure_optimizers(self) -> dict[str, Any]:
        o = self.cfg.optim
        optimizer = adamw(self.model, o.peak_lr, o.betas, o.eps, o.weight_decay, self.cfg.trainer.precision,
                          o.grad_clip)
        warmup, total = o.warmup_steps, self.cfg.trainer.max_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(s, warmup, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.global_step % max(1, self.cfg.trainer.log_every_n_steps):
            return
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
        self.log("train/grad_norm", norm)
        self.log("train/lr", optimizer.param_groups[0]["lr"])

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # tokens/s over optimizer steps (all micro-batches of a step), times the ranks
        if (batch_idx + 1) % self.trainer.accumulate_grad_batches:
            return
        self._log_step_means()
        now = time.perf_counter()
        if self._t_last is not None and now > self._t_last:
            self.log("train/tokens_per_s", self._tokens_since * self.trainer.world_size / (now - self._t_last))
        self._t_last, self._tokens_since = now, 0
