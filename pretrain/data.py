"""The data module: packed shards -> seeded, resumable, device-independent batches of masked sequences.

Order. The training stream is an endless sequence of *global positions* 0, 1, 2, ...; position g is block
`perm_e[g % N]` of epoch `e = g // N`, where `perm_e` is a permutation of the N training blocks drawn from
(seed, e). Optimizer step s consumes positions [s*G, (s+1)*G) for the global batch G, whatever the number of
devices: rank r's a-th micro-batch of the step takes the slice starting at s*G + (a*W + r)*m (W ranks,
micro-batch m). So the data of a step, and with `masking.py` its masks, depend on the step only: the position
is restored by arithmetic on resume (no replay of skipped batches) and one device or eight see the same data.

The sampler yields (epoch, block index) pairs and the dataset turns them into items for `MaskingCollator`,
whose masks are a pure function of (seed, epoch, index). Validation uses the valid blocks in order with the
mask of epoch 0, so every evaluation of a run, and of every run on the same shards, sees the same masks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from data_prep.config import ConfigError, ExperimentConfig
from data_prep.shards import ShardSplit, open_split, read_meta

from .masking import MaskingCollator


class BlockDataset(Dataset):
    """Items for the collator from one split: indexed by (epoch, block index) pairs."""

    def __init__(self, split: ShardSplit):
        self.split = split

    def __len__(self) -> int:
        return self.split.num_blocks

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, index = key
        item = {"input_ids": self.split.block(index), "index": index, "epoch": epoch}
        if self.split.nsp_labels is not None:
            item["nsp_label"] = int(self.split.nsp_labels[index])
        return item


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """The block order of one epoch: a permutation of range(n) that depends on (seed, epoch) only."""
    return np.random.Generator(np.random.Philox(key=np.array([seed, epoch], dtype=np.uint64))).permutation(n)


class StepSampler(Sampler[tuple[int, int]]):
    """Yields rank `rank`'s (epoch, index) pairs from optimizer step `start_step` up to `max_steps`.

    Its state is one number, the step it starts from, read when iteration begins (after Lightning has
    restored a checkpoint). `len` is the whole run's, as Lightning counts batches from the run's start.
    """

    def __init__(self, num_blocks: int, seed: int, global_size: int, micro_size: int, world_size: int,
                 rank: int, start_step: int | Callable[[], int], max_steps: int):
        assert global_size % (micro_size * world_size) == 0, "checked by batch_geometry"
        assert num_blocks > 0, "no training blocks"
        self.n, self.seed, self.G, self.m, self.W, self.r = num_blocks, seed, global_size, micro_size, world_size, rank
        self.start_step, self.max_steps = start_step, max_steps
        self.accumulation = global_size // (micro_size * world_size)
        self._perm: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.max_steps * self.accumulation * self.m

    def _at(self, position: int) -> tuple[int, int]:
        epoch, i = divmod(position, self.n)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, epoch_permutation(self.seed, epoch, self.n))
        return epoch, int(self._perm[1][i])

    def positions(self, step: int) -> Iterator[int]:
        """This rank's global positions for optimizer step `step`, in micro-batch order."""
        for a in range(self.accumulation):
            start = step * self.G + (a * self.W + self.r) * self.m
            yield from range(start, start + self.m)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        start = self.start_step() if callable(self.start_step) else self.start_step
        for step in range(start, self.max_steps):
            for g in self.positions(step):
                yield self._at(g)


class ValidSampler(Sampler[tuple[int, int]]):
    """Rank r's share of the first `limit` valid blocks, in order, all with the fixed mask of epoch 0."""

    def __init__(self, num_blocks: int, world_size: int, rank: int, limit: int | None):
        n = num_blocks if not limit else min(num_blocks, limit)
        self.indices = range(rank, n, world_size)

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((0, i) for i in self.indices)


def batch_geometry(global_size: int, micro_size: int, world_size: int) -> int:
    """Gradient-accumulation steps for a global batch; a clear error when the sizes do not divide."""
    if global_size % (micro_size * world_size):
        raise ConfigError(
            f"batch.global_size={global_size} is not a multiple of batch.micro_size={micro_size} x "
            f"{world_size} device(s); change one of them"
        )
    return global_size // (micro_size * world_size)


class ShardDataModule(pl.LightningDataModule):
    def __init__(self, cfg: ExperimentConfig, meta_path: str | Path):
        super().__init__()
        self.cfg = cfg
        self.meta_path = Path(meta_path)
        self.meta = read_meta(self.meta_path)
        ids = self.meta["special_ids"]
        m = cfg.masking
        self.collator = MaskingCollator(
            mask_token_id=ids["mask"], pad_token_id=ids["pad"], special_ids=tuple(sorted(set(ids.values()))),
            vocab_size=self.meta["vocab_size"], probability=m.probability, mask_fraction=m.mask_fraction,
            random_fraction=m.random_fraction, dynamic=m.dynamic, static_copies=m.static_copies, seed=cfg.seed,
        )
        self.train: ShardSplit | None = None
        self.valid: ShardSplit | None = None

    def setup(self, stage: str | None = None) -> None:
        self.train = open_split(self.meta_path, "train")
        self.valid = open_split(self.meta_path, "valid") if "valid" in self.meta["splits"] else None

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def _loader(self, dataset: Dataset, sampler: Sampler) -> DataLoader:
        workers = self.cfg.batch.num_workers
        return DataLoader(
            dataset, batch_size=self.cfg.batch.micro_size, sampler=sampler, collate_fn=self.collator,
            num_workers=workers, persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(),
            prefetch_factor=4 if workers > 0 else None,
            # its own generator: creating an iterator must not draw from the global one that dropout uses
            generator=torch.Generator().manual_seed(self.cfg.seed),
        )

    def train_dataloader(self) -> DataLoader:
        world, rank = self._world()
        trainer = self.trainer
        assert self.train is not None, "setup() first"
        sampler = StepSampler(self.train.num_blocks, self.cfg.seed, self.cfg.batch.global_size,
                              self.cfg.batch.micro_size, world, rank,
                              (lambda: trainer.global_step) if trainer is not None else 0, self.cfg.trainer.max_steps)
        return self._loader(BlockDataset(self.train), sampler)

    def val_dataloader(self) -> DataLoader | list:
        if self.valid is None or self.valid.num_blocks == 0:
            return []
        world, rank = self._world()
        # the same blocks whatever the device count: the first limit_val_batches x micro_size, split over ranks
        limit = self.cfg.trainer.limit_val_batches * self.cfg.batch.micro_size
        return self._loader(BlockDataset(self.valid), ValidSampler(self.valid.num_blocks, world, rank, limit))
