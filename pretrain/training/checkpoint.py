"""Checkpoints that never lose work: atomic writes, preemption signals, and choosing what to resume from.

- `AtomicCheckpointIO` writes each checkpoint to a temporary file in the same directory, fsyncs it and renames
  it over the target, so a crash, a SIGKILL or a full disk mid-write leaves the previous file intact.
- `PreemptionCheckpoint` turns SIGTERM (and SIGUSR1, unless Lightning's SLURM requeue owns it) into "save at the
  next optimizer-step boundary, then stop", so a preempted job resumes exactly.
- `resumable_checkpoint` picks the newest complete checkpoint by its step (last.ckpt, a step checkpoint, or the
  old copy of an interrupted sharded swap), reporting any truncated or corrupt one by path.
- Sharded checkpoints (`trainer.strategy: fsdp`, sharding.py's `ShardedStrategy`) are directories of per-rank
  `torch.distributed.checkpoint` shards plus `meta.pt`, written into a temporary directory and swapped in; `probe`,
  `load_full` and `resumable_checkpoint` take them like files.
- `check_compatible` refuses a checkpoint whose model differs from the config, naming the differing keys, or
  whose shards came from another tokenizer.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import tempfile
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning_fabric.utilities.load import _METADATA_FILENAME

from data_prep.config import ConfigError, ExperimentConfig


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes whole files only (below). Reads a sharded (FSDP2) directory too, gathered into one process's
    checkpoint (`load_full`, optimizer state by index), so that a run sharded on W ranks resumes on one device or
    under DDP (with `trainer.strategy: fsdp`, the strategy reads the shards itself, resharded)."""

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        if not Path(path).is_dir():
            return super().load_checkpoint(path, weights_only=weights_only)
        ckpt = load_full(Path(path))
        ckpt["optimizer_states"] = [_by_index(state) for state in ckpt["optimizer_states"]]
        return ckpt

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        fsync_dir(path.parent)  # make the rename itself durable


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PreemptionCheckpoint(pl.Callback):
    """On SIGTERM/SIGUSR1: finish the current optimizer step, save `last.ckpt`, stop cleanly."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, last_path: Path):
        self.last_path = last_path
        self.received: int | None = None
        self.stopped = False  # a signal stopped the run (train.fit then does not call it incomplete)
        self._previous: dict[int, Any] = {}
        self._group: Any = None  # the process group of the stop flag (`_any_rank`)

    def _handler(self, signum: int, frame: Any) -> None:
        self.received = signum

    def _any_rank(self, flag: bool) -> bool:
        """Whether any rank has the flag: an all-reduce of a host tensor over a gloo group, so that the check
        costs no device sync (a reduce over NCCL of a device tensor, read on the host, would drain the queue
        every step)."""
        import torch.distributed as dist

        if self._group is None:
            self._group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
        t = torch.tensor([int(flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._group)
        return bool(t[0])

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Installed after Lightning's own handlers, so ours decide; SLURM's requeue handler on SIGUSR1 is kept.
        for sig in self.SIGNALS:
            current = signal.getsignal(sig)
            if sig == signal.SIGUSR1 and current not in (signal.SIG_DFL, signal.SIG_IGN, None):
                continue
            self._previous[sig] = current
            signal.signal(sig, self._handler)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # only at optimizer-step boundaries: one collective per step, not per micro-batch
        received = self.received
        if trainer.world_size > 1:  # every rank must agree, or the collective save would hang
            received = self._any_rank(bool(received))
        if not received:
            return
        self.stopped = True
        if hasattr(pl_module, "raise_if_diverged"):
            pl_module.raise_if_diverged()  # never save weights from after a bad step (rollback.py)
        trainer.save_checkpoint(self.last_path)
        if trainer.global_rank == 0:
            print(f"\npreempted (signal {self.received}): saved {self.last_path} at step {trainer.global_step}; "
                  "`make resume` continues exactly from here", flush=True)
        trainer.should_stop = True

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()


def probe(path: Path) -> tuple[int | None, str | None]:
    """(global step, None) when the checkpoint at `path` reads back completely; else (None, why not). A sharded
    (FSDP) checkpoint is a directory: the shards' index and its meta.pt (everything but the tensors) must read."""
    try:
        ckpt = _read_light(path)
    except Exception as e:  # torch raises RuntimeError, EOFError, pickle errors... for damaged files
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if not isinstance(ckpt, dict) or "global_step" not in ckpt or ("state_dict" not in ckpt and not path.is_dir()):
        return None, "not a training checkpoint of this project"
    return int(ckpt["global_step"]), None


def _read_light(path: Path) -> Any:
    """The checkpoint's dict with its tensors mapped, not read (a sharded directory: its meta.pt)."""
    if path.is_dir():
        from torch.distributed.checkpoint import FileSystemReader

        FileSystemReader(path).read_metadata()
        return torch.load(path / _METADATA_FILENAME, map_location="cpu", weights_only=True)
    # mmap reads the archive's index and maps the tensors: a truncated file fails here without a full load
    return torch.load(path, map_location="cpu", mmap=True, weights_only=True)


def read_record(path: Path, key: str) -> Any:
    """One plain entry of a checkpoint (e.g. the time budget's decision), without loading its weights."""
    return _read_light(Path(path)).get(key)


def load_full(path: Path) -> dict[str, Any]:
    """A checkpoint as one dict on the CPU (`state_dict`, `global_step`, `hyper_parameters`, ...), also from a
    sharded (FSDP) directory, whose shards are gathered here, on one process without a process group, whatever
    the number of ranks that wrote them (the whole model must fit in memory)."""
    if not path.is_dir():
        return torch.load(path, map_location="cpu", weights_only=True)
    from lightning_fabric.utilities.load import _load_distributed_checkpoint

    ckpt = _load_distributed_checkpoint(path)  # the shards' tensors, whole, with meta.pt's entries
    if "state_dict" not in ckpt and "model" in ckpt:  # the layout of Lightning's first FSDP (before FSDP2)
        ckpt["state_dict"] = ckpt.pop("model")
    # ModelParallelStrategy stores optimizer i as `optimizer_i`; a file checkpoint has them as a list
    optimizers = sorted((k for k in ckpt if re.fullmatch(r"optimizer_\d+", k)), key=lambda k: int(k.split("_")[1]))
    ckpt["optimizer_states"] = [ckpt.pop(k) for k in optimizers]
    return ckpt


def _by_index(state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state keyed by parameter name (torch.distributed.checkpoint's) keyed as `Optimizer.state_dict`
    keys it: by the parameter's position over the groups, in order."""
    index: dict[str, int] = {}
    groups = [{**g, "params": [index.setdefault(name, len(index)) for name in g["params"]]}
              for g in state["param_groups"]]
    return {"state": {index[name]: v for name, v in state["state"].items()}, "param_groups": groups}


_STEP_NAME = re.compile(r"step-(\d+)(?:-v(\d+))?\.ckpt")
"""A step checkpoint's name; Lightning appends -vK where the name is taken (by an older run in the run_dir)."""


def _step_of(path: Path) -> tuple[int, int]:
    """(step, K) in a step checkpoint's name (also its `.NAME.old`), (-1, 0) for another name."""
    m = _STEP_NAME.fullmatch(_name_of(path))
    return (int(m[1]), int(m[2] or 0)) if m else (-1, 0)


def checkpoint_versions(directory: Path) -> frozenset[tuple[int, int, int]]:
    """(device, inode, mtime) of every entry of `directory`. Checkpoints are written under a temporary name and
    renamed (a new inode), so one written after this call is outside the set, also where it replaced a file of
    the same name, and a renamed one (a sharded swap's `.NAME.old`) keeps its version."""
    versions = set()
    for entry in directory.iterdir() if directory.is_dir() else ():
        identity = _identity(entry)
        if identity is not None:
            versions.add(identity)
    return frozenset(versions)


def _identity(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:  # removed meanwhile (the keep_last rotation)
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns


def resumable_checkpoint(directory: Path, log=print, exclude: frozenset[tuple[int, int, int]] = frozenset(),
                         ) -> tuple[Path, int] | None:
    """(path, step) of the newest complete checkpoint in `directory`, or None. The candidates: `last.ckpt` and
    the `step-*.ckpt`, since a kill between the two writes of a save leaves the step checkpoint the newer; and
    for a name that is missing, its `.NAME.old`, the only complete copy left by a sharded swap cut short between
    its renames (sharding.py's `ShardedStrategy`). Newest: the highest step; on a tie the one written last, then
    last.ckpt, then the highest -vK. Within a run the two copies of a step hold the same state and last.ckpt is
    written after the step checkpoint, so last.ckpt, the name the messages give, wins; where two runs share a
    run_dir (a decay started from the stable run's step-0000010.ckpt writes step-0000015-v1.ckpt beside its
    last.ckpt of step 15), the later write is the newer run's. Unreadable ones are reported by path and passed
    over; `exclude`: versions not to consider (`checkpoint_versions`)."""
    found = []
    for name in ["last.ckpt", *(p.name for p in directory.glob("step-*.ckpt")),
                 *(p.name[1:-len(".old")] for p in directory.glob(".step-*.ckpt.old"))]:
        path = directory / name
        if not path.exists() and (directory / f".{name}.old").exists():
            path = directory / f".{name}.old"
        if path.exists() and path not in found:
            found.append(path)
    # last.ckpt first (its step is known once read), then the step checkpoints by the step in their names,
    # newest first, up to the first whose step is below the best so far
    found.sort(key=lambda p: (_name_of(p) != "last.ckpt", -_step_of(p)[0]))
    best: tuple[tuple[int, int, bool, int], Path] | None = None  # ((step, written, is last.ckpt, K), path)
    for path in found:
        if best is not None and _name_of(path) != "last.ckpt" and _step_of(path)[0] < best[0][0]:
            break
        identity = _identity(path)
        if identity is None or (exclude and identity in exclude):
            continue
        step, problem = probe(path)
        if problem is not None:
            log(f"warning: checkpoint {path} is unreadable ({problem}); trying the previous one")
            continue
        key = (step, identity[2], _name_of(path) == "last.ckpt", _step_of(path)[1])
        if best is None or key > best[0]:
            best = (key, path)
    return (best[1], best[0][0]) if best else None


def _name_of(path: Path) -> str:
    """The checkpoint's name: `.NAME.old` is NAME's copy."""
    name = path.name
    return name[1:-len(".old")] if name.startswith(".") and name.endswith(".old") else name


def check_compatible(saved: dict[str, Any], cfg: ExperimentConfig, path: Path, saved_meta: dict[str, Any] | None = None,
                     meta: dict[str, Any] | None = None) -> None:
    """Refuse to resume a checkpoint whose model (or data geometry) differs from the config, or whose shards
    (`saved_meta`, its meta.json) came from another tokenizer than the run's shards now (`meta`)."""
    # the same sizes are not enough: ids from another tokenizer mean other tokens (e.g. after `make tokenizer
    # ARGS=--force` in a run_dir that has checkpoints)
    was, now = (saved_meta or {}).get("tokenizer_sha256"), (meta or {}).get("tokenizer_sha256")
    if was and now and was != now:
        raise ConfigError(
            f"{path} was trained on shards of another tokenizer (tokenizer.json sha256 {was[:12]}..., the "
            f"run's tokenizer is now {now[:12]}...): restore that tokenizer, or use a new run_dir to start afresh"
        )
    differing = []
    # the length schedule decides which shards each step reads, so it is part of the data geometry
    data_keys = ("seq_len", "packing", "short_seq_len", "short_fraction")
    # the global batch decides which data each step reads (with by_tokens, the micro-batch too: it is the token
    # budget); the device count and accumulation may change (elastic resume, module.on_load_checkpoint)
    # (with batch-size warmup the micro-batch too: it sets the steps by which the batch grows)
    batch_keys = ("global_size", "by_tokens", "start_size", "warmup_tokens") + (
        ("micro_size",) if cfg.batch.by_tokens or cfg.batch.start_size else ())
    for section, keys in (("model", None), ("data", data_keys), ("tokenizer", ("vocab_size",)), ("batch", batch_keys)):
        new_section = getattr(cfg, section)
        old, new = saved.get(section, {}), new_section.__dict__
        # keys added after a checkpoint was written read as their defaults
        defaults = {f.name: f.default for f in dataclasses.fields(new_section)}
        for key in keys or new:
            if key == "init_from":
                continue
            if old.get(key, defaults[key]) != new[key]:
                differing.append(f"{section}.{key} (checkpoint {old.get(key)!r}, config {new[key]!r})")
    if differing:
        raise ConfigError(
            f"{path} was trained with a different configuration: {'; '.join(differing)}. "
            f"Use the checkpoint's settings, or a new run_dir to start afresh"
        )
