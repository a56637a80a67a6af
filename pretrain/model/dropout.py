"""Dropout with a cheaper mask on a CPU, for the hidden states and for attention probabilities.

On a CPU, `torch.nn.functional.dropout` draws its mask with `bernoulli_`, at about 7 ns an element here: 12% of a
base-size training step (12 layers of 4 x 12 x 512 x 512 attention probabilities) and 10% of the small model's. And
attention dropout keeps `scaled_dot_product_attention` on a CPU off its fused kernel: it runs its math path, with
the same draw. Here a mask takes one 64-bit draw (`torch.randint`) per four elements, each 16-bit quarter compared
with a threshold, about 6x faster than `bernoulli_`. The rate is quantised to 1/65536 (0.1 drops 6,554/65,536 =
0.100006) and the kept values are scaled by the inverse of the quantised keep rate, so the expectation is exact.
The draws come from torch's generator, so `torch.manual_seed` (Lightning's `seed_everything`) fixes them.

Elsewhere (CUDA: fused dropout and flash attention with dropout in one kernel) and without dropout, these are
`F.dropout` and `F.scaled_dot_product_attention` themselves: attention's choice is a row of attention_paths.py's
table.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention_paths import attention_path

_LEVELS = 1 << 16


def keep_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """(a bool mask of `shape`, True where kept, at drop rate `p` quantised to 1/65536; the scale that makes the
    kept values' expectation exact: 1 / the quantised keep rate)."""
    drop_levels = round(p * _LEVELS)
    n = math.prod(shape)
    words = torch.randint(-(1 << 63), (1 << 63) - 1, ((n + 3) // 4,), dtype=torch.int64, device=device)
    quarters = words.view(torch.int16)[:n].view(shape)  # uniform on [-32768, 32767]
    return quarters >= drop_levels - _LEVELS // 2, _LEVELS / (_LEVELS - drop_levels)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """`F.dropout(x, p, training)`, with `keep_mask`'s draw on a CPU."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, True)
    keep, scale = keep_mask(x.shape, p, x.device)
    return torch.where(keep, x * scale, 0.0)


class Dropout(nn.Dropout):
    """`nn.Dropout` through `dropout`: the same module (a subclass, so code that finds dropout modules still does),
    the cheaper mask on a CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              dropout_p: float) -> torch.Tensor:
    """`F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)` for (..., L, D) queries and
    (..., S, D) keys and values with a boolean mask (True: may attend). On a CPU with dropout it is SDPA's math path
    written out (half precision computed in float, as that path does) with `dropout`'s mask on the probabilities."""
    if attention_path(q.device.type, q.dtype, dropout_p > 0.0, packed=False) == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    # "math_dropout"
    dtype = q.dtype
    with torch.autocast("cpu", enabled=False):  # as SDPA, whose kernels run below autocast
        if dtype in (torch.float16, torch.bfloat16):
            q, k, v = q.float(), k.float(), v.float()
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (..., L, S)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return (dropout(scores.softmax(-1), dropout_p, True) @ v).to(dtype)
