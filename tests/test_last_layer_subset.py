"""The last encoder layer at the MLM targets only (trainer.last_layer_subset): the collator's per-row target slots,
`RobertaForMLM.encode_targets` equal to `encode` at those positions (values and gradients), the objective's sums
unchanged, the work actually skipped, and the FLOPs that MFU counts for it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from pretrain.training.batching import MaskingCollator
from pretrain.training.masking import IGNORE
from pretrain.training.objective import batch_inputs, mlm_objective
from pretrain.training.throughput import flops_per_token

from .test_speed import MASK, PAD, VOCAB, rows, tiny_model


def collator(**kw) -> MaskingCollator:
    return MaskingCollator(mask_token_id=MASK, pad_token_id=PAD, special_ids=(0, 1, 2, 3), vocab_size=VOCAB, seed=7,
                           **kw)


@pytest.mark.parametrize("lengths", [[32, 32, 32], [20, 32, 9, 31]])
def test_row_slots_lay_each_rows_targets_out_in_its_own_block(lengths: list[int]) -> None:
    items = rows(lengths, seed=3)
    flat, per_row = collator()(items), collator(row_slots=True)(items)
    B, T = per_row["input_ids"].shape
    K = collator().num_targets(T)
    assert per_row["row_slots"] and not flat["row_slots"]
    assert torch.equal(per_row["input_ids"], flat["input_ids"])  # the same masks, only the slots move
    positions, targets = per_row["masked_positions"].view(B, K), per_row["masked_targets"].view(B, K)
    want_pos, want_tgt = flat["masked_positions"], flat["masked_targets"]
    real_flat = want_tgt != IGNORE
    want_pos, want_tgt = want_pos[real_flat], want_tgt[real_flat]
    for b, n in enumerate(lengths):
        real = targets[b] != IGNORE
        k = int(real.sum())
        assert k == collator().num_targets(n - 2) and torch.all(real[:k]) and not torch.any(real[k:])
        in_row = (want_pos >= b * T) & (want_pos < (b + 1) * T)
        assert torch.equal(positions[b, :k], want_pos[in_row]) and torch.equal(targets[b, :k], want_tgt[in_row])
        assert torch.all(positions[b, k:] == b * T + T - 1)  # filler slots: the row's last position
    assert torch.all(per_row["masked_positions"].diff() >= 0)  # still sorted
    assert ("unpad_index" in per_row) == (min(lengths) < max(lengths))


def test_row_slots_keep_static_shapes_under_compile_padding() -> None:
    c = collator(row_slots=True, pad_to_multiple_of=32)
    for seed in range(4):
        lengths = [int(n) for n in np.random.default_rng(seed).integers(8, 33, 4)]
        batch = c(rows(lengths, seed=seed))
        assert batch["input_ids"].shape == (4, 32) and batch["masked_positions"].shape == (4 * c.num_targets(32),)


@pytest.mark.parametrize("case", ["full", "unpadded", "padded"])
def test_encode_targets_equals_encode_at_the_targets(case: str) -> None:
    lengths = [32] * 4 if case == "full" else [32, 7, 19, 30]
    batch = collator(row_slots=True)(rows(lengths, seed=5))
    model, reference = tiny_model(dropout=0.0, attention_dropout=0.0), tiny_model(dropout=0.0, attention_dropout=0.0)
    model.unpad = reference.unpad = case != "padded"
    inputs = batch_inputs(batch, unpad=model.unpad)
    positions = inputs["masked_positions"]
    assert (inputs.get("unpadded") is not None) == (case == "unpadded")
    got = model.encode_targets(inputs["input_ids"], inputs["attention_mask"], positions, inputs.get("unpadded"))
    expected = reference.encode(inputs["input_ids"], inputs["attention_mask"], unpadded=inputs.get("unpadded"))
    expected = expected.flatten(0, 1)[positions]
    real = inputs["masked_targets"] != IGNORE  # filler slots may sit on a pad, which `encode` leaves at zero
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(got).all()
    got[real].square().sum().backward()
    expected[real].square().sum().backward()
    for (name, a), b in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("nsp", [False, True])
def test_objective_sums_are_those_of_the_whole_last_layer(nsp: bool) -> None:
    model = tiny_model(nsp=nsp).eval()
    items = rows([32, 11, 26], seed=6)
    per_row, flat = collator(row_slots=True)(items), collator()(items)
    labels = torch.tensor([0, 1, 0]) if nsp else None
    with torch.no_grad():
        a = mlm_objective(model, **batch_inputs(per_row) | {"nsp_labels": labels})
        b = mlm_objective(model, **batch_inputs(flat) | {"nsp_labels": labels})
    assert a.keys() == b.keys() and int(a["n_masked"]) == int(b["n_masked"]) > 0
    assert int(a["mlm_correct"]) == int(b["mlm_correct"])
    torch.testing.assert_close(a["mlm_sum"], b["mlm_sum"], rtol=1e-6, atol=1e-5)
    if nsp:
        torch.testing.assert_close(a["nsp_sum"], b["nsp_sum"])


def test_the_last_layer_runs_on_the_target_slots_only() -> None:
    model = tiny_model().train()
    seen: dict[str, list] = {"first": [], "last": [], "last_keys": []}
    model.encoder.layers[0].ffn_in.register_forward_hook(lambda m, i, o: seen["first"].append(i[0].shape[0]))
    model.encoder.layers[-1].ffn_in.register_forward_hook(lambda m, i, o: seen["last"].append(i[0].shape[0]))
    model.encoder.layers[-1].attn.key.register_forward_hook(lambda m, i, o: seen["last_keys"].append(i[0].shape[0]))
    batch = collator(row_slots=True)(rows([32, 10, 5], seed=1))
    out = mlm_objective(model, **batch_inputs(batch))
    out["mlm_sum"].backward()
    R = sum(collator().num_targets(n - 2) for n in (32, 10, 5))
    assert int(batch["real_slots"].numel()) == R < batch["masked_positions"].numel()
    # keys and values: every real token; the feed-forward: the slots that hold a target (unpadded batch)
    assert seen == {"first": [47], "last": [R], "last_keys": [47]}
    assert torch.isfinite(out["mlm_sum"])


def test_real_slots_are_the_slots_with_a_target_and_change_nothing_but_the_work() -> None:
    items = rows([32, 9, 30, 17], seed=8)
    batch = collator(row_slots=True)(items)
    assert torch.equal(batch["real_slots"], (batch["masked_targets"] != IGNORE).nonzero().squeeze(1))
    assert "real_slots" not in collator(row_slots=True)(rows([32] * 3, seed=8))  # nothing padded
    assert "real_slots" not in collator(row_slots=True, pad_to_multiple_of=32)(items)  # static shapes
    model, reference = tiny_model(dropout=0.0, attention_dropout=0.0), tiny_model(dropout=0.0, attention_dropout=0.0)
    inputs = batch_inputs(batch)
    assert inputs["real_slots"] is batch["real_slots"]
    a = mlm_objective(model, **inputs)
    b = mlm_objective(reference, **inputs | {"real_slots": None})
    assert int(a["n_masked"]) == int(b["n_masked"]) == batch["real_slots"].numel()
    assert int(a["mlm_correct"]) == int(b["mlm_correct"])
    torch.testing.assert_close(a["mlm_sum"], b["mlm_sum"], rtol=1e-6, atol=1e-5)
    a["mlm_sum"].backward()
    b["mlm_sum"].backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_flops_per_token_counts_the_last_layer_at_the_targets() -> None:
    model = tiny_model(dropout=0.0, attention_dropout=0.0, max_position_embeddings=66)
    B, T = 4, 64
    batch = collator(row_slots=True)(rows([T] * B, seed=2))
    S = batch["masked_positions"].numel()
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:  # fused kernels go uncounted
        mlm_objective(model, **batch_inputs(batch))["mlm_sum"].backward()
    want = flops_per_token(model.cfg, T, S / (B * T), last_layer_subset=True)
    assert counter.get_total_flops() / (B * T) == pytest.approx(want, rel=1e-9)
    assert want < flops_per_token(model.cfg, T, S / (B * T))


def test_compiled_objective_with_row_slots_traces_one_graph_without_breaks() -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = tiny_model()
    model.unpad = False  # what trainer.compile runs: padded static shapes
    objective = torch.compile(mlm_objective, backend="eager", fullgraph=True)  # fullgraph: a break raises
    c = collator(row_slots=True, pad_to_multiple_of=32)
    for step in range(6):
        lengths = [int(n) for n in np.random.default_rng(step).integers(8, 33, 4)]
        objective(model, **batch_inputs(c(rows(lengths, seed=step)), unpad=False))["mlm_sum"].backward()
    assert counters["stats"]["unique_graphs"] == 1
