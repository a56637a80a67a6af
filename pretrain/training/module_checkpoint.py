"""MLMModule's checkpoint hooks: what a checkpoint carries besides weights and optimizer (the batch geometry, the
rollbacks, the divergence monitor, a time budget's decision), and what a resume checks and adjusts when it loads
one (the config's compatibility, Lightning's epoch and micro-batch counters after a longer or elastic run).

A mixin of module.py's `MLMModule`: it reads the module's `cfg`, `meta`, `rollbacks`, `rollback_override`,
`monitor` and `budget`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .checkpoint import check_compatible
from .rollback import RollbackState


class CheckpointHooks:
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
        # at the saved step (samplers.py), and Lightning must not think the epoch is over.
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
