"""End-to-end training on CPU: the loss falls, resume is exact, preemption and bad checkpoints lose nothing."""

from __future__ import annotations

import csv
import itertools
import json
import shutil
from pathlib import Path

import pytest
import torch

from data_prep.config import ConfigError, ExperimentConfig, load_config
from data_prep.prepare import prepare_data
from pretrain.training.checkpoint import AtomicCheckpointIO
from pretrain.training.train import NothingToResume, fit

from .conftest import make_documents, write_txt

FAST = [
    "--tokenizer.vocab_size=300",
    "--data.seq_len=32",
    "--model.hidden_size=32",
    "--model.num_layers=2",
    "--model.num_heads=2",
    "--model.intermediate_size=64",
    "--optim.peak_lr=3e-3",
    "--optim.warmup_steps=4",
    "--batch.global_size=8",
    "--batch.micro_size=4",
    "--batch.num_workers=0",
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--trainer.max_steps=20",
    "--trainer.val_check_interval=10",
    "--trainer.limit_val_batches=4",
    "--trainer.log_every_n_steps=1",
    "--checkpoint.every_n_steps=5",
    "--checkpoint.keep_last=2",
]
QUIET = {"enable_progress_bar": False, "enable_model_summary": False}


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_txt(tmp_path_factory.mktemp("corpus") / "c.txt", make_documents(400, seed=3))


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory, corpus_file: Path) -> tuple[Path, Path]:
    """Tokenizer and shards built once; each run copies the tokenizer into its own run_dir via prepare_data."""
    run = tmp_path_factory.mktemp("prep")
    cfg = config(run, corpus_file)
    return run, prepare_data(cfg, log=lambda *_: None)


def config(run_dir: Path, corpus: Path, *extra: str) -> ExperimentConfig:
    return load_config(None, [f"--run_dir={run_dir}", f"--corpus.train={corpus}", "--corpus.valid_fraction=0.1",
                              *FAST, *extra])


def final_weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.lightning_module.model.state_dict().items()}


def losses(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "logs" / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def test_twenty_steps_and_the_loss_falls(shards, corpus_file: Path) -> None:
    run, meta = shards
    cfg = config(run, corpus_file)
    trainer = fit(cfg, meta, resume=False, **QUIET)
    assert trainer.global_step == 20
    curve = losses(run)
    assert len(curve) == 20
    first, last = sum(curve[s] for s in range(3)) / 3, sum(curve[s] for s in range(17, 20)) / 3
    assert last < first - 0.5, f"loss did not fall: {first:.3f} -> {last:.3f}"
    with open(run / "logs" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    val = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    assert len(val) == 2 and val[1] < val[0]
    rates = [float(r["mask/rate"]) for r in rows if r.get("mask/rate")]
    assert all(0.12 < r < 0.18 for r in rates)
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["last.ckpt", "step-0000015.ckpt", "step-0000020.ckpt"]  # keep_last=2


def test_resume_is_bitwise_exact(shards, corpus_file: Path, tmp_path: Path) -> None:
    _, meta = shards
    full = fit(config(tmp_path / "full", corpus_file), meta, resume=False, **QUIET)
    expected, expected_losses = final_weights(full), losses(tmp_path / "full")
    for k in (5, 10, 15):
        run = tmp_path / f"stop{k}"
        fit(config(run, corpus_file, "--trainer.max_steps=20"), meta, resume=False, max_steps=k, **QUIET)
        assert (run / "checkpoints" / "last.ckpt").is_file()
        resumed = fit(config(run, corpus_file), meta, resume=True, **QUIET)
        assert resumed.global_step == 20
        got = final_weights(resumed)
        for name, tensor in expected.items():
            assert torch.equal(got[name], tensor), f"stopped at {k}: {name} differs after resume"
        assert {s: v for s, v in losses(run).items() if s >= k} == {
            s: v for s, v in expected_losses.items() if s >= k}


def test_resume_without_checkpoint_is_a_clear_error(shards, corpus_file: Path, tmp_path: Path) -> None:
    _, meta = shards
    with pytest.raises(NothingToResume, match="last.ckpt does not exist: nothing to resume"):
        fit(config(tmp_path / "none", corpus_file), meta, resume=True, **QUIET)


def test_truncated_last_checkpoint_falls_back_to_the_previous(shards, corpus_file: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    _, meta = shards
    run = tmp_path / "trunc"
    fit(config(run, corpus_file), meta, resume=False, max_steps=10, **QUIET)
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    trainer = fit(config(run, corpus_file), meta, resume=True, **QUIET)
    assert trainer.global_step == 20
    out = capsys.readouterr().out
    assert f"checkpoint {last} is unreadable" in out and "trying the previous one" in out


def test_checkpoint_from_another_model_is_refused(shards, corpus_file: Path, tmp_path: Path) -> None:
    _, meta = shards
    run = tmp_path / "mismatch"
    fit(config(run, corpus_file), meta, resume=False, max_steps=5, **QUIET)
    with pytest.raises(ConfigError, match=r"different configuration: model.hidden_size \(checkpoint 32, config 64\)"):
        fit(config(run, corpus_file, "--model.hidden_size=64"), meta, resume=True, **QUIET)


def test_checkpoint_from_another_tokenizer_is_refused(shards, corpus_file: Path, tmp_path: Path) -> None:
    _, meta = shards
    run = tmp_path / "retokenized"
    fit(config(run, corpus_file), meta, resume=False, max_steps=5, **QUIET)
    other = tmp_path / "other-shards"
    shutil.copytree(meta.parent, other)
    changed = json.loads((other / "meta.json").read_text())
    changed["tokenizer_sha256"] = "0" * 64  # shards of the same sizes from a retrained tokenizer
    (other / "meta.json").write_text(json.dumps(changed))
    with pytest.raises(ConfigError, match=r"trained on shards of another tokenizer .* restore that tokenizer"):
        fit(config(run, corpus_file), other / "meta.json", resume=True, **QUIET)


def test_failed_write_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)
    good = path.read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 2}, path)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"], "no temporary file is left behind"


def test_bf16_mixed_precision_trains(shards, corpus_file: Path, tmp_path: Path) -> None:
    """The GPU default precision runs too (here through CPU autocast); the loss stays finite and falls."""
    _, meta = shards
    run = tmp_path / "bf16"
    trainer = fit(config(run, corpus_file, "--trainer.precision=bf16-mixed"), meta, resume=False, **QUIET)
    assert trainer.global_step == 20
    curve = losses(run)
    assert all(v == v for v in curve.values())
    assert curve[19] < curve[0]


def test_the_final_step_is_checkpointed_off_the_interval(shards, corpus_file: Path, tmp_path: Path) -> None:
    """max_steps=7 with every_n_steps=5: step 5 on the interval, step 7 at the end; last.ckpt is step 7."""
    _, meta = shards
    run = tmp_path / "off"
    fit(config(run, corpus_file, "--trainer.max_steps=7"), meta, resume=False, **QUIET)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "last.ckpt", "step-0000005.ckpt", "step-0000007.ckpt"]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 7
    # saved mid-epoch like every step checkpoint, so a longer run can continue from it
    longer = fit(config(run, corpus_file, "--trainer.max_steps=9"), meta, resume=True, **QUIET)
    assert longer.global_step == 9
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 9


def test_logged_training_metrics_cover_every_micro_batch_of_a_step(shards, corpus_file: Path,
                                                                   tmp_path: Path) -> None:
    """One step of 8 sequences logs the same loss whether it runs as one micro-batch or as two of 4."""
    _, meta = shards
    logged = {}
    for micro in (8, 4):
        run = tmp_path / f"micro{micro}"
        cfg = config(run, corpus_file, f"--batch.micro_size={micro}", "--model.dropout=0",
                     "--model.attention_dropout=0", "--trainer.max_steps=1", "--optim.warmup_steps=1")
        fit(cfg, meta, resume=False, **QUIET)
        with open(run / "logs" / "metrics.csv") as f:
            logged[micro] = [r for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(logged[8]) == len(logged[4]) == 1
    for key in ("train/loss", "train/mlm_acc", "mask/rate", "mask/mask", "mask/random", "mask/kept"):
        assert float(logged[4][0][key]) == pytest.approx(float(logged[8][0][key]), abs=1e-5), key


def test_doc_sentences_by_tokens_trains_and_resumes_bitwise(corpus_file: Path, tmp_path: Path) -> None:
    """batch.by_tokens: micro-batches of varying size (short DOC-SENTENCES blocks come more per batch), each within
    micro_size x seq_len tokens, and a resume is exact."""
    from pretrain.training.data import ShardDataModule

    extra = ["--data.packing=doc_sentences", "--batch.by_tokens=true", "--trainer.max_steps=12",
             "--checkpoint.every_n_steps=3"]
    full_cfg = config(tmp_path / "full", corpus_file, *extra)
    meta = prepare_data(full_cfg, log=lambda *_: None)
    dm = ShardDataModule(full_cfg, meta)
    dm.setup("fit")
    sizes, tokens = [], []
    for batch in itertools.islice(dm.train_dataloader(), 24):
        sizes.append(batch["input_ids"].shape[0])
        tokens.append(int(batch["attention_mask"].sum()))
    assert max(tokens) <= 4 * 32 and len(set(sizes)) > 1 and max(sizes) > 4, (sizes, tokens)
    from pretrain.hf.export import tokens_seen

    sequences, seen, most = tokens_seen(full_cfg, json.loads(meta.read_text()), meta, 12)  # 12 steps x 2 micro
    assert most == 24 * 4 * 32 and abs(seen - sum(tokens)) < 0.15 * sum(tokens), (seen, sum(tokens))
    assert abs(sequences - sum(sizes)) < 0.2 * sum(sizes), (sequences, sum(sizes))

    full = fit(full_cfg, meta, resume=False, **QUIET)
    expected = final_weights(full)
    run = tmp_path / "stopped"
    fit(config(run, corpus_file, *extra), meta, resume=False, max_steps=6, **QUIET)
    resumed = fit(config(run, corpus_file, *extra), meta, resume=True, **QUIET)
    assert resumed.global_step == 12
    got = final_weights(resumed)
    assert all(torch.equal(got[k], v) for k, v in expected.items())
    assert losses(run) == losses(tmp_path / "full")


def test_a_run_that_stops_early_without_a_signal_is_an_error_not_done(shards, corpus_file: Path,
                                                                      tmp_path: Path) -> None:
    import pytorch_lightning as pl

    from pretrain.training.train import TrainingIncomplete

    class StopAtFive(pl.Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            if trainer.global_step == 5:
                trainer.should_stop = True

    _, meta = shards
    with pytest.raises(TrainingIncomplete, match=r"training stopped at step 5 of trainer.max_steps=20: Lightning "
                       r"stopped it \(trainer.should_stop\); the newest checkpoint is in .*`make resume` continues"):
        fit(config(tmp_path / "early", corpus_file), meta, resume=False, callbacks=[StopAtFive()], **QUIET)
