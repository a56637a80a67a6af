"""What an optimizer step computes is a pure function of the step: its data, its masks and its dropout.

- Data: optimizer step s reads the data of *data step* `data_step(s, skipped)`: the s-th data step (from 0)
  that no rollback (rollback.py) removed from the stream, so s itself until one does. `skipped` is the removed
  data as (first data step, count) runs, recorded in the checkpoint. Defined by what was removed rather than by
  per-step offsets, the mapping composes over any sequence of rollbacks, also one that diverges earlier than
  the last: a step never reads skipped data, and no data is dropped that was not skipped. The samplers
  (samplers.py) turn a data step into block positions.
- Dropout: before each micro-batch's forward pass the global generators (CPU and every CUDA device) are reseeded
  from (seed, step, micro-batch), as fairseq reseeds from seed + update count before every update
  (`fairseq/trainer.py`, `_set_seed`). The micro-batch is its index in the step over all ranks, a x W + r for
  rank r's a-th micro-batch (W ranks): the index of the sequences it holds in the step's global batch. So
  resume needs no stored RNG state on any rank, the ranks draw distinct masks, and a resume on another device
  count with the same micro-batch size gives every sequence the dropout mask it had before.

  Distinct (seed, step, micro-batch) keys must give distinct generator states on every device. A seed does not
  do it on a CPU: torch's CPU generator is mt19937 seeded with the low 32 bits of `torch.manual_seed`'s value
  only, so with one seed per micro-batch about n^2 / 2^33 pairs of n micro-batches would share their dropout
  masks (a million micro-batches: ~116 pairs; seed 0 already repeats a mask by step 9,358 at 8 micro-batches).
  So `reseed` writes the CPU generator's whole state: the 19,937-bit mt19937 state numpy's `MT19937` takes from a
  `SeedSequence` (624 words hashed from a 128-bit pool), the pool keyed on the fixed-width (seed, step,
  micro-batch): collisions at ~n^2 / 2^129. CUDA's generator (Philox, counter-based) and every other accelerator
  take a 64-bit seed, all of whose bits they use (~n^2 / 2^65), hashed from the same key (`step_seed`). Cost: about
  0.2 ms per micro-batch on one CPU core (numpy's hashing and `torch.manual_seed`), against about 20 ms for a
  4 x 128 micro-batch of configs/tiny.yaml's model (measured when this was written). The alternative, a counter-based
  draw keyed on the index, would need every dropout draw (torch's own CUDA kernels, inductor's) to take a key.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence

import numpy as np
import torch

# Name the streams in the seed sequences, so that they never equal another user's (seed, step, micro-batch): the
# CPU's mt19937 state, and the 64-bit seed of the accelerators.
_CPU_STREAM = int.from_bytes(b"dropout", "big")
_SEED_STREAM = int.from_bytes(b"dropseed", "big")
_MT_WORDS = 624
"""mt19937's state: 624 32-bit words."""
_MT_AT = 24
"""Where those words begin in torch's CPU generator state (`get_rng_state`, 5,056 bytes): after the initial seed
(8 bytes), `left` and `seeded` (4 each) and `next` (8), each word as a uint64 (torch's THGeneratorState)."""


def key_sequence(seed: int, step: int, micro_batch: int, stream: int = _CPU_STREAM) -> np.random.SeedSequence:
    """The SeedSequence of one micro-batch's dropout: its pool hashed from (seed, step, micro-batch, stream), each
    as two 32-bit words, so that distinct keys are distinct entropy (with a varying width, a large seed's high
    word could pass for a step)."""
    key = (seed, step, micro_batch, stream)
    assert all(0 <= k < 1 << 64 for k in key), f"dropout key (seed, step, micro-batch) {key[:3]} must be in [0, 2**64)"
    return np.random.SeedSequence(np.array([k >> shift & 0xFFFFFFFF for k in key for shift in (0, 32)], np.uint32))


def cpu_state_words(seed: int, step: int, micro_batch: int) -> np.ndarray:
    """(624,) uint32: the mt19937 state of one micro-batch's dropout on a CPU, as numpy's `MT19937` takes it from
    `key_sequence`: word 0, of which the recurrence uses the top bit only, has that bit set (never an all-zero
    state), the other 623 are the sequence's."""
    words = key_sequence(seed, step, micro_batch).generate_state(_MT_WORDS, np.uint32)
    words[0] = 0x80000000
    return words


def step_seed(seed: int, step: int, micro_batch: int) -> int:
    """The 64-bit seed of one micro-batch's dropout on CUDA (Philox: all 64 bits count) and other accelerators.
    Not for a CPU, whose generator keeps 32 bits of a seed: `reseed`."""
    words = key_sequence(seed, step, micro_batch, _SEED_STREAM).generate_state(2, np.uint32)
    return int(words[0]) | int(words[1]) << 32


def _cpu_state_template() -> np.ndarray | None:
    """torch's CPU generator state (uint8) just after `manual_seed`: `left` = 1 and `next` = 0 (the first draw
    twists the state), no cached normal sample. Checked to be the layout `_MT_AT` describes: the words of mt19937
    seeded with 12345 are where it says (the same from torch 1.x to 2.13). None for a torch whose layout differs:
    `reseed` then seeds the CPU with `step_seed`, as the accelerators, and says once that its masks may collide."""
    state = torch.Generator().manual_seed(12345).get_state().numpy().copy()
    left_seeded = state[8:16].view(np.int32).tolist()
    first = state[_MT_AT:_MT_AT + 16].view(np.uint64).tolist()  # mt19937's init: x1 = 1812433253 (x0 ^ x0 >> 30) + 1
    if (state.size, left_seeded, first) != (5056, [1, 1], [12345, 2003863422]):
        return None
    return state


_CPU_STATE = _cpu_state_template()


@functools.cache
def _warn_layout() -> None:
    warnings.warn(f"torch {torch.__version__}'s CPU generator state is not the layout pretrain/training/steps.py writes: "
                  "CPU dropout is seeded with 64 bits, of which torch keeps 32 (masks of distant micro-batches may "
                  "repeat)", stacklevel=3)


def reseed(seed: int, step: int, micro_batch: int) -> None:
    """Reseeds every generator for one micro-batch's dropout: the accelerators with `step_seed`, the CPU with the
    whole mt19937 state `cpu_state_words` (module docstring). Touches no tensor's data (no host read)."""
    accelerators = step_seed(seed, step, micro_batch)
    torch.manual_seed(accelerators)  # every device, CUDA's Philox with all 64 bits
    if _CPU_STATE is None:
        _warn_layout()
        return
    state = _CPU_STATE.copy()
    state[:8].view(np.uint64)[0] = accelerators  # what torch.initial_seed() reports
    state[_MT_AT:_MT_AT + 8 * _MT_WORDS].view(np.uint64)[:] = cpu_state_words(seed, step, micro_batch)
    torch.set_rng_state(torch.from_numpy(state))


def data_step(step: int, skipped: Sequence[Sequence[int]] = ()) -> int:
    """The data step that optimizer step `step` trains on: the step-th (from 0) data step outside `skipped`, the
    data that rollbacks removed as sorted, disjoint (first data step, count) runs (`RollbackState.skipped_data`).
    Strictly increasing in `step`; O(runs)."""
    d = step
    for first, count in skipped:  # each run at or below the answer pushes it past the run
        if first > d:
            break
        d += count
    return d
