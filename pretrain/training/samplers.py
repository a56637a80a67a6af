"""The samplers of the training and validation streams: which (epoch, block index) pairs each rank reads at each
optimizer step, as arithmetic on the step (data.py's docstring, "Order"), so a resume restores the position
without replaying batches and one device or eight read the same data; and the batch sampler that groups them into
the micro-batches of an optimizer step (`StepBatches`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Sampler

from .schedules import BatchSchedule
from .steps import data_step

Skips = list[list[int]]
"""The data that rollbacks removed, (first data step, count) runs (steps.py); samplers take them or a callable."""


def value_now(value: Any) -> Any:
    """A sampler argument that may be a callable read when iteration begins (after a checkpoint is restored)."""
    return value() if callable(value) else value


class MicroBatch(list):
    """The keys of one micro-batch and the optimizer step it belongs to (`step`: its masking rate). The first
    micro-batch of each optimizer step also carries `step_keys`, the keys of every micro-batch of the step on
    this rank, so that the collator can count the step's targets before the step's first forward pass (the
    loss is normalised by the step's count, module_step.py)."""

    step_keys: list | None = None
    step: int | None = None


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The block order of one epoch: a permutation of range(n) that depends on (seed, epoch) only."""
    return np.random.Generator(np.random.Philox(key=np.array([seed, epoch], dtype=np.uint64))).permutation(n)


class StepSampler(Sampler[tuple[int, int]]):
    """Yields rank `rank`'s (epoch, index) pairs from optimizer step `start_step` up to `max_steps`.

    Its state is one number, the step it starts from, read when iteration begins (after Lightning has
    restored a checkpoint). `len` is the whole run's, as Lightning counts batches from the run's start.
    A later phase of the length schedule passes `first_step`: it serves steps [first_step, max_steps) only, and
    its stream's position 0 is first_step's first sequence.
    """

    def __init__(self, num_blocks: int, seed: int, global_size: int, micro_size: int, world_size: int,
                 rank: int, start_step: int | Callable[[], int], max_steps: int, first_step: int = 0,
                 skips: Skips | Callable[[], Skips] = (), batches: BatchSchedule | None = None):
        assert global_size % (micro_size * world_size) == 0, "checked by batch_geometry"
        assert num_blocks > 0, "no training blocks"
        self.n, self.seed, self.G, self.m, self.W, self.r = num_blocks, seed, global_size, micro_size, world_size, rank
        self.start_step, self.max_steps, self.first_step = start_step, max_steps, first_step
        self.skips = skips
        self.accumulation = global_size // (micro_size * world_size)
        self.batches = batches or BatchSchedule(global_size, micro_size)
        """Each step's global batch (batch-size warmup) and first position in the stream."""
        self._perm: tuple[int, np.ndarray] | None = None

    @property
    def num_steps(self) -> int:
        return max(0, self.max_steps - self.first_step)

    def __len__(self) -> int:
        b = self.batches
        return (b.offset(self.max_steps) - b.offset(self.first_step)) // self.W if self.num_steps else 0

    def _at(self, position: int) -> tuple[int, int]:
        epoch, i = divmod(position, self.n)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, epoch_permutation(self.seed, epoch, self.n))
        return epoch, int(self._perm[1][i])

    def positions(self, step: int) -> Iterator[int]:
        """This rank's global positions for data step `step`, in micro-batch order."""
        m, base = self.batches.micro(step), self.batches.offset(step) - self.batches.offset(self.first_step)
        for a in range(self.accumulation):
            start = base + (a * self.W + self.r) * m
            yield from range(start, start + m)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        yield from self.iter_from(value_now(self.start_step))

    def iter_from(self, start: int) -> Iterator[tuple[int, int]]:
        """The pairs of optimizer steps [max(start, first_step), max_steps), each reading its data step's."""
        skips = value_now(self.skips)
        for step in range(max(start, self.first_step), self.max_steps):
            for g in self.positions(data_step(step, skips)):
                yield self._at(g)


def token_bins(lengths: np.ndarray, budget: int) -> np.ndarray:
    """Boundaries of greedy micro-batches over blocks of these lengths, in order: each takes consecutive blocks
    while their tokens stay within `budget` (a block alone may not, then it is a micro-batch by itself).
    Returns b with micro-batch j = blocks [b[j], b[j+1]); b[0] = 0, b[-1] = len(lengths)."""
    cum = np.cumsum(lengths, dtype=np.int64)
    bounds, start, n = [0], 0, len(lengths)
    while start < n:
        base = int(cum[start - 1]) if start else 0
        start = max(int(np.searchsorted(cum, base + budget, side="right")), start + 1)
        bounds.append(start)
    return np.asarray(bounds, np.int64)


class TokenBudgetSampler(Sampler[list[tuple[int, int]]]):
    """A batch sampler: rank `rank`'s micro-batches of (epoch, index) pairs, each a run of consecutive blocks of
    the epoch's order holding at most `budget` tokens (`token_bins`), from optimizer step `start_step` on.

    The global stream of micro-batches is epoch 0's bins, then epoch 1's (a bin never crosses an epoch); step s
    is micro-batches [s x A x W, (s+1) x A x W), rank r taking every W-th, as `StepSampler` does with sequences.
    So the order depends on (seed, lengths, budget) only, and a resume at step s finds its place from the bin
    counts of the earlier epochs, without replaying batches.
    """

    def __init__(self, lengths: np.ndarray, seed: int, budget: int, accumulation: int, world_size: int, rank: int,
                 start_step: int | Callable[[], int], max_steps: int, skips: Skips | Callable[[], Skips] = ()):
        assert len(lengths) > 0, "no training blocks"
        self.lengths, self.seed, self.budget = np.asarray(lengths, np.int64), seed, budget
        self.A, self.W, self.r = accumulation, world_size, rank
        self.start_step, self.max_steps, self.skips = start_step, max_steps, skips
        self._epoch: tuple[int, np.ndarray, np.ndarray] | None = None  # (epoch, permutation, bin boundaries)
        self._first_bin: list[int] = [0]  # the global index of each epoch's first micro-batch, as far as known

    def __len__(self) -> int:
        return self.max_steps * self.A

    def _bins(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if self._epoch is None or self._epoch[0] != epoch:
            perm = epoch_permutation(self.seed, epoch, len(self.lengths))
            self._epoch = (epoch, perm, token_bins(self.lengths[perm], self.budget))
        return self._epoch[1], self._epoch[2]

    def micro_batch(self, k: int) -> list[tuple[int, int]]:
        """Global micro-batch k."""
        while self._first_bin[-1] <= k:  # count the bins of the epochs before k's
            epoch = len(self._first_bin) - 1
            self._first_bin.append(self._first_bin[-1] + len(self._bins(epoch)[1]) - 1)
        epoch = int(np.searchsorted(self._first_bin, k, side="right")) - 1
        perm, bounds = self._bins(epoch)
        j = k - self._first_bin[epoch]
        return [(epoch, int(i)) for i in perm[bounds[j] : bounds[j + 1]]]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        skips = value_now(self.skips)
        for step in range(value_now(self.start_step), self.max_steps):
            d = data_step(step, skips)
            for a in range(self.A):
                yield self.micro_batch((d * self.A + a) * self.W + self.r)


class PhasedSampler(Sampler[tuple[int, int, int]]):
    """The phases of the length schedule one after the other, as (phase, epoch, index) keys for `PhasedDataset`.

    Phase p is a `StepSampler` over its own split that serves steps [first_step_p, first_step_p+1); the start
    step is read once, when iteration begins, and every phase skips the steps before it by arithmetic.
    """

    def __init__(self, phases: list[StepSampler], start_step: int | Callable[[], int]):
        firsts = [p.first_step for p in phases] + [phases[-1].max_steps]
        assert all(p.max_steps == nxt for p, nxt in zip(phases, firsts[1:], strict=True)), \
            f"phases must tile the run's steps: {[(p.first_step, p.max_steps) for p in phases]}"
        self.phases, self.start_step = phases, start_step

    def __len__(self) -> int:
        return sum(len(p) for p in self.phases)

    @property
    def num_steps(self) -> int:
        return sum(p.num_steps for p in self.phases)

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        start = value_now(self.start_step)
        for phase, sampler in enumerate(self.phases):
            for epoch, index in sampler.iter_from(start):
                yield phase, epoch, index


class StepBatches(Sampler[MicroBatch]):
    """A batch sampler: `sampler`'s keys in micro-batches of `micro_size` sequences (an int, or a function of the
    optimizer step, for batch-size warmup), or its micro-batches as they come with `micro_size=None`, grouped by
    optimizer step, `accumulation` micro-batches each, numbered from `start_step` (read when iteration begins, as
    the sampler reads it); the first micro-batch of a step carries the keys of the whole step
    (`MicroBatch.step_keys`)."""

    def __init__(self, sampler: Sampler, micro_size: int | Callable[[int], int] | None, accumulation: int,
                 start_step: int | Callable[[], int] = 0):
        self.sampler, self.m, self.A, self.start_step = sampler, micro_size, accumulation, start_step

    def __len__(self) -> int:
        return len(self.sampler) if self.m is None else self.sampler.num_steps * self.A

    def __iter__(self) -> Iterator[MicroBatch]:
        number = value_now(self.start_step)
        source = iter(self.sampler)
        while True:
            if self.m is None:
                step = list(itertools.islice(source, self.A))
            else:
                size = self.m(number) if callable(self.m) else self.m
                step = [chunk for _ in range(self.A) if (chunk := list(itertools.islice(source, size)))]
            if not step:
                return
            assert len(step) == self.A, f"the sampler ended inside an optimizer step ({len(step)} of {self.A} " \
                                        "micro-batches)"
            for a, keys in enumerate(step):
                batch = MicroBatch(keys)
                batch.step = number
                if a == 0:
                    batch.step_keys = [k for mb in step for k in mb]
                yield batch
            number += 1


class ValidSampler(Sampler[tuple[int, int]]):
    """Rank r's share of the first `limit` valid blocks (of all `blocks`, or of the given block indices), in
    order, all with the fixed mask of epoch 0."""

    def __init__(self, blocks: int | Sequence[int], world_size: int, rank: int, limit: int | None):
        blocks = range(blocks) if isinstance(blocks, int) else blocks
        n = len(blocks) if not limit else min(len(blocks), limit)
        self.indices = blocks[rank:n:world_size]

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((0, int(i)) for i in self.indices)
