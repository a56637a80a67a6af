"""Which attention path a call takes (pretrain/model/attention_paths.py): every row of the table forced on the CPU, the
CUDA rows included (called with device type "cuda", a dtype, a capability), so that an fp32 or pre-Ampere GPU run
never reaches the flash kernel, which rejects it; the model asks the table with the call's real values; and the
fallback paths run on the CPU and give the output of the path they stand in for."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F

import pretrain.model.dropout
import pretrain.model.unpadded
from pretrain.model.attention_paths import attention_path
from pretrain.model.config import RobertaConfig
from pretrain.model.dropout import attention
from pretrain.model.encoder import RobertaForMLM
from pretrain.model.unpadded import Unpadded, varlen_attention

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16


@pytest.mark.parametrize("dtype", [F32, BF16, F16])
@pytest.mark.parametrize("capability", [(8, 0), (7, 5), (9, 0)])
@pytest.mark.parametrize("dropout", [False, True])
def test_cuda_packed_rows_take_flash_only_in_half_precision_on_ampere_or_later_without_dropout(
        dtype: torch.dtype, capability: tuple[int, int], dropout: bool) -> None:
    """A 32-true run (fp32 q, k, v), a T4 (7.5) or attention dropout: the re-padded SDPA path, never flash."""
    flash = dtype != F32 and capability >= (8, 0) and not dropout
    got = attention_path("cuda", dtype, dropout, packed=True, capability=capability, head_size=64)
    assert got == ("flash_varlen" if flash else "repadded")
    # compiling changes nothing on CUDA; without torch's varlen kernel it is the fallback
    assert attention_path("cuda", dtype, dropout, packed=True, compiling=True, capability=capability) == got
    assert attention_path("cuda", dtype, dropout, packed=True, capability=capability, varlen=False) == "repadded"


def test_fp32_on_an_a100_is_the_fallback() -> None:
    """The crash of issue 30 item 7: 32-true, padded batch, dropout 0 (validation; configs/tiny.yaml's steps with
    dropout off) took flash, which rejects fp32."""
    assert attention_path("cuda", F32, False, packed=True, capability=(8, 0)) == "repadded"


@pytest.mark.parametrize(("capability", "head_size", "path"), [
    ((8, 6), 64, "flash_varlen"), ((12, 1), 64, "flash_varlen"), ((12, 2), 64, "repadded"), ((6, 1), 64, "repadded"),
    ((9, 0), 128, "flash_varlen"), ((9, 0), 256, "repadded"), ((9, 0), 12, "repadded"), ((9, 0), 8, "flash_varlen"),
    (None, 64, "repadded")])
def test_flash_needs_a_capability_and_head_size_it_is_built_for(capability, head_size: int, path: str) -> None:
    assert attention_path("cuda", BF16, False, packed=True, capability=capability, head_size=head_size) == path


@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("dropout", [False, True])
def test_cpu_packed_rows_attend_by_runs_unless_traced_or_not_worth_it(dtype: torch.dtype, dropout: bool) -> None:
    assert attention_path("cpu", dtype, dropout, packed=True) == "runs"
    assert attention_path("cpu", dtype, dropout, packed=True, compiling=True) == "repadded"
    assert attention_path("cpu", dtype, dropout, packed=True, runs_pay=False) == "repadded"
    # never flash on a host device, whatever capability it is handed
    assert attention_path("cpu", BF16, False, packed=True, capability=(9, 0), runs_pay=False) == "repadded"


@pytest.mark.parametrize("device", ["cpu", "cuda", "mps"])
@pytest.mark.parametrize("dtype", [F32, BF16, F16])
@pytest.mark.parametrize("dropout", [False, True])
def test_dense_calls_are_sdpa_except_dropout_on_a_cpu(device: str, dtype: torch.dtype, dropout: bool) -> None:
    expected = "math_dropout" if device == "cpu" and dropout else "sdpa"
    assert attention_path(device, dtype, dropout, packed=False, capability=(8, 0)) == expected
    assert attention_path(device, dtype, dropout, packed=False, compiling=True) == expected


# --- the model follows the table --------------------------------------------------------------------------------

def packed_rows(lengths: list[int], H: int = 2, D: int = 8, dtype: torch.dtype = torch.float64):
    """(q, k, v) (N, H, D), the `Unpadded` of rows of `lengths` padded to the longest, the (B, 1, 1, T) key mask."""
    g = torch.Generator().manual_seed(0)
    B, T, N = len(lengths), max(lengths), sum(lengths)
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    unpadded = Unpadded.from_mask(mask)
    q, k, v = (torch.randn(N, H, D, generator=g, dtype=dtype) for _ in range(3))
    return q, k, v, unpadded, mask.bool()[:, None, None, :]


def forced(monkeypatch: pytest.MonkeyPatch, module, path: str) -> list[dict]:
    """Makes `module`'s table answer `path`; returns the calls' arguments."""
    calls: list[dict] = []

    def table(device, dtype, dropout, packed, **kw):
        calls.append({"device": device, "dtype": dtype, "dropout": dropout, "packed": packed, **kw})
        return path

    monkeypatch.setattr(module, "attention_path", table)
    return calls


def test_varlen_attention_asks_the_table_with_the_calls_values(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = forced(monkeypatch, pretrain.model.unpadded, "repadded")
    q, k, v, unpadded, key_mask = packed_rows([5, 3, 5], H=2, D=8, dtype=torch.bfloat16)
    varlen_attention(q, k, v, unpadded, key_mask, 0.0)
    varlen_attention(q.float(), k.float(), v.float(), unpadded, key_mask, 0.1)
    assert [{k: c[k] for k in ("device", "dtype", "dropout", "packed", "compiling", "capability", "head_size")}
            for c in calls] == [
        {"device": "cpu", "dtype": torch.bfloat16, "dropout": False, "packed": True, "compiling": False,
         "capability": None, "head_size": 8},
        {"device": "cpu", "dtype": torch.float32, "dropout": True, "packed": True, "compiling": False,
         "capability": None, "head_size": 8}]
    assert calls[0]["runs_pay"] is True  # 5, 3, 5: 3 runs, at most RUNS_FEW


def test_a_bf16_unpadded_model_asks_with_the_dtype_autocast_gives(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under autocast q, k and v are the projections' bf16, which is what flash would see: the table is asked
    with it, not with the fp32 weights' dtype."""
    calls = forced(monkeypatch, pretrain.model.unpadded, "repadded")
    model = RobertaForMLM(RobertaConfig(vocab_size=50, hidden_size=32, num_layers=1, num_heads=4,
                                        intermediate_size=64, max_position_embeddings=20, dropout=0.0,
                                        attention_dropout=0.0))
    ids = torch.randint(5, 50, (3, 10))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.encode(ids, mask)
    model.encode(ids, mask)
    packed = [c for c in calls if c["packed"]]
    assert [(c["dtype"], c["head_size"]) for c in packed] == [(torch.bfloat16, 8), (torch.float32, 8)]


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_the_repadded_fallback_runs_on_a_cpu_and_equals_attention_by_runs(
        monkeypatch: pytest.MonkeyPatch, dropout_p: float) -> None:
    """The path a CUDA fp32 call now takes (re-padded SDPA) against the CPU's own (runs of rows): the same output.
    With dropout the draws differ in layout, so only dropout 0 is compared exactly; with dropout both run."""
    q, k, v, unpadded, key_mask = packed_rows([7, 7, 3, 9, 9, 9, 1])
    outputs = {}
    for path in ("runs", "repadded"):
        forced(monkeypatch, pretrain.model.unpadded, path)
        torch.manual_seed(0)
        outputs[path] = varlen_attention(q, k, v, unpadded, key_mask, dropout_p)
        assert outputs[path].shape == q.shape and torch.isfinite(outputs[path]).all()
    if dropout_p == 0.0:
        torch.testing.assert_close(outputs["repadded"], outputs["runs"], rtol=1e-12, atol=1e-12)
        # and each row is plain attention over its own tokens
        start = 0
        for n in unpadded.lengths:
            rows = slice(start, start + n)
            want = F.scaled_dot_product_attention(*(t[rows].transpose(0, 1) for t in (q, k, v))).transpose(0, 1)
            torch.testing.assert_close(outputs["runs"][rows], want, rtol=1e-12, atol=1e-12)
            start += n


def test_the_flash_path_calls_torchs_varlen_kernel_with_its_signature(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forced on a CPU with a stand-in kernel: the arguments go where torch's `varlen_attn` takes them (query, key,
    value, cu_seq_q, cu_seq_k, max_q, max_k), and its output is the answer."""
    from torch.nn.attention.varlen import varlen_attn

    assert list(inspect.signature(varlen_attn).parameters)[:7] == [
        "query", "key", "value", "cu_seq_q", "cu_seq_k", "max_q", "max_k"]
    q, k, v, unpadded, key_mask = packed_rows([4, 6, 2])
    seen = []

    def kernel(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k):
        seen.append((cu_seq_q, cu_seq_k, max_q, max_k))
        return torch.full_like(query, 7.0)

    forced(monkeypatch, pretrain.model.unpadded, "flash_varlen")
    monkeypatch.setattr(pretrain.model.unpadded, "_varlen_kernel", lambda: kernel)
    out = varlen_attention(q, k, v, unpadded, key_mask, 0.0)
    assert torch.equal(out, torch.full_like(q, 7.0))
    assert seen == [(unpadded.cu_seqlens, unpadded.cu_seqlens, 6, 6)]


def test_the_dense_paths_agree_without_dropout(monkeypatch: pytest.MonkeyPatch) -> None:
    """dropout.attention's two rows: its math path written out (forced at dropout 0) is SDPA."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, 6, 8, generator=g, dtype=torch.float64) for _ in range(3))
    mask = torch.rand(2, 1, 1, 6, generator=g) > 0.3
    mask[..., 0] = True
    sdpa = attention(q, k, v, mask, 0.0)
    calls = forced(monkeypatch, pretrain.model.dropout, "math_dropout")
    torch.testing.assert_close(attention(q, k, v, mask, 0.0), sdpa, rtol=1e-12, atol=1e-12)
    assert calls[0]["packed"] is False and calls[0]["device"] == "cpu" and calls[0]["dropout"] is False
