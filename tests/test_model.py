"""The model against `transformers.RobertaForMaskedLM`, and the behaviour its speed-ups must not change."""

from __future__ import annotations

import pytest
import torch

from pretrain.hf.convert import HF_NAME_MAP, from_hf_state_dict, hf_name_map, to_hf_state_dict
from pretrain.model.config import RobertaConfig
from pretrain.model.encoder import RobertaForMLM, position_ids

PAD = 1
SEQ_LEN = 16


def tiny_config(**overrides) -> RobertaConfig:
    kwargs = dict(
        vocab_size=64,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        intermediate_size=64,
        max_position_embeddings=SEQ_LEN + PAD + 1,
        dropout=0.0,
        attention_dropout=0.0,
    )
    return RobertaConfig(**(kwargs | overrides))


def tiny_model(seed: int = 0, **overrides) -> RobertaForMLM:
    torch.manual_seed(seed)
    return RobertaForMLM(tiny_config(**overrides)).eval()


def random_batch(
    lengths: list[int], vocab_size: int = 64, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """<s> tokens </s> per row, padded to the longest: (input_ids, attention_mask), both (B, T)."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.full((len(lengths), T), PAD)
    for b, n in enumerate(lengths):
        ids[b, :n] = torch.randint(4, vocab_size - 1, (n,), generator=g)
        ids[b, 0], ids[b, n - 1] = 0, 2
    return ids, ids.ne(PAD).long()


def hf_twin(model: RobertaForMLM):
    transformers = pytest.importorskip("transformers")
    hf = transformers.RobertaForMaskedLM(transformers.RobertaConfig(**model.cfg.hf_config_kwargs())).eval()
    hf.load_state_dict(to_hf_state_dict(model.state_dict(), model.cfg.num_layers), strict=True)
    return hf


def test_logits_match_transformers_on_a_padded_batch():
    model = tiny_model()
    hf = hf_twin(model)
    ids, mask = random_batch([SEQ_LEN, 9, 3])
    with torch.no_grad():
        ours = model(ids, mask)
        theirs = hf(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-5, rtol=1e-5)


def test_name_map_covers_every_tensor_both_ways():
    model = tiny_model(num_layers=3)
    hf = hf_twin(model)
    hf_sd = hf.state_dict()
    names = hf_name_map(3)
    assert sorted(theirs for _, theirs in names) == sorted(hf_sd)
    assert {ours for ours, _ in names} == set(model.state_dict())
    assert sum("{}" in ours for ours, _ in HF_NAME_MAP) == 16  # 16 tensors per layer
    # HF -> ours -> HF is the identity, also from a saved file that leaves tied twins out.
    saved = {k: v for k, v in hf_sd.items() if k not in ("lm_head.decoder.weight", "lm_head.decoder.bias")}
    back = to_hf_state_dict(from_hf_state_dict(saved, 3), 3)
    assert all(torch.equal(back[k], hf_sd[k]) for k in hf_sd)
    with pytest.raises(KeyError, match="lm_head.dense.weight"):
        from_hf_state_dict({k: v for k, v in saved.items() if k != "lm_head.dense.weight"}, 3)


def test_loading_a_transformers_model_gives_its_logits():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1)
    cfg = tiny_config()
    hf = transformers.RobertaForMaskedLM(transformers.RobertaConfig(**cfg.hf_config_kwargs())).eval()
    model = RobertaForMLM(cfg).eval()
    model.load_state_dict(from_hf_state_dict(hf.state_dict(), cfg.num_layers), strict=True)
    assert model.lm_head.decoder.weight is model.embeddings.word.weight  # loading keeps the tie
    ids, mask = random_batch([12, 5], seed=1)
    real = mask.bool()  # a pad position's logits are no token's: the unpadded path leaves them out
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask)[real], hf(input_ids=ids, attention_mask=mask).logits[real])
        model.unpad = False  # the padded path matches everywhere
        torch.testing.assert_close(model(ids, mask), hf(input_ids=ids, attention_mask=mask).logits)


def test_padding_does_not_change_real_tokens():
    model = tiny_model()
    ids, _ = random_batch([7], seed=2)
    # Left padding too: positions count real tokens, so they do not shift.
    padded = torch.cat([torch.full((1, 3), PAD), ids, torch.full((1, 6), PAD)], dim=1)
    with torch.no_grad():
        alone = model(ids)
        in_batch = model(padded, padded.ne(PAD).long())
    torch.testing.assert_close(in_batch[:, 3:10], alone)


def test_sparse_head_equals_dense_logits_at_the_masked_positions():
    model = tiny_model()
    ids, mask = random_batch([SEQ_LEN, 10, 4], seed=3)
    chosen = torch.zeros_like(ids, dtype=torch.bool)
    chosen[0, [1, 5, 14]] = True
    chosen[1, [2, 8]] = True
    chosen[2, 1] = True
    flat = chosen.flatten().nonzero().squeeze(1)
    with torch.no_grad():
        dense = model(ids, mask)  # (B, T, V)
        sparse = model(ids, mask, masked_positions=flat)  # (N, V)
        from_bool = model(ids, mask, masked_positions=chosen)
    assert sparse.shape == (6, 64)
    torch.testing.assert_close(sparse, dense[chosen])
    torch.testing.assert_close(from_bool, sparse)


def test_position_ids_count_real_tokens_and_restart_per_segment():
    ids = torch.tensor([[0, 5, 6, 2, 0, 7, 2, PAD, PAD]])
    assert position_ids(ids, PAD).tolist() == [[2, 3, 4, 5, 6, 7, 8, 1, 1]]
    segments = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1, 1]])
    assert position_ids(ids, PAD, segments).tolist() == [[2, 3, 4, 5, 2, 3, 4, 1, 1]]


@pytest.mark.parametrize("pad_segment", [1, 2])  # pads in the last segment, or in one of their own
def test_packed_segments_compute_what_each_segment_computes_alone(pad_segment):
    model = tiny_model()
    a, _ = random_batch([6], seed=4)
    b, _ = random_batch([5], seed=5)
    packed = torch.cat([a, b, torch.full((1, 3), PAD)], dim=1)  # (1, 14)
    segments = torch.tensor([[0] * 6 + [1] * 5 + [pad_segment] * 3])
    with torch.no_grad():
        out = model(packed, packed.ne(PAD).long(), attention_segments=segments)
        other_b = model(
            torch.cat([a, b.flip(1), torch.full((1, 3), PAD)], dim=1), attention_segments=segments
        )
        alone_a, alone_b = model(a), model(b)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, :6], alone_a)
    torch.testing.assert_close(out[:, 6:11], alone_b)
    torch.testing.assert_close(other_b[:, :6], out[:, :6])  # segment 2's tokens never reach segment 1


def test_init_statistics_and_tied_decoder():
    torch.manual_seed(0)
    model = RobertaForMLM(tiny_config(vocab_size=2000, hidden_size=128, intermediate_size=512, nsp=True))
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert torch.all(p == 0), name
        elif "norm" in name:
            assert torch.all(p == 1), name
        else:
            # A sample std of n normals has std about sigma / sqrt(2n): allow 5 of those.
            assert abs(p.std().item() - 0.02) < 5 * 0.02 / (2 * p.numel()) ** 0.5, (name, p.std().item())
            assert abs(p.mean().item()) < 5 * 0.02 / p.numel() ** 0.5, name
    assert torch.all(model.embeddings.word.weight[PAD] == 0)
    assert torch.all(model.embeddings.position.weight[PAD] == 0)
    assert model.lm_head.decoder.weight is model.embeddings.word.weight
    assert len({p.data_ptr() for p in model.parameters()}) == len(list(model.parameters()))


def test_gradients_reach_the_tied_embedding_from_the_head_and_skip_the_pad_row():
    model = tiny_model()
    ids, mask = random_batch([SEQ_LEN, 8], seed=6)
    model(ids, mask, masked_positions=torch.tensor([3, 20])).logsumexp(-1).sum().backward()
    grad = model.embeddings.word.weight.grad
    unused = sorted(set(range(64)) - set(ids.flatten().tolist()))
    assert grad[unused].abs().sum() > 0  # only the decoder can reach tokens absent from the input
    assert model.lm_head.decoder.bias.grad.abs().sum() > 0


def test_nsp_head_is_optional_and_not_exported():
    ids, mask = random_batch([10, 6], seed=7)
    model = tiny_model(nsp=True)
    hidden = model.encode(ids, mask)
    assert model.pooled(hidden).shape == (2, 32)
    assert model.nsp_logits(hidden).shape == (2, 2)
    assert all(not k.startswith("nsp_head") for k in to_hf_state_dict(model.state_dict(), 2))
    plain = tiny_model()
    assert plain.nsp_head is None
    with pytest.raises(AssertionError, match="nsp=True"):
        plain.pooled(plain.encode(ids, mask))


def test_dropout_only_in_training():
    model = tiny_model(dropout=0.1, attention_dropout=0.1)
    ids, mask = random_batch([12, 12], seed=8)
    with torch.no_grad():
        assert torch.equal(model(ids, mask), model(ids, mask))
        model.train()
        assert not torch.equal(model(ids, mask), model(ids, mask))


def test_config_names_every_problem():
    with pytest.raises(ValueError) as err:
        RobertaConfig(hidden_size=100, num_heads=12, dropout=1.5, max_position_embeddings=2)
    message = str(err.value)
    assert "num_heads=12" in message and "dropout=1.5" in message and "max_position_embeddings=2" in message
    assert RobertaConfig().max_seq_len == 512
