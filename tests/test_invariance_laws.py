"""Laws of the step as property tests (hypothesis): however a batch is split into micro-batches and ranks, the
gradient is the batch's.

The real code path: `MLMModule.training_step` (its reseeding and its token weighting by the step's counts), the
collator that data.py builds (the step's counts carried by a rank's first micro-batch), the unpadded objective. What
Lightning and DDP add around it is applied as they document it: Lightning divides each micro-batch's loss by the
accumulation A before backward, DDP averages the ranks' summed gradients and sums the step counts
(`strategy.reduce`). Float64 weights, dropout off."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pretrain.training.batching import MaskingCollator

VOCAB, PAD, MASK = 120, 1, 119


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Matrices of 32: one thread is faster, and two on cores that other tests share wait on each other (10x)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def module():
    from data_prep.config import load_config
    from pretrain.training.module import MLMModule

    cfg = load_config(None, ["--model.hidden_size=32", "--model.num_layers=2", "--model.num_heads=2",
                             "--model.intermediate_size=64", "--model.dropout=0", "--model.attention_dropout=0"])
    meta = {"vocab_size": VOCAB, "seq_len": 24, "packing": "full_sentences",
            "special_ids": {"bos": 0, "pad": PAD, "eos": 2, "unk": 3, "mask": MASK}}
    torch.manual_seed(0)
    m = MLMModule(cfg.to_dict(), meta)
    m.model.double().train()
    return m


class SummingStrategy:
    """DDP's `reduce(..., "sum")` of the step counts: the sum over every rank, known here in advance."""

    def __init__(self, total: torch.Tensor) -> None:
        self.total = total

    def reduce(self, tensor: torch.Tensor, reduce_op: str) -> torch.Tensor:
        assert reduce_op == "sum"
        return self.total.to(tensor)


def step_gradient(micro_batches: list[list[dict]], A: int, W: int, collate: MaskingCollator, step: int
                  ) -> dict[str, torch.Tensor]:
    """The gradient of one optimizer step whose micro-batch j = a x W + r (rank r's a-th) holds `micro_batches[j]`."""
    m = module()
    m.model.zero_grad(set_to_none=True)
    rank_items = [[it for a in range(A) for it in micro_batches[a * W + r]] for r in range(W)]
    counts = [collate.step_counts([it["input_ids"] for it in items], step) for items in rank_items]
    total = torch.tensor(counts, dtype=torch.float64).sum(0)
    grads: dict[str, torch.Tensor] = {}
    for r in range(W):
        m._trainer = SimpleNamespace(accumulate_grad_batches=A, world_size=W, global_rank=r, global_step=step,
                                     strategy=SummingStrategy(total))
        m._step_counts, m._step_sums = None, {}
        for a in range(A):
            items = [dict(it) for it in micro_batches[a * W + r]]
            if a == 0:  # as data.py: the rank's first micro-batch carries the blocks of its whole step
                items[0]["step_blocks"] = [it["input_ids"] for it in rank_items[r]]
            loss = m.training_step(collate(items), batch_idx=step * A + a)
            (loss / A).backward()  # Lightning's division by the accumulation
        for name, p in m.model.named_parameters():
            if p.grad is not None:
                grads[name] = grads.get(name, 0) + p.grad / W  # DDP's mean over the ranks
        m.model.zero_grad(set_to_none=True)
    m._trainer = None
    return grads


@st.composite
def splits(draw):
    """Rows of random lengths (some padded), the accumulation A, the ranks W, and the batch's rows cut into
    A x W non-empty micro-batches of any sizes, in any order."""
    W = draw(st.integers(1, 3))
    A = draw(st.integers(1, 3))
    B = draw(st.integers(A * W, 9))
    lengths = draw(st.lists(st.integers(4, 24), min_size=B, max_size=B))
    order = draw(st.permutations(range(B)))
    cuts = sorted(draw(st.sets(st.integers(1, B - 1), min_size=A * W - 1, max_size=A * W - 1))) if A * W > 1 else []
    return lengths, A, W, order, cuts, draw(st.booleans()), draw(st.integers(0, 1000))


@settings(max_examples=25, deadline=None)
@given(splits())
def test_micro_batch_and_rank_splits_give_the_gradient_of_the_whole_batch(case) -> None:
    lengths, A, W, order, cuts, row_slots, seed = case
    collate = MaskingCollator(mask_token_id=MASK, pad_token_id=PAD, special_ids=(0, 1, 2, 3, MASK), vocab_size=VOCAB,
                              seed=7, row_slots=row_slots)
    rng = np.random.default_rng(seed)
    rows = [{"input_ids": np.concatenate([[0], rng.integers(4, MASK, n - 2), [2]]), "index": i, "epoch": 0, "step": 3}
            for i, n in enumerate(lengths)]
    whole = step_gradient([rows], 1, 1, collate, step=3)
    shuffled = [rows[i] for i in order]
    bounds = [0, *cuts, len(rows)]
    split = step_gradient([shuffled[s:e] for s, e in zip(bounds, bounds[1:], strict=False)], A, W, collate, step=3)
    assert whole.keys() == split.keys() and len(whole) > 10
    # the loss is float32 (objective.py): equal within 1e-6 of the largest gradient entry (some, as the key biases',
    # are zero up to rounding)
    scale = max(float(g.abs().max()) for g in whole.values())
    for name, g in whole.items():
        torch.testing.assert_close(split[name], g, rtol=1e-5, atol=1e-6 * scale, msg=lambda msg, n=name: f"{n}: {msg}")
