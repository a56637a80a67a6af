"""fairseq's token-weighted loss: the gradient of an optimizer step is the sum of the per-token losses of all its
micro-batches (and ranks) over the step's target count, so equal data gives equal gradients however it is split.
Also: the logged gradient norm is the true one under fp16 loss scaling."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from data_prep.prepare import prepare_data
from pretrain.model.unpadded import Unpadded
from pretrain.training.masking import IGNORE
from pretrain.training.train import fit

from .test_train import QUIET, config, corpus_file, shards  # noqa: F401 - fixtures

NO_DROPOUT = ("--model.dropout=0", "--model.attention_dropout=0", "--trainer.max_steps=1", "--optim.warmup_steps=0",
              "--batch.global_size=32")


class StepRecorder(pl.Callback):
    """The first step's initial weights, micro-batches and summed gradient."""

    def __init__(self) -> None:
        self.batches: list[dict[str, torch.Tensor]] = []
        self.grads: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.initial = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == 0:
            self.batches.append({k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()})

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == 0:
            self.grads = {n: p.grad.detach().clone() for n, p in pl_module.model.named_parameters()
                          if p.grad is not None}


def one_batch(batches: list[dict[str, torch.Tensor]], pad: int) -> dict[str, torch.Tensor]:
    """The micro-batches as one padded batch (1 x the step), positions re-indexed."""
    T = max(b["input_ids"].shape[1] for b in batches)
    ids, att, pos, tgt, nsp, rows = [], [], [], [], [], 0
    for b in batches:
        B, t = b["input_ids"].shape
        ids.append(F.pad(b["input_ids"], (0, T - t), value=pad))
        att.append(F.pad(b["attention_mask"], (0, T - t)))
        row, col = b["masked_positions"] // t, b["masked_positions"] % t
        pos.append((row + rows) * T + col)
        tgt.append(b["masked_targets"])
        if "nsp_labels" in b:
            nsp.append(b["nsp_labels"])
        rows += B
    out = {"input_ids": torch.cat(ids), "attention_mask": torch.cat(att), "masked_positions": torch.cat(pos),
           "masked_targets": torch.cat(tgt)}
    if nsp:
        out["nsp_labels"] = torch.cat(nsp)
    unpadded = Unpadded.from_mask(out["attention_mask"])
    if unpadded is not None:  # as the collator says where a padded batch's tokens are
        out.update(unpad_index=unpadded.index, cu_seqlens=unpadded.cu_seqlens, max_seqlen=unpadded.max_seqlen)
    return out


@pytest.mark.parametrize("packing", ["full_sentences", "doc_sentences-by_tokens", "segment_pair-short"])
def test_four_micro_batches_give_the_gradient_of_one_batch_of_the_same_data(
        packing: str, corpus_file: Path, tmp_path: Path) -> None:  # noqa: F811
    extra = {"full_sentences": [],
             "doc_sentences-by_tokens": ["--data.packing=doc_sentences", "--batch.by_tokens=true"],
             "segment_pair-short": ["--data.packing=segment_pair", "--data.short_seq_prob=1.0", "--data.seq_len=128"]}[packing]
    cfg = config(tmp_path / "four", corpus_file, *NO_DROPOUT, "--batch.micro_size=8", *extra)
    meta = prepare_data(cfg, log=lambda *_: None)
    recorder = StepRecorder()
    trainer = fit(cfg, meta, resume=False, callbacks=[recorder], **QUIET)
    assert len(recorder.batches) == 4
    sizes = [int((b["masked_targets"] != IGNORE).sum()) for b in recorder.batches]
    if packing != "full_sentences":  # micro-batches of unequal target counts: where a mean of means is wrong
        assert len(set(sizes)) > 1, sizes

    # the same data as one batch, through a fresh copy of the initial model: mean over the step's targets
    module = trainer.lightning_module
    module.model.load_state_dict(recorder.initial)
    module.model.zero_grad()
    module.model.train()
    out = module._losses(one_batch(recorder.batches, meta_pad(meta)))
    loss = out["mlm_sum"] / sum(sizes)
    if "nsp_sum" in out:
        loss = loss + out["nsp_sum"] / sum(b["input_ids"].shape[0] for b in recorder.batches)
    loss.backward()
    for name, p in module.model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(recorder.grads[name], p.grad, rtol=1e-4, atol=1e-7,
                                       msg=lambda m, n=name: f"{n}: {m}")

    # and the logged loss is that mean, not a mean of micro-batch means
    with open(cfg.run_path / "logs" / "metrics.csv") as f:
        logged = [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]
    assert logged[0] == pytest.approx(float(out["mlm_sum"].detach()) / sum(sizes), rel=1e-5)


def meta_pad(meta_path: Path) -> int:
    import json

    return json.loads(meta_path.read_text())["special_ids"]["pad"]


def test_one_micro_batch_of_32_equals_four_of_8(shards, corpus_file: Path, tmp_path: Path) -> None:  # noqa: F811
    _, meta = shards
    grads = {}
    for micro in (32, 8):
        recorder = StepRecorder()
        fit(config(tmp_path / f"m{micro}", corpus_file, *NO_DROPOUT, f"--batch.micro_size={micro}"), meta,
            resume=False, callbacks=[recorder], **QUIET)
        grads[micro] = recorder.grads
    for name, g in grads[32].items():
        torch.testing.assert_close(grads[8][name], g, rtol=1e-4, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")


def test_grad_norm_is_logged_unscaled_under_fp16_loss_scaling(shards, corpus_file: Path, tmp_path: Path) -> None:  # noqa: F811
    """16-mixed scales the loss by 65,536; the logged norm must be the gradient's, as at fp32. (Lightning maps
    16-mixed to bf16 on a CPU, so the test hands it the fp16 plugin with a real GradScaler itself.)"""
    from pytorch_lightning.plugins.precision import MixedPrecision

    from pretrain.training.checkpoint import AtomicCheckpointIO

    _, meta = shards
    norms = {}
    for precision in ("32-true", "16-mixed"):
        run = tmp_path / precision
        kwargs = dict(QUIET)
        if precision == "16-mixed":
            scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
            kwargs.update(precision=None, plugins=[AtomicCheckpointIO(), MixedPrecision("16-mixed", "cpu", scaler)])
        trainer = fit(config(run, corpus_file, "--trainer.max_steps=3", "--optim.warmup_steps=1",
                             f"--trainer.precision={precision}"), meta, resume=False, **kwargs)
        with open(run / "logs" / "metrics.csv") as f:
            norms[precision] = [float(r["train/grad_norm"]) for r in csv.DictReader(f) if r.get("train/grad_norm")]
        if precision == "16-mixed":
            assert trainer.precision_plugin.scaler.get_scale() >= 2.0**15  # the loss really was scaled
    assert len(norms["16-mixed"]) == 3
    assert norms["16-mixed"][0] == pytest.approx(norms["32-true"][0], rel=0.05)
