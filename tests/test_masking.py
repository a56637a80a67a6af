"""Masking statistics, determinism and batch layout of the MLM collator."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

from pretrain.training.batching import MaskingCollator

VOCAB = 1000
BOS, PAD, EOS, UNK, MASK = 0, 1, 2, 3, VOCAB - 1
SPECIALS = (BOS, PAD, EOS, UNK, MASK)


def collator(**overrides) -> MaskingCollator:
    kwargs = dict(mask_token_id=MASK, pad_token_id=PAD, special_ids=(BOS, EOS, UNK), vocab_size=VOCAB)
    return MaskingCollator(**(kwargs | overrides))


def sequences(count: int, low: int = 3, high: int = 200, seed: int = 0) -> list[np.ndarray]:
    """<s> text </s> with a sprinkling of <unk> and inner </s> (document breaks), as packed blocks have."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        body = rng.integers(4, VOCAB - 1, size=rng.integers(low, high + 1))
        body[rng.random(body.size) < 0.03] = UNK
        body[rng.random(body.size) < 0.02] = EOS
        out.append(np.concatenate([[BOS], body, [EOS]]))
    return out


def non_special_count(ids: np.ndarray) -> int:
    return int((~np.isin(ids, SPECIALS)).sum())


def test_exact_count_of_non_special_tokens_per_sequence():
    c = collator()
    total_chosen = total_candidates = 0
    for i, ids in enumerate(sequences(1000, low=1, high=300)):
        _, positions, _ = c.mask_sequence(ids, index=i, epoch=0)
        n = non_special_count(ids)
        assert positions.size == min(n, max(1, math.floor(0.15 * n + 0.5))), (i, n, positions.size)
        assert np.unique(positions).size == positions.size and np.all(np.diff(positions) > 0)
        total_chosen += positions.size
        total_candidates += n
    assert abs(total_chosen / total_candidates - 0.15) < 0.005
    assert c.mask_sequence(np.array([BOS, UNK, EOS]), 0, 0)[1].size == 0  # nothing to choose


def test_80_10_10_split_over_a_large_sample():
    c = collator()
    kinds = np.zeros(3)  # <mask>, random, unchanged
    for i, ids in enumerate(sequences(1500, low=400, high=510)):
        masked, positions, targets = c.mask_sequence(ids, index=i, epoch=3)
        now = masked[positions]
        is_mask = now == MASK
        kinds += [is_mask.sum(), (~is_mask & (now != targets)).sum(), (now == targets).sum()]
    assert kinds.sum() > 60_000
    share = kinds / kinds.sum()
    # A random draw equals the original 1 time in 995, so "random" reads slightly low; 0.01 absorbs it.
    np.testing.assert_allclose(share, [0.8, 0.1, 0.1], atol=0.01)


def test_specials_never_chosen_or_drawn_and_targets_are_originals():
    c = collator(mask_fraction=0.0, random_fraction=1.0)  # every chosen token is a random draw
    for i, ids in enumerate(sequences(300)):
        masked, positions, targets = c.mask_sequence(ids, index=i, epoch=0)
        assert not np.isin(ids[positions], SPECIALS).any()
        assert not np.isin(masked[positions], SPECIALS).any()
        np.testing.assert_array_equal(targets, ids[positions])
        untouched = np.ones(ids.size, dtype=bool)
        untouched[positions] = False
        np.testing.assert_array_equal(masked[untouched], ids[untouched])
    # Over many draws the random ids cover the non-special vocabulary and nothing else.
    drawn = [m[p] for m, p, _ in (c.mask_sequence(s, i, 0) for i, s in enumerate(sequences(400, 300, 500)))]
    assert set(np.unique(np.concatenate(drawn)).tolist()) == set(range(4, VOCAB - 1))


def test_mask_is_a_function_of_seed_epoch_and_index_only():
    c = collator()
    seqs = sequences(6, low=50, high=80)
    items = [{"input_ids": s, "index": 100 + i, "epoch": 2} for i, s in enumerate(seqs)]
    whole = c(items)
    by_index = {}
    for b, it in enumerate(items):
        n = it["input_ids"].size
        by_index[it["index"]] = whole["input_ids"][b, :n]
    # Other batch sizes, orders, and a fresh (e.g. worker-side, unpickled) collator give the same rows.
    for batch in ([items[4], items[1]], items[::-1], [items[3]]):
        for b, it in enumerate(batch):
            out = pickle.loads(pickle.dumps(c))(batch)
            assert torch.equal(out["input_ids"][b, : it["input_ids"].size], by_index[it["index"]])
    # The ids of a sequence do not enter the draw: same length, other tokens -> same positions.
    a, b = seqs[0], seqs[0].copy()
    b[1:-1] = np.where(np.isin(b[1:-1], SPECIALS), b[1:-1], 500)
    assert np.array_equal(c.mask_sequence(a, 7, 1)[1], c.mask_sequence(b, 7, 1)[1])


def test_dynamic_masks_change_with_epoch_index_and_seed():
    c = collator()
    ids = sequences(1, low=100, high=100)[0]

    def pattern(coll, index, epoch):
        masked, positions, _ = coll.mask_sequence(ids, index, epoch)
        return positions.tobytes() + masked.tobytes()

    patterns = {pattern(c, 0, epoch) for epoch in range(20)}
    assert len(patterns) == 20
    assert pattern(c, 0, 0) != pattern(c, 1, 0)
    assert pattern(c, 0, 0) != pattern(collator(seed=1), 0, 0)
    assert pattern(c, 0, 5) == pattern(collator(), 0, 5)


def test_static_masking_serves_exactly_static_copies_patterns_in_turn():
    c = collator(dynamic=False, static_copies=10)
    ids = sequences(1, low=100, high=100)[0]
    patterns = [c.mask_sequence(ids, index=42, epoch=e)[0].tobytes() for e in range(30)]
    assert len(set(patterns[:10])) == 10
    assert patterns[10:20] == patterns[:10] and patterns[20:30] == patterns[:10]
    one = collator(dynamic=False, static_copies=1)
    assert len({one.mask_sequence(ids, 42, e)[0].tobytes() for e in range(5)}) == 1


def test_batch_is_padded_with_flat_sorted_positions():
    c = collator()
    seqs = sequences(3, low=3, high=60, seed=5)
    seqs[1] = sequences(1, low=90, high=90, seed=6)[0]
    items = [
        {"input_ids": s.tolist(), "index": i, "epoch": 0, "nsp_label": i % 2} for i, s in enumerate(seqs)
    ]
    batch = c(items)
    B, T = len(seqs), max(s.size for s in seqs)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (B, T)
    assert batch["attention_mask"].sum(1).tolist() == [s.size for s in seqs]
    assert torch.all(batch["input_ids"][batch["attention_mask"] == 0] == PAD)
    positions, targets = batch["masked_positions"], batch["masked_targets"]
    assert positions.dtype == targets.dtype == torch.long
    assert torch.all(positions[1:] > positions[:-1])
    assert torch.all(batch["attention_mask"].flatten()[positions] == 1)
    original = torch.full((B, T), PAD)
    for b, s in enumerate(seqs):
        original[b, : s.size] = torch.from_numpy(s)
        masked, pos, _ = c.mask_sequence(s, b, 0)
        assert torch.equal(batch["input_ids"][b, : s.size], torch.from_numpy(masked))
    assert positions.numel() == sum(c.mask_sequence(s, b, 0)[1].size for b, s in enumerate(seqs))
    assert torch.equal(targets, original.flatten()[positions])
    assert batch["nsp_labels"].tolist() == [0, 1, 0]
    assert "nsp_labels" not in c([{"input_ids": seqs[0], "index": 0, "epoch": 0}])


def test_dataloader_workers_give_the_same_batches():
    seqs = sequences(16, low=20, high=40, seed=9)
    items = [{"input_ids": s, "index": i, "epoch": 1} for i, s in enumerate(seqs)]
    loaders = [
        torch.utils.data.DataLoader(items, batch_size=4, collate_fn=collator(), num_workers=w) for w in (0, 2)
    ]
    for a, b in zip(*loaders, strict=True):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


def test_bad_settings_are_named_together():
    with pytest.raises(ValueError) as err:
        collator(probability=0.0, mask_fraction=0.9, random_fraction=0.2, static_copies=0)
    message = str(err.value)
    assert "probability=0.0" in message and "random_fraction=0.2" in message and "static_copies=0" in message
    with pytest.raises(ValueError, match="below vocab_size"):
        collator(mask_token_id=VOCAB)
