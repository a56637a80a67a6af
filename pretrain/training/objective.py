"""The objective of one micro-batch as one function of tensors: what `trainer.compile` hands to `torch.compile`.

MLM cross-entropy over the target slots only (sparse prediction: the LM head never sees the other positions),
plus BERT's next-sentence prediction when the model has its head and the batch its labels. Everything returned
is a sum or a count on the device, so nothing here reads a value on the host: the step normalises the sums by
the whole optimizer step's counts (module_step.py) and the metrics are read at logging steps only.

Shapes are those of the batch. Under `trainer.compile` the collator pads every batch to a multiple of 64 tokens
and its target slots to the bound of that shape (batching.py), and the padded batch runs padded attention, so a
phase's batches share one shape and the graph is traced once. Otherwise a padded batch runs unpadded
(`model.Unpadded`), with shapes that vary from batch to batch: its pad tokens, and its target slots that hold no
target (`real_slots`), are left out of the encoder and the head.

With `row_slots` (the collator's, trainer.last_layer_subset) the target slots are B x K, row by row, and the last
encoder layer runs on them only (`RobertaForMLM.encode_targets`). NSP needs every row's <s> state, so a batch
with NSP labels runs the whole last layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model.encoder import RobertaForMLM
from ..model.unpadded import Unpadded
from .masking import IGNORE


def mlm_objective(model: RobertaForMLM, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                  masked_positions: torch.Tensor, masked_targets: torch.Tensor, unpadded: Unpadded | None = None,
                  nsp_labels: torch.Tensor | None = None, row_slots: bool = False,
                  real_slots: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Sums over the micro-batch: `mlm_sum` (cross-entropy over the targets), `mlm_correct`, `n_masked` (real
    targets, `IGNORE` slots left out) and, with NSP, `nsp_sum` and `nsp_correct` over the sequences.

    input_ids (B, T); attention_mask (B, T) or None when nothing is padded; masked_positions (S,) flat indices
    into B*T; masked_targets (S,) the original ids there, or `IGNORE`; nsp_labels (B,); row_slots: the slots are
    B x K, row by row; real_slots (R,) with `row_slots`: the slots that hold a target, where the last layer's
    feed-forward and the head run (the others are padding), or None: all of them."""
    nsp = nsp_labels is not None and model.nsp_head is not None
    if row_slots and not nsp:  # the last layer at the targets only
        hidden = model.encode_targets(input_ids, attention_mask, masked_positions, unpadded, real_slots)  # (S|R, C)
        logits = model.lm_head(hidden)  # (S, V), or (R, V)
        if real_slots is not None:
            masked_targets = masked_targets.index_select(0, real_slots)  # (R,)
    else:
        hidden = model.encode(input_ids, attention_mask, unpadded=unpadded)  # (B, T, C)
        logits = model.mlm_logits(hidden, masked_positions)  # (S, V): sparse prediction
    real = masked_targets != IGNORE  # (S,)
    out = {"mlm_sum": F.cross_entropy(logits.float(), masked_targets, ignore_index=IGNORE, reduction="sum"),
           "n_masked": real.sum(),
           "mlm_correct": ((logits.detach().argmax(-1) == masked_targets) & real).sum()}
    if nsp:
        nsp_logits = model.nsp_logits(hidden)  # (B, 2)
        out["nsp_sum"] = F.cross_entropy(nsp_logits.float(), nsp_labels, reduction="sum")
        out["nsp_correct"] = (nsp_logits.detach().argmax(-1) == nsp_labels).sum()
    return out


def batch_inputs(batch: dict, unpad: bool = True) -> dict:
    """`mlm_objective`'s keyword arguments from a collated batch (batching.py): the attention mask only when the
    batch is padded, and where its real tokens are unless `unpad` is off."""
    padded = batch.get("padded", "unpad_index" in batch)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"] if padded else None,
              "masked_positions": batch["masked_positions"], "masked_targets": batch["masked_targets"],
              "nsp_labels": batch.get("nsp_labels"), "row_slots": batch.get("row_slots", False)}
    unpadded = Unpadded.from_batch(batch) if padded and unpad else None
    if unpadded is not None:
        inputs["unpadded"], inputs["real_slots"] = unpadded, batch.get("real_slots")
    return inputs
