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

Length schedule (BERT, arXiv 1810.04805, appendix A.2: 90% of the steps at 128 tokens, the rest at 512). With
`data.short_seq_len` set, steps [0, switch) read the short shards and steps [switch, max_steps) the long ones,
switch = round(short_fraction * max_steps); the global batch stays G sequences in both phases. Each phase is its
own step-indexed stream (`StepSampler` with `first_step`): the long phase's positions count from the switch, so
its first step reads epoch 0 of the long blocks, and a resume before or after the switch is still arithmetic.
Validation always uses the long valid blocks.
"""

from __future__ import annotations

import atexit
import multiprocessing as mp
import signal
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from data_prep.config import ConfigError, ExperimentConfig
from data_prep.shards import ShardError, ShardSplit, open_split, read_meta, short_phase

from .batching import MaskingCollator
from .samplers import (
    PhasedSampler,
    StepBatches,
    StepSampler,
    TokenBudgetSampler,
    ValidSampler,
    value_now,
)
from .schedules import BatchSchedule
from .steps import data_step

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
"""The signals a loader worker leaves to the trainer."""


def leave_stop_signals_to_the_trainer(worker_id: int) -> None:
    """A loader worker ignores `STOP_SIGNALS`: they are the trainer's to act on. SLURM signals every process of a
    job step, and a terminal's Ctrl-C its whole process group, workers included.
    - SIGTERM/SIGUSR1: `PreemptionCheckpoint` saves at the next step boundary, for which the workers must still
      deliver batches; a worker killed by SIGTERM made the trainer fail ("DataLoader worker is killed by signal")
      instead of saving.
    - SIGINT: a worker ended by it while the trainer's own KeyboardInterrupt was swallowed (raised inside a
      callback whose exceptions Python ignores) made the next batch fail with "DataLoader worker exited
      unexpectedly" and a traceback.
    The worker was born with them blocked (`SignalSafeLoader`), so one that arrived while it started waits, and is
    discarded here. A worker still ends with its trainer: the loader stops it, it sees its parent gone, or the
    trainer's exit kills it (`_kill_daemonic_children`)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


class SignalSafeLoader(DataLoader):
    """A DataLoader whose worker processes start with `STOP_SIGNALS` blocked, until their init function ignores
    them: a worker starting at the moment of a SLURM SIGTERM (validation's, say, whose workers start at the first
    validation) was killed by it before it could ignore it.

    A Ctrl-C meanwhile is held back in this process too, until the iterator is built: the mask blocks it for this
    thread only, so with any other thread alive (Lightning's, torch's) it reached that one, and Python raised
    KeyboardInterrupt in the middle of the iterator's construction, whose half-built object then printed
    'Exception ignored ... has no attribute' from its __del__."""

    def _get_iterator(self):  # noqa: ANN202 - torch's private hook, called once per worker start
        if self.num_workers == 0 or not hasattr(signal, "pthread_sigmask"):
            return super()._get_iterator()
        # only the main thread may set a handler; None: one set outside Python, which could not be put back
        main = threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is not None
        held: list[int] = []
        previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum)) if main else None
        before = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            return super()._get_iterator()  # forks (or spawns) the workers, which inherit the mask
        finally:
            if main:
                signal.signal(signal.SIGINT, previous)
            signal.pthread_sigmask(signal.SIG_SETMASK, before)  # one that arrived meanwhile is delivered now
            if held:
                signal.raise_signal(signal.SIGINT)  # the Ctrl-C held back, now that the iterator is whole


def _kill_daemonic_children() -> None:
    """At exit, SIGKILL the daemonic child processes left (loader workers after Ctrl-C: Lightning's shutdown does not
    stop them). Registered after multiprocessing's own exit handler, so it runs first: that one terminates them with
    SIGTERM, which the workers ignore, and would then wait for them for ever."""
    for process in mp.active_children():
        if process.daemon:
            process.kill()


atexit.register(_kill_daemonic_children)


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

    def block(self, key: tuple[int, int]) -> np.ndarray:
        return self.split.block(key[1])

    def __getitems__(self, keys: list) -> list[dict[str, Any]]:
        return _items(self, keys)


class PhasedDataset(Dataset):
    """Items from one split per phase of the length schedule: indexed by (phase, epoch, block index)."""

    def __init__(self, splits: list[ShardSplit]):
        self.phases = [BlockDataset(s) for s in splits]

    def __len__(self) -> int:
        return sum(len(p) for p in self.phases)

    @property
    def num_steps(self) -> int:
        return sum(p.num_steps for p in self.phases)

    def __getitem__(self, key: tuple[int, int, int]) -> dict[str, Any]:
        phase, epoch, index = key
        return self.phases[phase][epoch, index]

    def block(self, key: tuple[int, int, int]) -> np.ndarray:
        return self.phases[key[0]].split.block(key[2])

    def __getitems__(self, keys: list) -> list[dict[str, Any]]:
        return _items(self, keys)


def _items(dataset: BlockDataset | PhasedDataset, keys: list) -> list[dict[str, Any]]:
    """DataLoader's batched fetch: the items of a micro-batch, the first also holding the step's blocks."""
    items = [dataset[k] for k in keys]
    step = getattr(keys, "step", None)
    if step is not None:
        for item in items:
            item["step"] = step
    step_keys = getattr(keys, "step_keys", None)
    if step_keys is not None and items:
        items[0]["step_blocks"] = [dataset.block(k) for k in step_keys]
    return items


def length_schedule(cfg: ExperimentConfig) -> list[tuple[int, int]]:
    """(first optimizer step, block length) of each phase: BERT's [(0, short), (switch, seq_len)], else one."""
    d = cfg.data
    if not d.short_seq_len:
        return [(0, d.seq_len)]
    return [(0, d.short_seq_len), (round(d.short_fraction * cfg.trainer.max_steps), d.seq_len)]


def seq_len_at(cfg: ExperimentConfig, step: int) -> int:
    """The block length optimizer step `step` trains on."""
    return [length for first, length in length_schedule(cfg) if first <= step][-1]


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
            start_probability=m.start_probability, anneal_steps=m.anneal_steps,
            # compile: static shapes (a phase's batches nearly all pad to seq_len), padded attention
            pad_to_multiple_of=min(64, cfg.data.seq_len) if cfg.trainer.compile else 0,
            row_slots=cfg.trainer.last_layer_subset,  # the last layer at the targets only (model.encode_targets)
        )
        self.phase_metas = [self._short_meta(), self.meta_path] if cfg.data.short_seq_len else [self.meta_path]
        self.train_phases: list[ShardSplit] = []
        self.valid: ShardSplit | None = None
        self.val_names: list[str] = []  # the sources of the validation loaders, when there is one per source

    def _short_meta(self) -> Path:
        """meta.json of the short shards of the length schedule, checked against the config and the long shards."""
        want = self.cfg.data.short_seq_len
        short = short_phase(self.meta_path)
        if short is None or short[0] != want:
            has = f"points to seq_len {short[0]}" if short else "has no short shards"
            raise ShardError(f"{self.meta_path} {has}, the config asks for data.short_seq_len={want}: run "
                             "`make data` (prepare_data) with this config")
        meta = read_meta(short[1])
        for key in ("tokenizer_sha256", "packing", "vocab_size"):
            if meta[key] != self.meta[key]:
                raise ShardError(f"{short[1]}: {key} {meta[key]!r} differs from the long shards' "
                                 f"{self.meta[key]!r}: run `make data` with this config")
        return short[1]

    def setup(self, stage: str | None = None) -> None:
        self.train_phases = [open_split(p, "train") for p in self.phase_metas]
        self.valid = open_split(self.meta_path, "valid") if "valid" in self.meta["splits"] else None

    def _world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def _loader(self, dataset: Dataset, sampler: Sampler, batches: bool = False) -> DataLoader:
        """A loader over `sampler`'s items in micro-batches of micro_size, or over the micro-batches of a batch
        sampler (`batches`)."""
        workers = self.cfg.batch.num_workers
        how = {"batch_sampler": sampler} if batches else {"batch_size": self.cfg.batch.micro_size, "sampler": sampler}
        return SignalSafeLoader(
            dataset, **how, collate_fn=self.collator,
            num_workers=workers, persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(),
            prefetch_factor=4 if workers > 0 else None, worker_init_fn=leave_stop_signals_to_the_trainer,
            # its own generator: creating an iterator must not draw from the global one that dropout uses
            generator=torch.Generator().manual_seed(self.cfg.seed),
        )

    def train_dataloader(self) -> DataLoader:
        world, rank = self._world()
        trainer = self.trainer
        assert self.train_phases, "setup() first"
        b, max_steps = self.cfg.batch, self.cfg.trainer.max_steps
        start = (lambda: trainer.global_step) if trainer is not None else 0
        # read when iteration begins, after a checkpoint (and its rollback record) is restored
        module = trainer.lightning_module if trainer is not None else None
        skips = (lambda: module.rollbacks.skipped_data) if module is not None and hasattr(module, "rollbacks") else ()
        accumulation = batch_geometry(b.global_size, b.micro_size, world)
        if b.by_tokens:
            split = self.train_phases[0]
            sampler = TokenBudgetSampler(split.block_lengths(), self.cfg.seed, b.micro_size * split.seq_len,
                                         accumulation, world, rank, start, max_steps, skips)
            return self._loader(BlockDataset(split), StepBatches(sampler, None, accumulation, start), batches=True)
        firsts = [first for first, _ in length_schedule(self.cfg)]
        growth = BatchSchedule.from_config(b, self.cfg.data.seq_len)
        phases = [StepSampler(split.num_blocks, self.cfg.seed, b.global_size, b.micro_size, world, rank, 0, end, first,
                              skips, growth)
                  for split, first, end in zip(self.train_phases, firsts, [*firsts[1:], max_steps], strict=True)]
        # a step reads its data step's sequences (steps.py), in micro-batches of that step's size
        micro = b.micro_size if not growth.ramp_steps else (lambda step: growth.micro(data_step(step, value_now(skips))))
        batches = StepBatches(PhasedSampler(phases, start), micro, accumulation, start)
        return self._loader(PhasedDataset(self.train_phases), batches, batches=True)

    def val_sources(self) -> list[tuple[str, np.ndarray]]:
        """(name, valid block indices) of each source with validation blocks, when the valid split was packed
        source by source (`data_prep.build.valid_by_source`: the entries of an explicit corpus.valid, else the train
        sources); else []. An unnamed source is `source<k>`."""
        per_source = self.valid.source_blocks() if self.valid is not None else None
        if per_source is None:
            return []
        c = self.cfg.corpus
        key, sources = ("corpus.valid", c.valid_entries) if c.valid else ("corpus.train", c.sources)
        if len(per_source) != len(sources):
            raise ShardError(f"{self.meta_path}: its valid split has {len(per_source)} sources, {key} has "
                             f"{len(sources)}: run `make data` with this config")
        return [(s.name or f"source{k}", blocks) for k, (s, blocks) in enumerate(zip(sources, per_source, strict=True))
                if len(blocks)]

    def val_dataloader(self) -> DataLoader | list:
        """One loader over the valid blocks; with named sources, one per source (`val/loss/<name>`)."""
        if self.valid is None or self.valid.num_blocks == 0:
            return []
        world, rank = self._world()
        # the same blocks whatever the device count: the first limit_val_batches x micro_size, split over ranks
        limit = self.cfg.trainer.limit_val_batches * self.cfg.batch.micro_size
        sources = self.val_sources()
        self.val_names = [name for name, _ in sources]
        if not sources:
            return self._loader(BlockDataset(self.valid), ValidSampler(self.valid.num_blocks, world, rank, limit))
        # the limit shared equally by the sources, so each source's loss has about the same precision; val/loss
        # is then the token-weighted mean over these blocks (all blocks of each source when the limit is 0)
        each = -(-limit // len(sources)) if limit else 0
        return [self._loader(BlockDataset(self.valid), ValidSampler(blocks, world, rank, each))
                for _, blocks in sources]
