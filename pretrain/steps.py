"""What an optimizer step computes is a pure function of the step: its data, its masks and its dropout.

- Data: optimizer step s reads the data of *data step* `data_step(s, skipped)`: the s-th data step (from 0)
  that no rollback (rollback.py) removed from the stream, so s itself until one does. `skipped` is the removed
  data as (first data step, count) runs, recorded in the checkpoint. Defined by what was removed rather than by
  per-step offsets, the mapping composes over any sequence of rollbacks, also one that diverges earlier than
  the last: a step never reads skipped data, and no data is dropped that was not skipped. The samplers
  (data.py) turn a data step into block positions.
- Dropout: before each micro-batch's forward pass the global generators (CPU and every CUDA device) are reseeded
  from (seed, step, micro-batch), as fairseq reseeds from seed + update count before every update
  (`fairseq/trainer.py`, `_set_seed`). The micro-batch is its index in the step over all ranks, a x W + r for
  rank r's a-th micro-batch (W ranks): the index of the sequences it holds in the step's global batch. So
  resume needs no stored RNG state on any rank, the ranks draw distinct masks, and a resume on another device
  count with the same micro-batch size gives every sequence the dropout mask it had before.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Names the dropout stream in the seed sequence, so that it never equals another user's (seed, step, micro).
_DROPOUT_STREAM = int.from_bytes(b"dropout", "big")


def step_seed(seed: int, step: int, micro_batch: int) -> int:
    """A 63-bit seed for the dropout of one micro-batch: well mixed (numpy's SeedSequence hashing), so that
    neighbouring steps and micro-batches get unrelated streams."""
    words = np.random.SeedSequence([seed, step, micro_batch, _DROPOUT_STREAM]).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


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
