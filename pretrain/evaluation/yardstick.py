"""A fixed yardstick for comparing runs: MLM loss of a checkpoint on the same held-out blocks with the same masks.

Each run's own validation uses its own packing (pairs for BERT's NSP formats, short blocks for DOC-SENTENCES), so
its `val/loss` does not compare across input formats. The yardstick does: every checkpoint is scored on one set
of blocks (the first `blocks` validation blocks of a reference shard directory, FULL-SENTENCES at the full
sequence length in the ablation runner), each masked by the same `MaskingCollator` with a fixed seed at epoch 0,
so every model predicts exactly the same tokens from exactly the same inputs. The loss is the sum of the
cross-entropies over all masked tokens divided by their number (nats), so batch boundaries do not matter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from data_prep.config import config_from_dict
from data_prep.shards import open_split, read_meta

from ..hf.convert import model_config
from ..model.encoder import RobertaForMLM
from ..training.batching import MaskingCollator
from ..training.objective import batch_inputs, mlm_objective


class YardstickError(ValueError):
    """A checkpoint that cannot be scored on the reference blocks: one line naming it and why."""


@dataclass(frozen=True)
class Yardstick:
    """The reference blocks and their masks; `score` one model on them."""

    meta_path: Path
    blocks: int = 512
    """The first this many validation blocks (all when there are fewer)."""
    seed: int = 12345
    """Seed of the fixed masks (not a training seed: the same for every run compared)."""
    micro_size: int = 64

    def batches(self) -> list[dict[str, torch.Tensor]]:
        meta = read_meta(self.meta_path)
        split = open_split(self.meta_path, "valid" if "valid" in meta["splits"] else "train")
        ids = meta["special_ids"]
        collator = MaskingCollator(mask_token_id=ids["mask"], pad_token_id=ids["pad"],
                                   special_ids=tuple(sorted(set(ids.values()))), vocab_size=meta["vocab_size"],
                                   seed=self.seed)  # RoBERTa's 15% / 80-10-10, epoch 0: one fixed pattern
        n = min(self.blocks, split.num_blocks)
        items = [{"input_ids": split.block(i), "index": i, "epoch": 0} for i in range(n)]
        return [collator(items[i:i + self.micro_size]) for i in range(0, n, self.micro_size)]

    @torch.no_grad()
    def score(self, model: RobertaForMLM, batches: list[dict[str, torch.Tensor]] | None = None) -> dict[str, float]:
        """{loss (nats per masked token), ppl, accuracy, tokens (masked tokens scored), blocks}."""
        was_training = model.training
        model.eval()
        total, correct, count, blocks = 0.0, 0, 0, 0
        device = next(model.parameters()).device
        for batch in batches if batches is not None else self.batches():
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            out = mlm_objective(model, **batch_inputs(batch))  # padded target slots count nowhere
            total += float(out["mlm_sum"])
            correct += int(out["mlm_correct"])
            count += int(out["n_masked"])
            blocks += batch["input_ids"].shape[0]
        model.train(was_training)
        loss = total / max(count, 1)
        return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "accuracy": correct / max(count, 1),
                "tokens": count, "blocks": blocks}


def load_model(ckpt: str | Path) -> tuple[RobertaForMLM, dict[str, Any]]:
    """The model of one of this project's checkpoints (fp32, eval mode) and the checkpoint's step and config."""
    ckpt = Path(ckpt)
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        hp = state["hyper_parameters"]
        weights = {k.removeprefix("model.").removeprefix("_orig_mod."): v.float()
                   for k, v in state["state_dict"].items() if k.startswith("model.")}
        model = RobertaForMLM(model_config(config_from_dict(hp["config"]), hp["meta"]))
        model.load_state_dict(weights)
    except Exception as e:  # a truncated or foreign file: torch raises many types
        raise YardstickError(f"checkpoint {ckpt} is unreadable or not this project's "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    return model.eval(), {"step": int(state["global_step"]), "config": hp["config"], "meta": hp["meta"]}


def check_compatible(ref_meta: dict[str, Any], meta: dict[str, Any], where: str) -> None:
    """The yardstick's blocks must use the model's vocabulary and fit its positions."""
    if ref_meta["tokenizer_sha256"] != meta["tokenizer_sha256"]:
        raise YardstickError(f"{where}: trained with another tokenizer than the reference blocks "
                             f"({meta['tokenizer_sha256'][:12]} vs {ref_meta['tokenizer_sha256'][:12]})")
    if ref_meta["seq_len"] > meta["seq_len"]:
        raise YardstickError(f"{where}: its positions end at seq_len {meta['seq_len']}, the reference blocks are "
                             f"{ref_meta['seq_len']} long")
