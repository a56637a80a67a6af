"""A padded batch run unpadded: where its real tokens are (`Unpadded`), and how those packed rows attend.

The encoder (encoder.py) drops the pad tokens before the embeddings and runs every per-token layer on the real
tokens only; only attention sees the rows again. Which way it does (torch's variable-length flash kernel, runs of
rows of one length, or re-padded around `scaled_dot_product_attention`) is a row of attention_paths.py's table;
this module is what each row runs. The collator computes `Unpadded` on the host with the batch, so the step needs
no `nonzero` on the device.

Shapes: B batch, T sequence length, N real tokens, H heads, D head size, L a run's row length, m its rows.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .attention_paths import attention_path, capability_of
from .dropout import attention


class Unpadded(NamedTuple):
    """Where a padded batch's real tokens are: all the encoder needs to run on them only.

    The collator computes it on the host with the batch (`from_mask` there), so the step needs no `nonzero` on
    the device (a host sync on a GPU)."""

    index: torch.Tensor
    """(N,) flat indices into the B*T positions of the real tokens, row by row."""
    cu_seqlens: torch.Tensor
    """(B+1,) int32 offsets of each row's tokens in that packed order (the varlen kernels' format)."""
    max_seqlen: int
    """The longest row's real tokens."""
    lengths: list[int] | None = None
    """Each row's real tokens, as host ints, or None: read from `cu_seqlens` where needed (attention on a CPU)."""

    @staticmethod
    def from_mask(attention_mask: torch.Tensor) -> Unpadded | None:
        """From a (B, T) mask (nonzero: real token); None when nothing is padded. Reads the mask on the host."""
        mask = attention_mask.bool()
        lengths = mask.sum(dim=1)  # (B,)
        index = mask.flatten().nonzero().squeeze(1)  # (N,)
        if index.numel() == mask.numel():
            return None
        cu = torch.zeros(mask.shape[0] + 1, dtype=torch.int32, device=mask.device)
        cu[1:] = lengths.cumsum(0)
        host = lengths.tolist()
        return Unpadded(index, cu, max(host, default=0), host)

    @staticmethod
    def from_batch(batch: dict) -> Unpadded | None:
        """From a collated batch's keys (`as_batch`); None when the batch has none (nothing padded)."""
        if "unpad_index" not in batch:
            return None
        return Unpadded(batch["unpad_index"], batch["cu_seqlens"], batch["max_seqlen"], batch.get("row_lengths"))

    def as_batch(self) -> dict:
        """The keys a collator adds to a padded batch: `unpad_index`, `cu_seqlens`, `max_seqlen`, `row_lengths`."""
        return {"unpad_index": self.index, "cu_seqlens": self.cu_seqlens, "max_seqlen": self.max_seqlen,
                "row_lengths": self.lengths}

    def rows(self, x: torch.Tensor, B: int, T: int) -> torch.Tensor:
        """Packed (N, ...) -> (B * T, ...), zeros at the pads."""
        return x.new_zeros(B * T, *x.shape[1:]).index_copy(0, self.index, x)

    def pad(self, t: torch.Tensor, B: int, T: int) -> torch.Tensor:
        """Packed heads (N, H, D) -> (B, H, T, D), zeros at the pads."""
        return self.rows(t, B, T).view(B, T, *t.shape[1:]).transpose(1, 2)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, unpadded: Unpadded, key_mask: torch.Tensor,
                     dropout_p: float) -> torch.Tensor:
    """Attention of the packed rows (N, H, D) -> (N, H, D): each token sees its own row's real tokens, by the
    path attention_paths.py's table gives. On CUDA in half precision without dropout this is torch's
    variable-length flash kernel over `cu_seqlens` (no padding at all). On a CPU, where that saves enough
    (`RUNS_MAX_WORK`), each run of consecutive rows of one length attends as one (rows, H, L, D) batch, views of
    the packed tokens: no padding and no mask, so attention's work falls with the padding (quadratically), for one
    call per run. Else (fp32 or an older GPU, dropout, a traced graph) the rows are re-padded to (B, H, T, D) for
    `scaled_dot_product_attention` with the key-padding mask, and packed again."""
    N, H, D = q.shape
    B, T = key_mask.shape[0], key_mask.shape[-1]
    compiling = torch.compiler.is_compiling()
    runs = _runs(unpadded) if not q.is_cuda and not compiling else None  # a traced graph takes the re-padded form
    pays = runs is not None and (len(runs) <= RUNS_FEW or sum(m * L * L for L, m in runs) <= RUNS_MAX_WORK * B * T * T)
    kernel = _varlen_kernel()
    path = attention_path(q.device.type, q.dtype, dropout_p > 0.0, packed=True, compiling=compiling,
                          capability=capability_of(q), head_size=D, varlen=kernel is not None, runs_pay=pays)
    if path == "runs":
        return _attention_by_runs(q, k, v, runs, dropout_p)
    if path == "flash_varlen":  # not run on a GPU yet: see docs/speed.md
        cu, m = unpadded.cu_seqlens, unpadded.max_seqlen
        return kernel(q, k, v, cu, cu, m, m)
    # "repadded"
    q, k, v = (unpadded.pad(t, B, T) for t in (q, k, v))  # (B, H, T, D)
    y = attention(q, k, v, key_mask, dropout_p)
    return y.transpose(1, 2).reshape(B * T, H, D).index_select(0, unpadded.index)  # (N, H, D)


RUNS_MAX_WORK = 0.7
"""Attention by runs of rows on a CPU when its work, the sum of the rows' squared lengths, is at most this share of
the re-padded B x T^2, or when there are at most `RUNS_FEW` runs. One call per run costs more than its FLOPs: on
2 cores, 32 rows of 32 lengths (4x256, T = 256) ran 1.10x faster by runs at 44% padding (work 0.36), 0.93-0.96x at
11% (work 0.80)."""
RUNS_FEW = 4


def _runs(unpadded: Unpadded) -> list[tuple[int, int]]:
    """(length L, rows m) of each run of consecutive rows of one length, in order. The lengths are the
    collator's host ints, else read from `cu_seqlens` (a host tensor here)."""
    lengths = unpadded.lengths if unpadded.lengths is not None else unpadded.cu_seqlens.diff().tolist()
    runs: list[tuple[int, int]] = []
    for n in lengths:
        if runs and runs[-1][0] == n:
            runs[-1] = (n, runs[-1][1] + 1)
        else:
            runs.append((n, 1))
    return runs


def _attention_by_runs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, runs: list[tuple[int, int]],
                       dropout_p: float) -> torch.Tensor:
    """`varlen_attention` on a host device: each run of m rows of length L (`_runs`) is a (m, H, L, D) view of
    the packed tokens."""
    N, H, D = q.shape
    out, start = [], 0
    for L, m in runs:
        if L:
            qs, ks, vs = (t[start:start + m * L].view(m, L, H, D).transpose(1, 2) for t in (q, k, v))
            out.append(attention(qs, ks, vs, None, dropout_p).transpose(1, 2).reshape(m * L, H, D))
        start += m * L
    return torch.cat(out) if len(out) != 1 else out[0]  # (N, H, D)


def _varlen_kernel():
    """torch's variable-length attention (torch.nn.attention.varlen, CUDA only), or None."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn
