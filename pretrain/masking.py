"""MLM masking as a DataLoader collate function: RoBERTa's dynamic masking, or BERT's static masking.

The mask of a sequence is a pure function of (seed, epoch, sequence index): each sequence gets its own
counter-based generator (numpy's Philox, Salmon et al. 2011) keyed on (seed, index), with the epoch in the
counter. So a mask does not depend on batch size, batch composition, order, worker count, device count, or
where a run was resumed, and no generator state needs to be checkpointed.

Per sequence (BERT, arXiv 1810.04805, section 3.1; RoBERTa, arXiv 1907.11692, section 4.1):
1) choose exactly round(probability * n) of its n non-special tokens (at least one when n > 0), uniformly
   without replacement. An exact count rather than a Bernoulli draw per token: every sequence gives the loss
   the same number of targets, so the loss of a step varies less. (For very short sequences rounding biases
   the share: 3 tokens at 0.15 give 1 target, not 0.45.)
2) each chosen token independently becomes <mask> with `mask_fraction`, a uniformly random non-special token
   with `random_fraction`, else stays. A per-token draw rather than exact counts per sequence: 10% of a
   sequence's 3 targets cannot be rounded without biasing the split, while per-token draws are exact in
   expectation at any length.
A batch whose rows are all as long as the longest has its targets padded to a bound that depends on its shape
only, B x num_targets(T), with `IGNORE` targets. With `pad_to_multiple_of` (trainer.compile) every batch is padded
to such a shape: FULL-SENTENCES blocks end at sentence boundaries, so nearly every batch has short rows, and this
gives a phase's batches one shape, which `torch.compile` traces once. Otherwise a padded batch carries where its
real tokens are (`unpad_index`, `cu_seqlens`, `max_seqlen`), computed here on the host, so the encoder runs on
them only without a device-to-host sync in the step.

Masking-rate schedule (`start_probability`, `anneal_steps`, schedules.py): the rate of an item is that of the
optimizer step it is trained at (`step`, set by the data module), so a mask is a pure function of (seed, epoch,
index, step); items without a step (validation, the yardstick) use the final rate. Target slots are bounded at the
run's highest rate, so shapes stay static across the schedule.

Per-row slots (`row_slots`, trainer.last_layer_subset): every row gets the same number K of target slots, the
bound of its length at the highest rate, its own targets first and then `IGNORE` slots at its last position. Slot s
then belongs to row s // K, which is what lets the last encoder layer run on the targets only
(`RobertaForMLM.encode_targets`): its queries are a (B, K) block against the row's keys.

Static masking (dynamic=False) is the same function with `epoch % static_copies` in place of the epoch: each
sequence has exactly `static_copies` fixed patterns, served in turn, like BERT's data duplicated 10 times.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .model.unpadded import Unpadded
from .schedules import MaskSchedule

# Names this generator's stream in Philox's counter, so that other users of (seed, index) draw other numbers.
_STREAM = int.from_bytes(b"mlm-mask", "big")
IGNORE = -100
"""Target of a padded target slot: no loss, no accuracy (`torch.nn.functional.cross_entropy`'s ignore_index)."""


@dataclass
class MaskingCollator:
    """Collate unpadded sequences into a padded, masked batch with sparse targets.

    Items are dicts: `input_ids` (list or array of ints, unpadded), `index` (the sequence's global index in
    its split), `epoch` (times the sampler has served the split before), optionally `nsp_label` (int) and
    `step` (the optimizer step the item is trained at: its masking rate).
    """

    mask_token_id: int
    """Id of <mask> (the last id in this project's tokenizer)."""
    pad_token_id: int
    """Id of <pad>, used to fill sequences to the batch's longest."""
    special_ids: tuple[int, ...]
    """Ids never chosen and never drawn as random replacements (<s>, <pad>, </s>, <unk>, <mask>); <mask> and
    <pad> are added if missing."""
    vocab_size: int
    """Size of the vocabulary, specials included."""
    probability: float = 0.15
    """Share of each sequence's non-special tokens chosen as targets (BERT and RoBERTa: 0.15)."""
    mask_fraction: float = 0.8
    """Of the chosen tokens: replaced by <mask>."""
    random_fraction: float = 0.1
    """Of the chosen tokens: replaced by a random non-special token; the rest stay unchanged."""
    dynamic: bool = True
    """True: a new mask each epoch (RoBERTa). False: `static_copies` fixed masks per sequence (BERT)."""
    static_copies: int = 10
    """Static masking: distinct patterns per sequence, served in turn (BERT: 10)."""
    seed: int = 0
    """Keys every sequence's generator, with its index."""
    pad_to_multiple_of: int = 0
    """0: pad to the batch's longest row, and say where a padded batch's tokens are (unpadded attention). Else
    static shapes for `torch.compile`: pad every batch to a multiple of this, and its target slots always to
    the bound of that shape, so batches of a phase share their shapes (FULL-SENTENCES blocks end at sentence
    boundaries: only ~8% are full length, so nearly every batch is padded)."""

    row_slots: bool = False
    """Lay the target slots out per row: K = `num_targets(T)` at the highest rate for every row of a B x T batch,
    its targets then `IGNORE` slots at its last position (sorted order kept), and say so in the batch (`row_slots`),
    so that the last encoder layer can run on the targets only (trainer.last_layer_subset)."""

    start_probability: float | None = None
    """The rate at step 0 of a masking-rate schedule (linear to `probability` over `anneal_steps`); None: off."""
    anneal_steps: int = 0
    """Steps of the masking-rate schedule."""

    def __post_init__(self) -> None:
        problems = []
        for name in ("probability", "start_probability"):
            p = getattr(self, name)
            if p is not None and not 0.0 < p < 1.0:
                problems.append(f"{name}={p} must be in (0, 1)")
        if self.start_probability is not None and self.anneal_steps < 1:
            problems.append(f"anneal_steps={self.anneal_steps} must be at least 1 with start_probability set")
        if (
            self.mask_fraction < 0
            or self.random_fraction < 0
            or self.mask_fraction + self.random_fraction > 1
        ):
            problems.append(
                f"mask_fraction={self.mask_fraction} and random_fraction={self.random_fraction} must be "
                "non-negative with a sum of at most 1"
            )
        if self.pad_to_multiple_of < 0:
            problems.append(f"pad_to_multiple_of={self.pad_to_multiple_of} must be >= 0")
        if self.static_copies < 1:
            problems.append(f"static_copies={self.static_copies} must be at least 1")
        if not 0 <= self.seed < 2**64:
            problems.append(f"seed={self.seed} must be in [0, 2**64)")
        never = {*self.special_ids, self.mask_token_id, self.pad_token_id}
        if not all(0 <= i < self.vocab_size for i in never):
            problems.append(f"special ids {sorted(never)} must all be below vocab_size={self.vocab_size}")
        elif len(never) >= self.vocab_size:
            problems.append(f"vocab_size={self.vocab_size} leaves no non-special token to mask or draw")
        if problems:
            raise ValueError("MaskingCollator: " + "; ".join(problems))
        self.special_ids = tuple(sorted(never))
        self._is_special = np.zeros(self.vocab_size, dtype=bool)  # id -> never chosen
        self._is_special[list(never)] = True
        self._replacements = np.flatnonzero(~self._is_special)  # ids a random replacement is drawn from
        self.rate = MaskSchedule(self.probability, self.start_probability, self.anneal_steps)

    def _generator(self, index: int, epoch: int) -> np.random.Generator:
        assert index >= 0 and epoch >= 0, f"index={index} and epoch={epoch} must be non-negative"
        if not self.dynamic:
            epoch %= self.static_copies
        key = np.array([self.seed, index], dtype=np.uint64)
        # Draws advance the low counter words; the high words hold the stream name and the epoch.
        counter = np.array([0, 0, epoch, _STREAM], dtype=np.uint64)
        return np.random.Generator(np.random.Philox(key=key, counter=counter))

    def num_targets(self, n: int, step: int | None = None, probability: float | None = None) -> int:
        """How many of a sequence's n non-special tokens are chosen at optimizer step `step` (None: the final
        rate): round(rate x n), at least 1. `probability` overrides the rate."""
        p = self.rate(step) if probability is None else probability
        return min(n, max(1, math.floor(p * n + 0.5))) if n else 0  # round half up, not to even

    def step_counts(self, blocks: list[Any], step: int | None = None) -> tuple[int, int]:
        """(targets, sequences) of an optimizer step's blocks, without masking them: the divisors of the
        step's token-weighted loss, known before its first micro-batch runs."""
        return sum(self.num_targets(self.num_candidates(b), step) for b in blocks), len(blocks)

    def num_candidates(self, ids: Any) -> int:
        """How many of a sequence's tokens may be chosen (its non-special tokens)."""
        return int((~self._is_special[np.asarray(ids, dtype=np.int64)]).sum())

    def mask_sequence(self, ids: Any, index: int, epoch: int, step: int | None = None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One sequence -> (masked ids (L,), sorted chosen positions (K,), original ids there (K,)), int64, at the
        masking rate of optimizer step `step` (None: the final rate)."""
        ids = np.asarray(ids, dtype=np.int64)
        assert ids.ndim == 1, f"sequence {index}: expected a 1-d sequence of ids, got shape {ids.shape}"
        candidates = np.flatnonzero(~self._is_special[ids])  # (n,) positions that may be chosen
        n = candidates.size
        k = self.num_targets(n, step)
        rng = self._generator(index, epoch)
        # 1) which tokens: k of the n candidates, uniformly without replacement
        positions = candidates[np.sort(rng.choice(n, size=k, replace=False, shuffle=False))]  # (k,)
        # 2) what they become: one uniform per chosen token against the 80/10/10 thresholds
        u = rng.random(k)
        random_ids = self._replacements[rng.integers(self._replacements.size, size=k)]  # (k,)
        targets = ids[positions]
        masked = ids.copy()
        masked[positions[u < self.mask_fraction]] = self.mask_token_id
        use_random = (u >= self.mask_fraction) & (u < self.mask_fraction + self.random_fraction)
        masked[positions[use_random]] = random_ids[use_random]
        return masked, positions, targets

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
        first micro-batch of a step, data.py)."""
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

    def target_slots(self, rows: int, length: int) -> int:
        """Target slots of a rows x length batch: the most targets any such batch can have (`num_targets` grows
        with n and with the rate, and a row's n is at most its length)."""
        return rows * self.num_targets(length, probability=self.rate.highest)
