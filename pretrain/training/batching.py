"""The collate function of MLM training: masked sequences (masking.py's `SequenceMasker`) into a padded batch with
sparse targets.

A batch whose rows are all as long as the longest has its targets padded to a bound that depends on its shape
only, B x num_targets(T), with `IGNORE` targets. With `pad_to_multiple_of` (trainer.compile) every batch is padded
to such a shape: FULL-SENTENCES blocks end at sentence boundaries, so nearly every batch has short rows, and this
gives a phase's batches one shape, which `torch.compile` traces once. Otherwise a padded batch carries where its
real tokens are (`unpad_index`, `cu_seqlens`, `max_seqlen`), computed here on the host, so the encoder runs on
them only without a device-to-host sync in the step.

Per-row slots (`row_slots`, trainer.last_layer_subset): every row gets the same number K of target slots, the
bound of its length at the highest rate, its own targets first and then `IGNORE` slots at its last position. Slot s
then belongs to row s // K, which is what lets the last encoder layer run on the targets only
(`RobertaForMLM.encode_targets`): its queries are a (B, K) block against the row's keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..model.unpadded import Unpadded
from .masking import IGNORE, SequenceMasker


@dataclass
class MaskingCollator(SequenceMasker):
    """Collate unpadded sequences into a padded, masked batch with sparse targets.

    Items are dicts: `input_ids` (list or array of ints, unpadded), `index` (the sequence's global index in
    its split), `epoch` (times the sampler has served the split before), optionally `nsp_label` (int) and
    `step` (the optimizer step the item is trained at: its masking rate).
    """

    pad_to_multiple_of: int = 0
    """0: pad to the batch's longest row, and say where a padded batch's tokens are (unpadded attention). Else
    static shapes for `torch.compile`: pad every batch to a multiple of this, and its target slots always to
    the bound of that shape, so batches of a phase share their shapes (FULL-SENTENCES blocks end at sentence
    boundaries: only ~8% are full length, so nearly every batch is padded)."""

    row_slots: bool = False
    """Lay the target slots out per row: K = `num_targets(T)` at the highest rate for every row of a B x T batch,
    its targets then `IGNORE` slots at its last position (sorted order kept), and say so in the batch (`row_slots`),
    so that the last encoder layer can run on the targets only (trainer.last_layer_subset)."""

    def _problems(self) -> list[str]:
        problems = super()._problems()
        if self.pad_to_multiple_of < 0:
            problems.append(f"pad_to_multiple_of={self.pad_to_multiple_of} must be >= 0")
        return problems

    def target_slots(self, rows: int, length: int) -> int:
        """Target slots of a rows x length batch: the most targets any such batch can have (`num_targets` grows
        with n and with the rate, and a row's n is at most its length)."""
        return rows * self.num_targets(length, probability=self.rate.highest)

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """A batch: `input_ids` (B, T) padded to the longest, `attention_mask` (B, T) 1 for real tokens,
        `masked_positions` (S,) sorted indices into the flattened B*T positions, `masked_targets` (S,) the
        original ids there, `padded` (bool) whether some row is padded, `num_tokens` (int) the real tokens,
        `num_candidates` (int) those that may be chosen (the denominator of the mask rate). When no row is
        padded, or with `pad_to_multiple_of`, the S slots are padded to `target_slots(B, T)` with position 0 and
        target `IGNORE`; with `row_slots` they are B x K slots per row (`_row_slots`) and `row_slots` (bool) says
        so. Unless `pad_to_multiple_of`, a padded batch has `unpad_index` (N,), `cu_seqlens` (B+1,) and
        `max_seqlen` (int) and `row_lengths` (list of ints), where its real tokens are (`model.Unpadded`), and with `row_slots` `real_slots` (R,), the
        slots that hold a target (the others are padding too).
        Also `nsp_labels` (B,) when the items carry `nsp_label`, and `step_counts` (2,), the targets and
        sequences of the whole optimizer step on this rank, when the first item carries `step_blocks` (the
        first micro-batch of a step, samplers.py)."""
        assert items, "MaskingCollator got an empty batch"
        step = items[0].get("step")  # the optimizer step these items train at (data.py); None: validation
        masked = [self.mask_sequence(it["input_ids"], it["index"], it["epoch"], step) for it in items]
        lengths = np.array([m[0].size for m in masked])
        B, T = len(items), int(lengths.max())
        if self.pad_to_multiple_of:
            T = -(-T // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = np.full((B, T), self.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((B, T), dtype=np.int64)
        for b, (ids, _, _) in enumerate(masked):
            input_ids[b, : ids.size] = ids
            attention_mask[b, : ids.size] = 1
        padded = bool((lengths < T).any())
        if self.row_slots:
            positions, targets = self._row_slots(masked, T)
        else:
            # Row b's positions are sorted and offset by b * T, so the concatenation is sorted too.
            positions = np.concatenate([pos + b * T for b, (_, pos, _) in enumerate(masked)])
            targets = np.concatenate([tgt for _, _, tgt in masked])
        if not self.row_slots and (not padded or self.pad_to_multiple_of):  # static shapes: pad to the bound
            slots = self.target_slots(B, T)
            assert targets.size <= slots, f"{targets.size} targets > the bound {slots} of a {B}x{T} batch"
            positions = np.concatenate([positions, np.zeros(slots - positions.size, dtype=np.int64)])
            targets = np.concatenate([targets, np.full(slots - targets.size, IGNORE, dtype=np.int64)])
        batch: dict[str, Any] = {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(attention_mask),
            "masked_positions": torch.from_numpy(positions),
            "masked_targets": torch.from_numpy(targets),
            "num_tokens": int(lengths.sum()),
            "num_candidates": sum(self.num_candidates(it["input_ids"]) for it in items),
            "padded": padded,
            "row_slots": self.row_slots,
        }
        if padded and not self.pad_to_multiple_of:
            # where the real tokens are (model.Unpadded); the row lengths as host ints too, for attention on a CPU
            batch |= Unpadded(torch.from_numpy(np.flatnonzero(attention_mask)),
                              torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)), T,
                              lengths.tolist()).as_batch()
            if self.row_slots:  # the slots of real targets: the unpadded step runs the rest of the head on them
                batch["real_slots"] = torch.from_numpy(np.flatnonzero(targets != IGNORE))
        if "nsp_label" in items[0]:
            batch["nsp_labels"] = torch.tensor([it["nsp_label"] for it in items], dtype=torch.long)
        if "step_blocks" in items[0]:
            batch["step_counts"] = torch.tensor(self.step_counts(items[0]["step_blocks"], step), dtype=torch.long)
        return batch

    def _row_slots(self, masked: list[tuple[np.ndarray, np.ndarray, np.ndarray]], T: int
                   ) -> tuple[np.ndarray, np.ndarray]:
        """(positions, targets) (B * K,) with row b's K slots at [b * K, (b + 1) * K): its targets, then `IGNORE`
        slots at its last position b * T + T - 1, so the flat positions stay sorted."""
        K = self.target_slots(1, T)
        positions = np.empty((len(masked), K), dtype=np.int64)
        targets = np.full((len(masked), K), IGNORE, dtype=np.int64)
        for b, (_, pos, tgt) in enumerate(masked):
            assert pos.size <= K, f"{pos.size} targets > the bound {K} of a row of {T}"
            positions[b, : pos.size] = pos + b * T
            positions[b, pos.size:] = b * T + T - 1
            targets[b, : tgt.size] = tgt
        return positions.reshape(-1), targets.reshape(-1)
