"""Speed that holds on a GPU, tested on the CPU: static shapes for compile, unpadded attention equal to padded,
no host sync in the step, and the FLOPs that MFU counts."""

from __future__ import annotations

import traceback
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from pretrain.model.config import RobertaConfig
from pretrain.model.encoder import RobertaForMLM
from pretrain.model.unpadded import Unpadded
from pretrain.training.batching import MaskingCollator
from pretrain.training.masking import IGNORE
from pretrain.training.objective import batch_inputs, mlm_objective
from pretrain.training.throughput import flops_per_token
from pretrain.training.train import fit

from .test_train import QUIET, config, corpus_file, shards  # noqa: F401 - fixtures

PAD, MASK, VOCAB = 1, 399, 400


def tiny_model(**overrides) -> RobertaForMLM:
    torch.manual_seed(0)
    cfg = RobertaConfig(**{"vocab_size": VOCAB, "hidden_size": 32, "num_layers": 2, "num_heads": 4,
                           "intermediate_size": 64, "max_position_embeddings": 34} | overrides)
    return RobertaForMLM(cfg)


def collator() -> MaskingCollator:
    return MaskingCollator(mask_token_id=MASK, pad_token_id=PAD, special_ids=(0, 1, 2, 3), vocab_size=VOCAB, seed=7)


def rows(lengths: list[int], seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"input_ids": np.concatenate([[0], rng.integers(5, MASK, n - 2), [2]]), "index": i, "epoch": 0}
            for i, n in enumerate(lengths)]


@pytest.mark.parametrize("left", [False, True])
@pytest.mark.parametrize("by_runs", [True, False])
def test_unpadded_encoder_equals_the_padded_one(left: bool, by_runs: bool, monkeypatch) -> None:
    """Attention on a CPU runs by runs of equal-length rows where that saves work, else re-padded: both."""
    import pretrain.model.unpadded

    calls = []
    real_runs = pretrain.model.unpadded._attention_by_runs
    monkeypatch.setattr(pretrain.model.unpadded, "_attention_by_runs", lambda *a: calls.append(1) or real_runs(*a))
    if not by_runs:
        monkeypatch.setattr(pretrain.model.unpadded, "RUNS_MAX_WORK", 0.0)
        monkeypatch.setattr(pretrain.model.unpadded, "RUNS_FEW", 0)
    model = tiny_model(dropout=0.0, attention_dropout=0.0)
    lengths = [32, 7, 19, 3, 30]
    ids = torch.full((len(lengths), 32), PAD)
    mask = torch.zeros_like(ids)
    rng = torch.Generator().manual_seed(1)
    for b, n in enumerate(lengths):
        cols = slice(32 - n, 32) if left else slice(0, n)  # left padding: positions still start at pad + 1
        ids[b, cols] = torch.randint(5, MASK, (n,), generator=rng)
        mask[b, cols] = 1
    real = mask.bool()
    padded_model = tiny_model(dropout=0.0, attention_dropout=0.0)
    padded_model.unpad = False
    hidden = model.encode(ids, mask)
    expected = padded_model.encode(ids, mask)
    torch.testing.assert_close(hidden[real], expected[real], atol=1e-5, rtol=1e-5)
    assert torch.all(hidden[~real] == 0)
    # and the gradients through both, in float64: the embeddings' gradients here are small differences of O(1)
    # terms (LayerNorm's backward), so at float32 any two kernels (the CPU path attends by runs of rows, without
    # padding) differ by about 1e-5 absolute, each path as far from the float64 value as the other
    model.double(), padded_model.double()
    model.encode(ids, mask)[real].square().sum().backward()
    padded_model.encode(ids, mask)[real].square().sum().backward()
    for (name, a), b in zip(model.named_parameters(), padded_model.parameters(), strict=True):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, atol=1e-12, rtol=1e-9, msg=name)
    assert (len(calls) > 0) == by_runs


def test_unpadded_runs_on_the_real_tokens_only(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model().eval()
    seen: list[tuple[int, ...]] = []
    layer = model.encoder.layers[0].ffn_in
    layer.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape)))
    batch = collator()(rows([32, 10, 5]))
    model.encode(batch["input_ids"], batch["attention_mask"])
    assert seen == [(47, 32)]  # 32 + 10 + 5 tokens, not 3 x 32


def test_full_batches_pad_their_targets_to_a_bound_of_their_shape() -> None:
    c = collator()
    items = rows([32] * 4, seed=2)
    batch = c(items)
    slots = 4 * c.num_targets(32)
    assert batch["masked_positions"].shape == batch["masked_targets"].shape == (slots,)
    real = batch["masked_targets"] != IGNORE
    assert int(real.sum()) == 4 * c.num_targets(30)  # each row: 30 maskable tokens between <s> and </s>
    assert torch.all(batch["masked_positions"][~real] == 0)
    assert "unpad_index" not in batch and batch["num_tokens"] == 128 and batch["num_candidates"] == 120
    # every full batch of this shape has the same shapes: what compile traces once
    for seed in range(5):
        other = c(rows([32] * 4, seed=seed))
        assert other["masked_positions"].shape == (slots,) and other["input_ids"].shape == (4, 32)


def test_padded_batches_say_where_their_tokens_are() -> None:
    batch = collator()(rows([20, 32, 9], seed=3))
    expected = Unpadded.from_mask(batch["attention_mask"])
    assert torch.equal(batch["unpad_index"], expected.index)
    assert torch.equal(batch["cu_seqlens"], expected.cu_seqlens) and batch["cu_seqlens"].tolist() == [0, 20, 52, 61]
    assert batch["max_seqlen"] == expected.max_seqlen == 32
    assert batch["num_tokens"] == 61 and batch["num_candidates"] == 61 - 6
    assert torch.all(batch["masked_targets"] != IGNORE)  # no slots added: a padded batch's shapes vary anyway


def test_padded_target_slots_change_no_loss() -> None:
    model = tiny_model().eval()
    items = rows([32] * 3, seed=4)
    for it in items:  # blocks across a document boundary: one more </s>, 29 maskable tokens, 4 targets, 5 slots
        it["input_ids"][16] = 2
    batch = collator()(items)
    real = batch["masked_targets"] != IGNORE
    assert int(real.sum()) == 12 and real.numel() == 15
    trimmed = dict(batch, masked_positions=batch["masked_positions"][real], masked_targets=batch["masked_targets"][real])
    with torch.no_grad():
        a, b = mlm_objective(model, **batch_inputs(batch)), mlm_objective(model, **batch_inputs(trimmed))
    assert int(a["n_masked"]) == int(b["n_masked"]) == int(real.sum())
    assert int(a["mlm_correct"]) == int(b["mlm_correct"])
    torch.testing.assert_close(a["mlm_sum"], b["mlm_sum"], rtol=1e-6, atol=1e-5)


def test_compiled_objective_has_no_graph_break_and_no_recompile_after_warmup() -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = tiny_model()
    objective = torch.compile(mlm_objective, backend="eager", fullgraph=True)  # fullgraph: a break raises
    c = collator()
    graphs = []
    for step in range(12):  # full batches, then padded ones of varying lengths
        lengths = [32] * 4 if step < 6 else [int(n) for n in np.random.default_rng(step).integers(8, 33, 4)]
        out = objective(model, **batch_inputs(c(rows(lengths, seed=step))))
        out["mlm_sum"].backward()
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[:6] == [1] * 6  # full batches: traced once
    assert graphs[-4:] == [graphs[-4]] * 4 and graphs[-1] <= 3  # padded: static, then dynamic, then no more


def test_static_collation_gives_one_shape_for_rows_of_any_length_and_one_graph() -> None:
    """What trainer.compile runs: FULL-SENTENCES blocks end at sentence boundaries (rows of varying length), so
    the collator pads to a multiple and the target slots to that shape's bound; the objective runs padded."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    c = MaskingCollator(mask_token_id=MASK, pad_token_id=PAD, special_ids=(0, 1, 2, 3), vocab_size=VOCAB, seed=7,
                        pad_to_multiple_of=32)
    model = tiny_model()
    model.unpad = False
    objective = torch.compile(mlm_objective, backend="eager", fullgraph=True)
    eager = tiny_model()
    eager.load_state_dict(model.state_dict())
    eager.unpad = True
    for step in range(6):
        lengths = [int(n) for n in np.random.default_rng(step).integers(20, 33, 4)]
        batch = c(rows(lengths, seed=step))
        assert batch["input_ids"].shape == (4, 32) and batch["masked_targets"].shape == (4 * c.num_targets(32),)
        assert batch["padded"] and "unpad_index" not in batch
        model.eval(), eager.eval()
        out = objective(model, **batch_inputs(batch))
        # the same sums as the unpadded eager path on the same rows
        ref = mlm_objective(eager, **batch_inputs(collator()(rows(lengths, seed=step))))
        torch.testing.assert_close(out["mlm_sum"], ref["mlm_sum"], rtol=1e-5, atol=1e-4)
        assert int(out["n_masked"]) == int(ref["n_masked"])
    assert counters["stats"]["unique_graphs"] == 1


def test_flops_per_token_counts_what_the_step_computes() -> None:
    model = tiny_model(dropout=0.0, attention_dropout=0.0, max_position_embeddings=66)
    B, T, S = 4, 64, 40
    ids = torch.randint(5, MASK, (B, T))
    positions = torch.randperm(B * T)[:S].sort().values
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:  # fused kernels go uncounted
        mlm_objective(model, ids, None, positions, ids.flatten()[positions])["mlm_sum"].backward()
    assert counter.get_total_flops() / (B * T) == pytest.approx(flops_per_token(model.cfg, T, S / (B * T)), rel=1e-9)


# --- no host sync inside the step -------------------------------------------------------------------------

SYNCS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "nonzero", "argwhere",
         "masked_select", "unique", "tensor", "as_tensor"}
"""Tensor reads that block the host until a GPU's queue drains (torch.tensor / as_tensor of host data: a
blocking copy to the device)."""


class SyncTrap(TorchFunctionMode):
    """Records every call that reads a tensor on the host, with the optimizer step it happened in."""

    def __init__(self) -> None:
        super().__init__()
        self.step: int | None = None
        self.events: list[tuple[int, str, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        hit = name in SYNCS and not (name in ("tensor", "as_tensor") and args and torch.is_tensor(args[0]))
        if name == "__getitem__" and len(args) > 1:
            keys = args[1] if isinstance(args[1], tuple) else (args[1],)
            hit = any(torch.is_tensor(k) and k.dtype == torch.bool for k in keys)  # boolean indexing: nonzero
        if hit and self.step is not None:
            self.events.append((self.step, name, "".join(traceback.format_stack(limit=14)[:-1])))
        return func(*args, **(kwargs or {}))


class StepScope(pl.Callback):
    def __init__(self, trap: SyncTrap):
        self.trap = trap

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.trap.step = trainer.global_step

    def on_train_end(self, trainer, pl_module) -> None:
        self.trap.step = None


@pytest.mark.parametrize("packing", ["full_sentences", "doc_sentences"])
def test_no_host_sync_between_logging_steps(shards, corpus_file: Path, tmp_path: Path, packing: str) -> None:  # noqa: F811
    run, _ = shards
    cfg = config(run if packing == "full_sentences" else tmp_path / "doc", corpus_file, f"--data.packing={packing}",
                 "--trainer.max_steps=8", "--trainer.log_every_n_steps=4", "--checkpoint.every_n_steps=4",
                 "--trainer.val_check_interval=100", "--batch.num_workers=1")
    from data_prep.prepare import prepare_data

    meta = prepare_data(cfg, log=lambda *_: None)
    trap = SyncTrap()
    with trap:
        # the progress bar too: Lightning's own reads the metrics logged for it after every batch
        trainer = fit(cfg, meta, resume=False, callbacks=[StepScope(trap)], enable_model_summary=False,
                      enable_progress_bar=packing == "full_sentences")
    assert trainer.global_step == 8
    # steps 3 and 7 log and save (a read of the divergence flag and the metrics); step 0 warms up
    bad = [(s, name, where) for s, name, where in trap.events if s not in (0, 3, 7)]
    assert not bad, f"{len(bad)} host reads between logging steps, the first at step {bad[0][0]} " \
                    f"({bad[0][1]}):\n{bad[0][2]}"
    assert any(s in (3, 7) for s, _, _ in trap.events)  # the trap sees the reads that are allowed


def test_compile_switch_runs_the_objective_through_torch_compile(shards, corpus_file: Path,  # noqa: F811
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    compiled = []
    real_compile = torch.compile

    def eager_compile(fn, **kwargs):  # inductor takes a minute here; the eager backend traces the same graph
        compiled.append(fn)
        return real_compile(fn, backend="eager", **kwargs)

    monkeypatch.setattr(torch, "compile", eager_compile)
    run, meta = shards
    cfg = config(run, corpus_file, "--trainer.compile=true", "--trainer.max_steps=4")
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    trainer = fit(cfg, meta, resume=False, **QUIET)
    assert trainer.global_step == 4 and compiled == [mlm_objective]
    assert counters["stats"]["unique_graphs"] <= 2  # training and validation, no recompile
    assert all(not k.startswith("model._orig_mod") for k in trainer.lightning_module.state_dict())

