"""Host memory for training on a CPU: keep freed blocks in the process instead of handing them back to the kernel.

Why: glibc's malloc serves every block above its mmap threshold (128 KiB, rising to at most 32 MiB) with a fresh
`mmap` and returns it with `munmap` on free. A training step allocates and frees the same large tensors every step
(a small model's sparse-head logits are 614 x 50,265 floats, 123 MB; the embedding gradient 51 MB), so each step
page-faults them all in again, and the kernel zeroes every page first. On this project's 2-core CPU that is a third
of a small model's step: `aten::fill_`, `copy_` and `_log_softmax` ran at page-fault speed, not memory speed.
With mmap off (`M_MMAP_MAX` 0) and no trimming (`M_TRIM_THRESHOLD` at its maximum), freed blocks go back to
malloc's heap and the next step reuses them, already mapped: about 1.6x at the small model (4x256, vocab 50,265,
32x128, fp32; Hugging Face's Trainer gains the same, 634 -> 1,039 tokens/s in `make bench-train`), at about 20%
more peak RSS (what the heap keeps). `make bench-train` runs Hugging Face's side both with and without it.

`trainer.retain_host_memory` (default on) applies it while a training run's tensors live in host memory (the CPU
accelerator) and restores glibc's behaviour at the end of the run. GPU runs are unchanged: CUDA tensors come from
torch's caching allocator, which already keeps its blocks. Elsewhere than glibc (macOS, musl) it does nothing.
jemalloc or tcmalloc through `LD_PRELOAD` does the same job for a whole process, where a user can install them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any

import pytorch_lightning as pl

# mallopt parameters, from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1
# What glibc's dynamic threshold settles at once a program has freed blocks of 32 MiB and more, as training does:
# its largest mmap threshold (32 MiB on 64-bit), twice that for trimming, and mmap allowed again.
_GLIBC_SETTLED = ((M_MMAP_MAX, 65536), (M_MMAP_THRESHOLD, 32 * 2**20), (M_TRIM_THRESHOLD, 64 * 2**20))


@functools.cache
def _glibc() -> Any | None:
    """The C library when it is glibc (it has mallopt and malloc_trim), else None."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        libc.mallopt, libc.malloc_trim, libc.gnu_get_libc_version  # noqa: B018  (glibc's own symbols)
    except (OSError, AttributeError):
        return None
    return libc


def retain(enabled: bool = True) -> bool:
    """Keep freed blocks in the process (`enabled`), or give them back as glibc does by default; True when the
    C library took the setting. Process-wide: it holds for every thread, and for processes forked later."""
    libc = _glibc()
    if libc is None:
        return False
    settings = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, _INT_MAX)) if enabled else _GLIBC_SETTLED
    ok = all(libc.mallopt(param, value) == 1 for param, value in settings)
    if not enabled:
        libc.malloc_trim(0)  # what the heap kept goes back to the system now
    return ok


class _MallInfo2(ctypes.Structure):
    """glibc's `struct mallinfo2` (glibc >= 2.33)."""

    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def mapped_bytes() -> int:
    """Bytes glibc currently holds in mmap-ed blocks (mallinfo2's hblkhd); -1 without glibc's mallinfo2."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return -1
    libc.mallinfo2.restype = _MallInfo2
    return int(libc.mallinfo2().hblkhd)


class RetainHostMemory(pl.Callback):
    """`retain` for the length of a run whose tensors live in host memory; glibc's default again after it."""

    def __init__(self) -> None:
        self.active = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.strategy.root_device.type == "cpu":
            self.active = retain(True)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.active:
            retain(False)
            self.active = False
