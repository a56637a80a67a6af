"""Dropout's cheaper CPU mask (pretrain/dropout.py): its rate and scale, exact expectation, seeding, gradients, and
attention with it equal to SDPA's math written out with the same mask."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pretrain.dropout import Dropout, attention, dropout, keep_mask
from pretrain.model import RobertaConfig, RobertaForMLM


@pytest.mark.parametrize("p", [0.1, 0.3, 0.05])
def test_keep_mask_rate_is_the_quantised_rate_in_every_lane(p: float) -> None:
    torch.manual_seed(0)
    n = 1 << 22
    keep, scale = keep_mask((n,), p, torch.device("cpu"))
    dropped = round(p * 65536)
    assert scale == 65536 / (65536 - dropped) and abs(dropped / 65536 - p) <= 1 / 131072
    assert keep.dtype == torch.bool and keep.shape == (n,)
    sd = (p * (1 - p) / (n / 4)) ** 0.5  # per lane: each 64-bit draw gives four 16-bit quarters
    for lane in range(4):
        assert abs(keep[lane::4].float().mean().item() - (1 - dropped / 65536)) < 5 * sd, lane


def test_dropout_keeps_the_expectation_and_scales_the_kept_values() -> None:
    torch.manual_seed(1)
    x = torch.ones(1 << 22)
    y = dropout(x, 0.1, True)
    _, scale = keep_mask((1,), 0.1, torch.device("cpu"))
    assert set(torch.unique(y).tolist()) == {0.0, torch.tensor(scale).item()}  # scale, rounded to float32
    assert abs(y.mean().item() - 1.0) < 5 * (0.1 / 0.9 / (1 << 22)) ** 0.5  # 5 standard deviations
    assert dropout(x, 0.1, False) is x and dropout(x, 0.0, True) is x


def test_the_mask_is_a_function_of_the_seed_and_the_gradient_is_the_mask() -> None:
    x = torch.randn(64, 33, requires_grad=True)
    torch.manual_seed(5)
    a = dropout(x, 0.2, True)
    torch.manual_seed(5)
    b = dropout(x, 0.2, True)
    torch.manual_seed(6)
    c = dropout(x, 0.2, True)
    assert torch.equal(a, b) and not torch.equal(a, c)
    a.sum().backward()
    torch.manual_seed(5)
    keep, scale = keep_mask(x.shape, 0.2, x.device)
    assert torch.equal(x.grad, torch.where(keep, scale, 0.0))


def test_other_devices_get_torchs_own_dropout(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(F, "dropout", lambda x, p, training: calls.append((x.device.type, p)) or x)
    x = torch.empty(4, 8, device="meta")
    dropout(x, 0.1, True)
    assert calls == [("meta", 0.1)]


@pytest.mark.parametrize("masked", [False, True])
def test_attention_with_dropout_is_sdpas_math_with_the_cheap_mask(masked: bool) -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8, generator=g) for _ in range(3))
    mask = torch.rand(2, 1, 1, 7, generator=g) > 0.3 if masked else None
    if mask is not None:
        mask[..., 0] = True
    torch.manual_seed(3)
    got = attention(q, k, v, mask, 0.25)
    torch.manual_seed(3)
    scores = q @ k.transpose(-2, -1) / 8 ** 0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(-1)
    keep, scale = keep_mask(probs.shape, 0.25, probs.device)
    torch.testing.assert_close(got, torch.where(keep, probs * scale, 0.0) @ v, atol=1e-6, rtol=1e-6)
    # without dropout it is SDPA itself
    torch.testing.assert_close(attention(q, k, v, mask, 0.0), F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def test_attention_under_bf16_autocast_computes_in_float_and_returns_bf16() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8, generator=g).bfloat16() for _ in range(3))
    torch.manual_seed(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = attention(q, k, v, None, 0.1)
    torch.manual_seed(3)
    want = attention(q.float(), k.float(), v.float(), None, 0.1)  # the same mask: the same draws
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=1e-2, rtol=1e-2)


def test_the_model_uses_it_for_every_dropout() -> None:
    model = RobertaForMLM(RobertaConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2,
                                        intermediate_size=32, max_position_embeddings=20))
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == 3 and all(isinstance(m, Dropout) for m in drops)  # embeddings, and one per layer
