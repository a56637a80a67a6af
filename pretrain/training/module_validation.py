"""MLMModule's validation: per-loader sums of the MLM (and NSP) loss, reduced over the ranks at the epoch's end,
so the logged loss is the exact token-weighted mean over the validation set on one device or many, with one row
per named source when the data module has them.

A mixin of module.py's `MLMModule`: it reads the module's `model`, `_losses` and `_device_scalar`.
"""

from __future__ import annotations

import math

import torch


class Validation:
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
