"""Dropout's cheaper CPU mask (pretrain/model/dropout.py): its rate and scale, exact expectation, seeding, gradients, and
attention with it equal to SDPA's math written out with the same mask. Dropout's seeds (pretrain/training/steps.py): the
whole CPU generator state from (seed, step, micro-batch), distinct for distinct keys, and cheap."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from pretrain.model.config import RobertaConfig
from pretrain.model.dropout import Dropout, attention, dropout, keep_mask
from pretrain.model.encoder import RobertaForMLM

KEY = st.integers(0, 2**64 - 1) | st.integers(0, 20)


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


# --- dropout's seeds: every (seed, step, micro-batch) its own generator state (pretrain/training/steps.py) ----------------


def old_step_seed(seed: int, step: int, micro: int) -> int:
    """The seed the module set with `torch.manual_seed` before steps.reseed: 63 bits, of which a CPU kept 32."""
    import numpy as np

    words = np.random.SeedSequence([seed, step, micro, int.from_bytes(b"dropout", "big")]).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def dropout_mask(n: int = 4096) -> torch.Tensor:
    return dropout(torch.ones(n), 0.1, True) == 0


def test_torchs_cpu_generator_keeps_only_the_low_32_bits_of_a_seed() -> None:
    """Why steps.reseed writes the whole state: seeds that differ above bit 32 draw the same numbers on a CPU."""
    torch.manual_seed(12345)
    a = torch.rand(8)
    torch.manual_seed(12345 + 2**32)
    assert torch.equal(a, torch.rand(8))


def test_micro_batches_whose_old_seeds_shared_32_bits_now_draw_different_masks() -> None:
    """Seed 0, micro-batch 1 of steps 8,522 and 9,358: the old 63-bit seeds differ only above bit 32, so on a CPU
    both steps drew one dropout mask; reseed gives them different ones."""
    from pretrain.training.steps import reseed

    a, b = (0, 8522, 1), (0, 9358, 1)
    old_a, old_b = old_step_seed(*a), old_step_seed(*b)
    assert old_a != old_b and (old_a ^ old_b) & 0xFFFFFFFF == 0
    masks = []
    for key in (old_a, old_b):
        torch.manual_seed(key)
        masks.append(dropout_mask())
    assert torch.equal(*masks)  # the collision, as the module seeded before
    masks = []
    for key in (a, b):
        reseed(*key)
        masks.append(dropout_mask())
    assert not torch.equal(*masks) and 300 < int(masks[1].sum()) < 520  # 4096 x 0.1, 5 sd either side


def test_reseed_sets_numpys_mt19937_state_from_the_key_on_a_cpu() -> None:
    """The CPU's draws after reseed are those of numpy's `MT19937(key_sequence(key))`: the whole 19,937-bit state is
    the key's, not 32 bits of it. (numpy hands out word 623 of the seeded state first, torch twists first; an
    int64 draw takes two 32-bit words, the first as the high half.)"""
    import numpy as np

    from pretrain.training.steps import cpu_state_words, key_sequence, reseed

    for key in ((0, 1, 2), (2**64 - 1, 10**9, 2**40)):
        mt = np.random.MT19937(key_sequence(*key))
        assert np.array_equal(mt.state["state"]["key"], cpu_state_words(*key))
        reseed(*key)
        raw = mt.random_raw(17)[1:].astype(object)
        assert torch.randint(0, 2**62, (8,)).tolist() == [(raw[2 * i] << 32 | raw[2 * i + 1]) % 2**62
                                                          for i in range(8)]


def test_reseed_is_a_function_of_the_key_alone() -> None:
    """Exact resume without stored RNG state: whatever was drawn before (a cached normal sample included), the
    same key gives the same masks; the accelerators' seed takes 64 bits."""
    from pretrain.training.steps import reseed, step_seed

    reseed(3, 7, 2)
    first, normals = dropout_mask(), torch.randn(3)
    torch.randn(1), torch.rand(1000), torch.manual_seed(99), torch.randn(1)  # a scalar normal leaves one cached
    reseed(3, 7, 2)
    assert torch.equal(first, dropout_mask()) and torch.equal(normals, torch.randn(3))
    assert torch.initial_seed() == step_seed(3, 7, 2)
    seeds = {step_seed(0, s, m) for s in range(200) for m in range(8)}
    assert len(seeds) == 1600 and max(seeds) >= 2**63 and len({s >> 32 for s in seeds}) == 1600


def test_distinct_keys_give_distinct_cpu_states_and_seeds_over_a_hundred_thousand() -> None:
    """The law over 10^5 (step, micro-batch) pairs of one seed (12,500 steps x 8): distinct CPU states (words 1-8
    of the mt19937 state, a prefix of `cpu_state_words`' hash output) and distinct 64-bit accelerator seeds."""
    from pretrain.training.steps import _SEED_STREAM, cpu_state_words, key_sequence, step_seed

    keys = [(5, s, m) for s in range(12_500) for m in range(8)]
    assert cpu_state_words(*keys[-1])[1:9].tolist() == key_sequence(*keys[-1]).generate_state(9)[1:].tolist()
    states = {key_sequence(*k).generate_state(9)[1:].tobytes() for k in keys}
    seeds = {key_sequence(*k, _SEED_STREAM).generate_state(2).tobytes() for k in keys}
    assert len(states) == len(seeds) == len(keys)
    assert step_seed(*keys[-1]).to_bytes(8, "little") == key_sequence(*keys[-1], _SEED_STREAM).generate_state(2).tobytes()


@settings(max_examples=60, deadline=None)
@given(st.tuples(KEY, KEY, KEY), st.tuples(KEY, KEY, KEY))
def test_distinct_keys_draw_distinct_dropout(a: tuple[int, int, int], b: tuple[int, int, int]) -> None:
    """Any two (seed, step, micro-batch) keys in [0, 2**64): equal keys draw equal masks, distinct keys distinct
    ones (the state's first draws)."""
    from pretrain.training.steps import reseed

    draws = []
    for key in (a, b):
        reseed(*key)
        draws.append(torch.randint(-(2**63), 2**63 - 1, (4,)))
    assert torch.equal(*draws) == (a == b)


def test_a_torch_of_another_generator_layout_still_trains_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    """A torch whose CPU generator state is laid out otherwise (not seen up to 2.13) must not stop training: the CPU
    is then seeded with the 64-bit seed, reproducibly, and one warning says its masks may collide."""
    import pretrain.training.steps as steps

    monkeypatch.setattr(steps, "_CPU_STATE", None)
    steps._warn_layout.cache_clear()
    draws = []
    with pytest.warns(UserWarning, match="not the layout"):
        for _ in range(2):
            steps.reseed(0, 7, 1)
            draws.append(torch.rand(4))
    torch.manual_seed(steps.step_seed(0, 7, 1))
    assert torch.equal(draws[0], draws[1]) and torch.equal(draws[0], torch.rand(4))
