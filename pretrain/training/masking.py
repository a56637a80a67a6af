"""MLM masking of one sequence: RoBERTa's dynamic masking, or BERT's static masking. The collate function that
batches masked sequences (padding, target slots, where the real tokens are) is batching.py's `MaskingCollator`.

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

Masking-rate schedule (`start_probability`, `anneal_steps`, schedules.py): the rate of an item is that of the
optimizer step it is trained at (`step`, set by the data module), so a mask is a pure function of (seed, epoch,
index, step); items without a step (validation, the yardstick) use the final rate. Target slots are bounded at the
run's highest rate, so shapes stay static across the schedule.

Static masking (dynamic=False) is the same function with `epoch % static_copies` in place of the epoch: each
sequence has exactly `static_copies` fixed patterns, served in turn, like BERT's data duplicated 10 times.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .schedules import MaskSchedule

# Names this generator's stream in Philox's counter, so that other users of (seed, index) draw other numbers.
_STREAM = int.from_bytes(b"mlm-mask", "big")
IGNORE = -100
"""Target of a padded target slot: no loss, no accuracy (`torch.nn.functional.cross_entropy`'s ignore_index)."""


@dataclass
class SequenceMasker:
    """Masks one sequence as a pure function of (seed, epoch, index, step): which tokens are targets and what
    each becomes. batching.py's `MaskingCollator` is this with a batch's layout added."""

    mask_token_id: int
    """Id of <mask> (the last id in this project's tokenizer)."""
    pad_token_id: int
    """Id of <pad>: never chosen; the collator fills sequences to the batch's longest with it."""
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
    start_probability: float | None = None
    """The rate at step 0 of a masking-rate schedule (linear to `probability` over `anneal_steps`); None: off."""
    anneal_steps: int = 0
    """Steps of the masking-rate schedule."""

    def __post_init__(self) -> None:
        problems = self._problems()
        if problems:
            raise ValueError(f"{type(self).__name__}: " + "; ".join(problems))
        never = {*self.special_ids, self.mask_token_id, self.pad_token_id}
        self.special_ids = tuple(sorted(never))
        self._is_special = np.zeros(self.vocab_size, dtype=bool)  # id -> never chosen
        self._is_special[list(never)] = True
        self._replacements = np.flatnonzero(~self._is_special)  # ids a random replacement is drawn from
        self.rate = MaskSchedule(self.probability, self.start_probability, self.anneal_steps)

    def _problems(self) -> list[str]:
        """What is wrong with the settings, each named with its value and the rule."""
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
        if self.static_copies < 1:
            problems.append(f"static_copies={self.static_copies} must be at least 1")
        if not 0 <= self.seed < 2**64:
            problems.append(f"seed={self.seed} must be in [0, 2**64)")
        never = {*self.special_ids, self.mask_token_id, self.pad_token_id}
        if not all(0 <= i < self.vocab_size for i in never):
            problems.append(f"special ids {sorted(never)} must all be below vocab_size={self.vocab_size}")
        elif len(never) >= self.vocab_size:
            problems.append(f"vocab_size={self.vocab_size} leaves no non-special token to mask or draw")
        return problems

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
