"""The learning-rate schedule, the optimizer's parameter groups and the step-indexed samplers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_prep.config import ConfigError
from pretrain.model.config import RobertaConfig
from pretrain.model.encoder import RobertaForMLM
from pretrain.training.data import batch_geometry
from pretrain.training.module import param_groups
from pretrain.training.samplers import (
    StepSampler,
    TokenBudgetSampler,
    ValidSampler,
    epoch_permutation,
    token_bins,
)
from pretrain.training.schedules import LRSchedule


@pytest.mark.parametrize(("warmup", "total"), [(10, 110), (4, 12), (0, 10), (7, 8)])
def test_the_schedule_equals_get_linear_schedule_with_warmup_step_for_step(warmup: int, total: int) -> None:
    """The module's scheduler against transformers': lr 0 for the first update, the peak at the end of warmup,
    0 at max_steps; the same rate for every update."""
    from transformers import get_linear_schedule_with_warmup

    from data_prep.config import load_config
    from pretrain.training.module import MLMModule

    cfg = load_config(None, ["--model.hidden_size=16", "--model.num_layers=1", "--model.num_heads=2",
                             "--model.intermediate_size=32", "--optim.peak_lr=1e-3",
                             f"--optim.warmup_steps={warmup}", f"--trainer.max_steps={total}"])
    meta = {"vocab_size": 50, "seq_len": 16, "packing": "full_sentences",
            "special_ids": {"bos": 0, "pad": 1, "eos": 2, "unk": 3, "mask": 49}}
    ours = MLMModule(cfg.to_dict(), meta).configure_optimizers()
    p = torch.nn.Parameter(torch.zeros(1))
    hf_opt = torch.optim.AdamW([p], lr=1e-3)
    hf = get_linear_schedule_with_warmup(hf_opt, warmup, total)
    seen = []
    for _ in range(total + 1):
        lr = ours["optimizer"].param_groups[0]["lr"]
        assert lr == hf_opt.param_groups[0]["lr"]
        seen.append(lr)
        ours["optimizer"].step()
        hf_opt.step()
        ours["lr_scheduler"]["scheduler"].step()
        hf.step()
    assert seen[0] == (0.0 if warmup else 1e-3) and seen[-1] == 0.0
    assert seen[warmup] == pytest.approx(1e-3) and max(seen) == pytest.approx(1e-3)
    assert LRSchedule("linear", warmup, total)(warmup) == 1.0


def test_warmup_longer_than_the_run_is_refused() -> None:
    from data_prep.config import load_config

    with pytest.raises(ConfigError, match=r"optim.warmup_steps=30 is more than trainer.max_steps=20: the rate would "
                       "never reach its peak nor zero"):
        load_config(None, ["--optim.warmup_steps=30", "--trainer.max_steps=20"])


def test_no_weight_decay_on_biases_and_layernorm() -> None:
    model = RobertaForMLM(RobertaConfig(vocab_size=50, max_position_embeddings=18, hidden_size=16, num_layers=1,
                                        num_heads=2, intermediate_size=32))
    decay, no_decay = param_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert all(names[id(p)].endswith(".weight") for p in decay["params"])
    assert "embeddings.word.weight" in {names[id(p)] for p in decay["params"]}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert all(n.endswith(".bias") or "norm" in n for n in no_decay_names)
    assert "encoder.layers.0.attn_norm.weight" in no_decay_names and "lm_head.decoder.bias" in no_decay_names


def test_epoch_permutations_are_seeded_and_differ() -> None:
    a = epoch_permutation(0, 0, 100)
    assert sorted(a) == list(range(100))
    assert np.array_equal(a, epoch_permutation(0, 0, 100))
    assert not np.array_equal(a, epoch_permutation(0, 1, 100))
    assert not np.array_equal(a, epoch_permutation(1, 0, 100))


def _steps(sampler: StepSampler, micro: int, accumulation: int) -> list[list[tuple[int, int]]]:
    items = list(sampler)
    per_step = micro * accumulation
    return [items[i : i + per_step] for i in range(0, len(items), per_step)]


def test_every_step_sees_the_same_sequences_whatever_the_device_count() -> None:
    n, G, m, steps = 37, 16, 4, 9  # 9 steps x 16 = 144 positions: several epochs of 37 blocks
    one = _steps(StepSampler(n, 3, G, m, 1, 0, 0, steps), m, 4)
    ranks = [_steps(StepSampler(n, 3, G, m, 2, r, 0, steps), m, 2) for r in range(2)]
    assert len(one) == steps
    for s in range(steps):
        assert sorted(one[s]) == sorted(ranks[0][s] + ranks[1][s])
        assert not set(ranks[0][s]) & set(ranks[1][s])
    # epochs: each block exactly once per epoch, in a new order each epoch
    flat = [x for step in one for x in step]
    for e in range(3):
        assert sorted(i for ep, i in flat if ep == e) == list(range(n))


def test_resuming_at_a_step_continues_the_same_stream() -> None:
    full = list(StepSampler(50, 0, 8, 4, 1, 0, 0, 20))
    for k in (1, 7, 13, 19):
        resumed = StepSampler(50, 0, 8, 4, 1, 0, k, 20)
        assert len(resumed) == 20 * 8  # Lightning counts batches from the run's start
        assert list(resumed) == full[k * 8 :]
    # a late start is pure arithmetic: the millionth step costs what the first does
    late = StepSampler(50, 0, 8, 4, 1, 0, 10**6, 10**6 + 1)
    assert len(list(late)) == 8


def test_valid_sampler_splits_by_rank_with_the_fixed_epoch() -> None:
    assert list(ValidSampler(10, 1, 0, None)) == [(0, i) for i in range(10)]
    assert list(ValidSampler(10, 2, 1, 6)) == [(0, 1), (0, 3), (0, 5)]


def test_batch_geometry() -> None:
    assert batch_geometry(8192, 32, 8) == 32
    with pytest.raises(ConfigError, match="batch.global_size=64 is not a multiple of batch.micro_size=32 x 3"):
        batch_geometry(64, 32, 3)


def test_sparse_loss_equals_the_dense_loss_of_transformers_and_its_gradients() -> None:
    """The module's loss (LM head on masked positions only) = RobertaForMaskedLM's dense loss with -100 labels."""
    import transformers

    from data_prep.config import load_config
    from pretrain.hf.convert import to_hf_state_dict
    from pretrain.training.batching import MaskingCollator
    from pretrain.training.module import MLMModule

    cfg = load_config(None, ["--model.hidden_size=32", "--model.num_layers=2", "--model.num_heads=2",
                             "--model.intermediate_size=64", "--model.dropout=0", "--model.attention_dropout=0"])
    meta = {"vocab_size": 120, "seq_len": 24, "packing": "full_sentences",
            "special_ids": {"bos": 0, "pad": 1, "eos": 2, "unk": 3, "mask": 119}}
    torch.manual_seed(0)
    module = MLMModule(cfg.to_dict(), meta)
    collate = MaskingCollator(mask_token_id=119, pad_token_id=1, special_ids=(0, 1, 2, 3, 119), vocab_size=120)
    gen = torch.Generator().manual_seed(1)
    items = [{"input_ids": [0, *torch.randint(4, 119, (n,), generator=gen).tolist(), 2], "index": i, "epoch": 0}
             for i, n in enumerate((22, 15, 9, 22))]
    batch = collate(items)
    loss = module._losses(batch)["mlm_loss"]
    loss.backward()

    hf = transformers.RobertaForMaskedLM(transformers.RobertaConfig(**module.model.cfg.hf_config_kwargs()))
    hf.load_state_dict(to_hf_state_dict(module.model.state_dict(), 2))
    hf.eval()
    labels = torch.full_like(batch["input_ids"], -100)
    labels.view(-1)[batch["masked_positions"]] = batch["masked_targets"]
    dense = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
    dense.backward()
    torch.testing.assert_close(loss, dense, rtol=1e-5, atol=1e-6)
    ours = dict(module.model.named_parameters())
    torch.testing.assert_close(ours["embeddings.word.weight"].grad,
                               hf.roberta.embeddings.word_embeddings.weight.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours["encoder.layers.0.attn.query.weight"].grad,
                               hf.roberta.encoder.layer[0].attention.self.query.weight.grad, rtol=1e-4, atol=1e-6)


def test_token_bins_are_greedy_runs_within_the_budget() -> None:
    lengths = np.array([30, 30, 40, 100, 200, 10, 10, 10, 5])
    bounds = token_bins(lengths, 100)
    # [30 30 40] = 100, [100], [200] alone (over budget by itself), [10 10 10 5]
    assert bounds.tolist() == [0, 3, 4, 5, 9]
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 129, 5000)
    bounds = token_bins(lengths, 8 * 128)
    sums = np.add.reduceat(lengths, bounds[:-1])
    assert bounds[0] == 0 and bounds[-1] == 5000 and (np.diff(bounds) > 0).all()
    assert sums.max() <= 8 * 128
    # greedy: the next block would not have fitted
    assert all(sums[j] + lengths[bounds[j + 1]] > 8 * 128 for j in range(len(sums) - 1))


def test_token_budget_sampler_splits_steps_by_rank_and_resumes_in_place() -> None:
    rng = np.random.default_rng(1)
    lengths = rng.integers(8, 65, 300)  # short and long blocks: micro-batches of 2 to 16 blocks
    budget, steps, A = 4 * 64, 60, 2   # 60 steps x 2 micro-batches x 2 ranks: several epochs
    one = list(TokenBudgetSampler(lengths, 7, budget, 2 * A, 1, 0, 0, steps))
    ranks = [list(TokenBudgetSampler(lengths, 7, budget, A, 2, r, 0, steps)) for r in range(2)]
    assert len(one) == steps * 2 * A and all(len(r) == steps * A for r in ranks)
    for s in range(steps):  # the same micro-batches per step on 1 device (x4 accumulation) or 2 (x2)
        single = one[s * 2 * A : (s + 1) * 2 * A]
        split = [ranks[r][s * A + a] for a in range(A) for r in range(2)]
        assert single == split
    for mb in one:
        assert sum(lengths[i] for _, i in mb) <= budget and len({e for e, _ in mb}) == 1
    # each epoch's micro-batches are its permutation, cut into pieces, in order
    epoch0 = [i for mb in one if mb[0][0] == 0 for _, i in mb]
    assert epoch0 == epoch_permutation(7, 0, 300).tolist()
    assert {e for mb in one for e, _ in mb} >= {0, 1, 2}
    # a resume at step 37 yields what the uninterrupted run yields from there
    resumed = list(TokenBudgetSampler(lengths, 7, budget, 2 * A, 1, 0, 37, steps))
    assert resumed == one[37 * 2 * A :]
