"""Sharded training (`trainer.strategy: fsdp`): torch's FSDP2 (`fully_shard`, DTensor parameters) through Lightning's
`ModelParallelStrategy`, with checkpoints that are as safe as the single-file ones.

Why FSDP2 and not Lightning's first FSDP: torch's first FSDP refuses a CPU-only machine, so sharded training, its
resume and its multi-rank save could not run on the machines this project is tested on; FSDP2 runs on CPU ranks
with gloo (tests/test_fsdp.py), and on GPUs with NCCL, and its checkpoints (`torch.distributed.checkpoint`) reshard on load, so a run
saved on W ranks resumes on W' (torchtitan builds on the same pieces).

What is sharded (`shard_model`): each encoder layer is one unit (its parameters gathered just before it runs and
freed after); the root unit holds the rest, the embeddings, the LM head and the NSP head. The LM head's decoder
is the word embedding matrix (tied, as RoBERTa): one Parameter used by two modules, which FSDP2 must manage in one
unit, and the one unit that is gathered through the whole forward and backward is the root (the head runs after
the encoder, the embeddings' gradient arrives last). The price: the embeddings and heads are whole on every rank
during a step (a base model's 50K x 768 embedding: 39M of its 125M parameters). At rest every parameter, gradient
and optimizer state is sharded 1/W per rank, the root's included.

The objective calls `encode`, `encode_targets` and the last layer's `at_rows`, not the modules' `forward`: they are
registered as forward methods (`register_fsdp_forward_method`) so that FSDP2 gathers the parameters around them.
"""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.strategies import ModelParallelStrategy
from torch.utils.checkpoint import checkpoint

from data_prep.config import ConfigError

from ..model.encoder import RobertaForMLM
from .checkpoint import fsync_dir


class ShardedStrategy(ModelParallelStrategy):
    """FSDP2 over all ranks (data parallel size = world size, no tensor parallelism), `MLMModule.configure_model`
    shards the model. Checkpoints are directories of per-rank `torch.distributed.checkpoint` shards (`.distcp`)
    plus Lightning's `meta.pt` (everything but weights and optimizer state). Lightning writes them straight into
    their target, so a crash mid-write would leave a mixed one; here the ranks write into `.NAME.tmp`, then rank 0
    swaps it in (the old directory is renamed aside and removed only once the new one is in place). A crash
    between the two renames leaves `.NAME.old` alone: resume considers it (checkpoint.resumable_checkpoint), and
    the next save puts it back first rather than delete the only complete copy."""

    def __init__(self, **kwargs: Any):
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, **kwargs)

    def setup_environment(self) -> None:
        # Lightning's "auto" data parallel size is the node count (tensor parallelism within a node): here every
        # rank is a data parallel rank.
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        path = Path(self.broadcast(str(filepath)))
        tmp, old = path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.old")
        if self.is_global_zero:
            if old.exists() and not path.exists():  # a swap cut short between its renames: restore, then go on
                os.replace(old, path)
                fsync_dir(path.parent)
            for stale in (tmp, old):
                if stale.exists():
                    shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
        self.barrier("sharded-checkpoint-clean")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier("sharded-checkpoint-written")
        if self.is_global_zero:
            for f in tmp.iterdir():  # the shards and meta.pt are durable before the swap
                with open(f, "rb") as handle:
                    os.fsync(handle.fileno())
            if path.exists():
                os.replace(path, old)
            os.replace(tmp, path)
            fsync_dir(path.parent)
            if old.exists():
                shutil.rmtree(old) if old.is_dir() else old.unlink()
        self.barrier("sharded-checkpoint-swapped")


def shard_model(model: RobertaForMLM, mesh: Any, precision: str, cpu_offload: bool = False) -> None:
    """FSDP2 over `mesh` (1-d, the data parallel ranks): one unit per encoder layer, then the root (see the
    module's docstring). bf16 precisions on CUDA compute in bf16 and reduce gradients in fp32; `cpu_offload`
    keeps the shards (parameters, gradients, optimizer state) in host memory."""
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        MixedPrecisionPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    options: dict[str, Any] = {"mesh": mesh}
    if str(precision).startswith("bf16") and mesh.device_type == "cuda":
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cpu_offload:
        if mesh.device_type != "cuda":
            raise ConfigError("trainer.fsdp_cpu_offload=true moves shards from GPU to host memory: it needs CUDA "
                              "devices (trainer.accelerator=gpu); set it to false on CPUs")
        options["offload_policy"] = CPUOffloadPolicy()
    for layer in model.encoder.layers:
        fully_shard(layer, **options)
        register_fsdp_forward_method(layer, "at_rows")  # the last layer at the targets only (objective.py)
    fully_shard(model, **options)
    for method in ("encode", "encode_targets"):
        register_fsdp_forward_method(model, method)


def is_sharded(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def checkpoint_layers(model: RobertaForMLM) -> None:
    """Per-layer activation checkpointing: each encoder layer keeps its input only and recomputes the rest in
    backward (non-reentrant `torch.utils.checkpoint`; dropout draws the same masks again, since the checkpoint
    restores the RNG state). Instance methods wrap the layer's `forward` and `at_rows`, so the state dict keeps
    its names (a wrapper module would add a prefix to every key). Before `shard_model`: FSDP2's hooks then
    gather the parameters around the checkpointed call, and again for its recomputation in backward."""
    for layer in model.encoder.layers:
        if getattr(layer, "_checkpointed", False):
            continue
        for name in ("forward", "at_rows"):
            setattr(layer, name, functools.partial(checkpoint, getattr(layer, name), use_reentrant=False))
        layer._checkpointed = True


def local_numel(tensors: Any) -> int:
    """Elements this rank holds of `tensors` (a DTensor's local shard, a plain tensor whole)."""
    from torch.distributed.tensor import DTensor

    return sum((t.to_local() if isinstance(t, DTensor) else t).numel() for t in tensors)



def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's whole state dict. Sharded: a collective (every rank must call it), the tensors gathered on the
    CPU of rank 0 (the other ranks get an empty dict)."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
