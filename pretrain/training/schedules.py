"""What changes with the optimizer step: the learning rate and the masking rate, each a pure function of the step.

Learning rate (`optim.schedule`), a multiplier of `optim.peak_lr` at optimizer step s (the rate of the update that
makes step s+1): every schedule warms up linearly over `warmup_steps` (from 0 at the first update, the peak at
update warmup_steps + 1, as `transformers` and fairseq), then
- linear: down to `min_lr_ratio` at max_steps (RoBERTa; `get_linear_schedule_with_warmup`, and with a floor
  `get_polynomial_decay_schedule_with_warmup` of power 1 and lr_end = min_lr_ratio x peak);
- cosine: half a cosine down to `min_lr_ratio` at max_steps (`get_cosine_schedule_with_warmup`, with a floor
  `get_cosine_with_min_lr_schedule_with_warmup`);
- wsd: warmup-stable-decay (Hu et al. 2024, MiniCPM): the peak until the last `decay_steps` (or `decay_fraction`
  of max_steps), then `decay_shape` (linear, 1-sqrt, cosine) down to `min_lr_ratio` (`get_wsd_schedule`, whose
  warmup starts from min_lr_ratio, not 0, and whose rate at max_steps is min_lr_ratio even with no decay steps). A
  checkpoint of the stable phase at step S continues into its decay by resuming with max_steps = S + D and
  decay_steps = D (nothing before S changes: the resumed run takes its next rate from the new schedule,
  module.on_train_start), and an exported model by `model.init_from` with warmup_steps 0 and decay_steps =
  max_steps;
- inverse_sqrt: peak x sqrt(timescale / (s - warmup + timescale)), fairseq's and `get_inverse_sqrt_schedule`'s
  (timescale 0: warmup_steps, or 10,000 without warmup, transformers' default).
Each is written as `transformers` writes it, so the multipliers agree to the last bit at every step 0..max_steps
(the tests check it, with `hypothesis` over shapes, warmups, floors, timescales and lengths; linear with a floor
agrees to 1e-12, as the polynomial decay computes it another way). One intended difference: past max_steps (never
reached by a run) cosine stays at its floor where transformers' cosine rises again.

Masking rate (`masking.start_probability`, `masking.anneal_steps`): linear from the start rate to
`masking.probability` over the first anneal_steps steps, then constant (Wettig et al. 2023, "Should You Mask 15%
in Masked Language Modeling?": 0.4 -> 0.15 beats a constant 15%).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from data_prep.config import MaskingConfig, OptimConfig


@dataclass(frozen=True)
class LRSchedule:
    """The multiplier of the peak learning rate at each optimizer step."""

    schedule: str
    warmup_steps: int
    max_steps: int
    decay_steps: int = 0
    decay_shape: str = "linear"
    min_lr_ratio: float = 0.0
    timescale: int = 0

    @classmethod
    def from_config(cls, o: OptimConfig, max_steps: int) -> LRSchedule:
        decay = o.decay_steps or round(o.decay_fraction * max_steps)
        return cls(o.schedule, o.warmup_steps, max_steps, min(decay, max_steps - o.warmup_steps), o.decay_shape,
                   o.min_lr_ratio, o.timescale)

    @property
    def decay_start(self) -> int:
        """The first step after the peak plateau: wsd's decay start; warmup_steps for linear and cosine."""
        return self.max_steps - self.decay_steps if self.schedule == "wsd" else self.warmup_steps

    @property
    def inverse_sqrt_timescale(self) -> int:
        """inverse_sqrt's timescale: `timescale`, else warmup_steps, else 10,000 (`get_inverse_sqrt_schedule`)."""
        return self.timescale or self.warmup_steps or 10_000

    def __call__(self, step: int) -> float:
        # every expression as transformers.optimization writes it, so that the two agree to the last bit
        m = self.min_lr_ratio
        # 1) linear warmup, from 0 (wsd: from min_lr_ratio, as get_wsd_schedule)
        if step < self.warmup_steps:
            progress = step / self.warmup_steps
            return progress * (1.0 - m) + m if self.schedule == "wsd" else progress
        # 2) inverse_sqrt: no end
        if self.schedule == "inverse_sqrt":
            timescale = self.inverse_sqrt_timescale
            return 1.0 / math.sqrt((step + (timescale - self.warmup_steps)) / timescale)
        # 3) wsd's stable phase, and its end (min_lr_ratio from max_steps on, also with no decay steps)
        start = self.decay_start
        if step < start:
            return 1.0
        if self.schedule == "wsd" and step >= self.max_steps:
            return m
        # 4) the decay to min_lr_ratio at max_steps
        if self.schedule == "linear":
            factor = max(0.0, (self.max_steps - step) / max(1, self.max_steps - start))
            return factor * (1.0 - m) + m
        progress = min(1.0, (step - start) / max(1, self.max_steps - start))  # cosine: its floor past max_steps
        shape = self.decay_shape if self.schedule == "wsd" else self.schedule
        if shape == "linear":
            factor = 1.0 - progress
        elif shape == "cosine":
            factor = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:  # 1-sqrt
            factor = 1.0 - math.sqrt(progress)
        return factor * (1.0 - m) + m


@dataclass(frozen=True)
class MaskSchedule:
    """The masking rate at each optimizer step."""

    probability: float
    start_probability: float | None = None
    anneal_steps: int = 0

    @classmethod
    def from_config(cls, m: MaskingConfig) -> MaskSchedule:
        return cls(m.probability, m.start_probability, m.anneal_steps)

    def __call__(self, step: int | None) -> float:
        """The rate at `step`; None (validation, the yardstick): the final rate."""
        if self.start_probability is None or step is None or step >= self.anneal_steps:
            return self.probability
        return self.start_probability + (self.probability - self.start_probability) * step / self.anneal_steps

    @property
    def highest(self) -> float:
        """The largest rate of the run: the bound of the target slots of a static shape."""
        return max(self.probability, self.start_probability or 0.0)


class BatchSchedule:
    """The global batch at each optimizer step, and where each step's sequences start in the data stream.

    Batch-size warmup by tokens (`batch.start_size`, `batch.warmup_tokens`; MosaicBERT and ModernBERT warm the
    batch up over their first billions of tokens): the global batch grows linearly with the tokens trained so far
    (sequences x seq_len, a quantity known without reading data) from start_size to global_size over
    warmup_tokens, in whole multiples of the number of micro-batches per step n = global_size / micro_size: every
    micro-batch of a step grows by whole sequences, the accumulation stays the same, and n does not depend on the
    device count, so the data order is the same on any number of devices. Off (start_size 0): global_size.
    """

    def __init__(self, global_size: int, micro_size: int, start_size: int = 0, warmup_tokens: int = 0,
                 seq_len: int = 1):
        self.G, self.n = global_size, global_size // micro_size
        sizes: list[int] = []
        if start_size and start_size < global_size:
            tokens = 0
            while True:
                grown = start_size + (global_size - start_size) * min(1.0, tokens / max(1, warmup_tokens))
                size = max(start_size, min(global_size, int(grown) // self.n * self.n))
                if size >= global_size:
                    break
                sizes.append(size)
                tokens += size * seq_len
        self._sizes = sizes  # the steps before the batch reaches global_size
        self._offsets = [0]
        for size in sizes:
            self._offsets.append(self._offsets[-1] + size)

    @classmethod
    def from_config(cls, batch, seq_len: int) -> BatchSchedule:
        return cls(batch.global_size, batch.micro_size, batch.start_size, batch.warmup_tokens, seq_len)

    @property
    def ramp_steps(self) -> int:
        """Steps before the batch is full."""
        return len(self._sizes)

    def size(self, step: int) -> int:
        """Sequences in optimizer step `step`, over all ranks and micro-batches."""
        return self._sizes[step] if step < len(self._sizes) else self.G

    def micro(self, step: int) -> int:
        """Sequences per micro-batch at `step`."""
        return self.size(step) // self.n

    def offset(self, step: int) -> int:
        """Sequences before step `step`: its first position in the data stream."""
        if step < len(self._sizes):
            return self._offsets[step]
        return self._offsets[-1] + (step - len(self._sizes)) * self.G
