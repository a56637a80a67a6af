"""Which way one attention call computes: the whole choice as one table, a pure function of what the call is.

The table, first matching row wins (`packed`: the real tokens of a padded batch as (N, H, D) rows, `Unpadded`;
`dense`: (..., L, D) tensors with an optional boolean mask):

| rows   | device   | dtype       | capability | head size     | dropout | compiling           | path           |
|--------|----------|-------------|------------|---------------|---------|---------------------|----------------|
| packed | cuda     | fp16, bf16  | 8.0 - 12.1 | 8k, <= 128    | 0       | any                 | `flash_varlen` |
| packed | not cuda | any         | -          | any           | any     | no, and runs pay    | `runs`         |
| packed | any      | any         | any        | any           | any     | any                 | `repadded`     |
| dense  | cpu      | any         | -          | any           | > 0     | any                 | `math_dropout` |
| dense  | any      | any         | any        | any           | any     | any                 | `sdpa`         |

- `flash_varlen`: torch's variable-length flash kernel over `cu_seqlens` (torch.nn.attention.varlen, where this
  torch has it), no padding at all. Flash attention takes half precision only (an fp32 run, `trainer.precision: 32-true`, gets fp32
  q, k, v: it would fail at its first padded batch without dropout, validation's included), on the GPUs torch
  builds it for (sm80 to sm121, torch's `check_flash_attention_hardware_support`), with head sizes it runs forward
  and backward on every one of them; and it has no dropout.
- `runs`: on a host device, each run of consecutive rows of one length attends as one (rows, H, L, D) batch of
  views, where that saves enough work (unpadded.py's `RUNS_MAX_WORK`). A traced graph takes the re-padded form.
- `repadded`: the fallback: the rows are re-padded to (B, H, T, D) and attend through the dense path below, with
  a key-padding mask; SDPA then picks among its own kernels (memory-efficient and math take fp32).
- `math_dropout`: on a CPU with dropout, SDPA's math path written out with dropout.py's cheaper mask.
- `sdpa`: `torch.nn.functional.scaled_dot_product_attention` itself (its fused kernels; with dropout on CUDA).

The device's capability is read only for a CUDA call (`capability`); tests call `attention_path` with any row's
values, so every CUDA row is exercised for its choice on a machine without one.
"""

from __future__ import annotations

from typing import Literal

import torch

Path = Literal["flash_varlen", "runs", "repadded", "math_dropout", "sdpa"]

FLASH_DTYPES = (torch.float16, torch.bfloat16)
FLASH_CAPABILITY = ((8, 0), (12, 1))
"""The compute capabilities torch's flash kernels are built for, inclusive (sm80: A100, sm90: H100)."""
FLASH_MAX_HEAD = 128
"""Flash-attention 2 runs head sizes up to 256 forward, but its backward above 128 only on sm80 and sm90."""


def attention_path(device: str, dtype: torch.dtype, dropout: bool, packed: bool, compiling: bool = False,
                   capability: tuple[int, int] | None = None, head_size: int = 64, varlen: bool = True,
                   runs_pay: bool = True) -> Path:
    """The table above, for a call on device type `device` ("cpu", "cuda", ...) with q, k, v of `dtype`, dropout
    on or off, packed rows or dense tensors, under `torch.compile` tracing or not. `capability`: the CUDA device's
    (major, minor); `varlen`: whether this torch has the variable-length kernel; `runs_pay`: whether attending by
    runs of rows saves enough here (a property of the batch's lengths, unpadded.py)."""
    if packed:
        if (device == "cuda" and not dropout and varlen and dtype in FLASH_DTYPES and capability is not None
                and FLASH_CAPABILITY[0] <= tuple(capability) <= FLASH_CAPABILITY[1]
                and head_size % 8 == 0 and head_size <= FLASH_MAX_HEAD):
            return "flash_varlen"
        if device != "cuda" and not compiling and runs_pay:
            return "runs"
        return "repadded"
    if device == "cpu" and dropout:
        return "math_dropout"
    return "sdpa"


def capability_of(t: torch.Tensor) -> tuple[int, int] | None:
    """The compute capability of a CUDA tensor's device, else None."""
    return torch.cuda.get_device_capability(t.device) if t.is_cuda else None
