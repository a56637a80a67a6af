"""BERT's length schedule (data.short_seq_len): short shards beside the long ones, the switch at the configured
step, resume before and after it bitwise equal to a run that never stopped, and the BERT tiny recipe end to end."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from data_prep.config import ConfigError, ExperimentConfig, load_config
from data_prep.prepare import prepare_data
from data_prep.shards import ShardError, open_split, read_meta, short_phase
from pretrain.training.data import seq_len_at
from pretrain.training.samplers import PhasedSampler, StepSampler
from pretrain.training.train import fit

from .conftest import make_documents, write_txt
from .test_train import FAST, QUIET, final_weights, losses

SHORT, LONG, STEPS, SWITCH = 16, 32, 20, 12  # round(0.6 x 20) = 12: checkpoints at 5, 10, 15 fall on both sides
TWO_PHASE = [f"--data.short_seq_len={SHORT}", "--data.short_fraction=0.6"]
SILENT = {"log": lambda *_: None}


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_txt(tmp_path_factory.mktemp("corpus") / "c.txt", make_documents(400, seed=3))


def config(run_dir: Path, corpus: Path, *extra: str) -> ExperimentConfig:
    return load_config(None, [f"--run_dir={run_dir}", f"--corpus.train={corpus}", "--corpus.valid_fraction=0.1",
                              *FAST, *TWO_PHASE, *extra])


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory, corpus_file: Path) -> Path:
    return prepare_data(config(tmp_path_factory.mktemp("prep"), corpus_file), **SILENT)


def metrics(run_dir: Path, key: str) -> dict[int, float]:
    with open(run_dir / "logs" / "metrics.csv") as f:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r.get(key)}


class BatchLengths(pl.Callback):
    """Per optimizer step: the longest row of its micro-batches."""

    def __init__(self) -> None:
        self.lengths: dict[int, int] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        step = trainer.global_step
        self.lengths[step] = max(self.lengths.get(step, 0), batch["input_ids"].shape[1])


def test_prepare_writes_both_lengths_and_links_them(shards: Path, corpus_file: Path) -> None:
    meta = read_meta(shards)
    assert shards.name == "meta.json" and meta["seq_len"] == LONG
    assert meta["short"]["seq_len"] == SHORT and not Path(meta["short"]["meta"]).is_absolute()
    length, short_meta = short_phase(shards)
    assert length == SHORT and short_meta.parent != shards.parent
    short = read_meta(short_meta)
    assert short["seq_len"] == SHORT and short["tokenizer_sha256"] == meta["tokenizer_sha256"]
    assert "short" not in short
    train = open_split(short_meta, "train")
    assert train.block_lengths().max() == SHORT and train.num_blocks > open_split(shards, "train").num_blocks
    # a rerun reuses both directories and returns the same path
    said: list[str] = []
    assert prepare_data(config(shards.parent.parent.parent, corpus_file), log=said.append) == shards
    assert sum("is up to date" in s for s in said) == 2


def test_the_length_switches_at_the_configured_step(shards: Path, corpus_file: Path, tmp_path: Path) -> None:
    cfg = config(tmp_path / "run", corpus_file)
    assert [seq_len_at(cfg, s) for s in (0, SWITCH - 1, SWITCH, STEPS - 1)] == [SHORT, SHORT, LONG, LONG]
    seen = BatchLengths()
    trainer = fit(cfg, shards, resume=False, callbacks=[seen], **QUIET)
    assert trainer.global_step == STEPS
    # full_sentences blocks are full: each step's longest row is its phase's length
    assert seen.lengths == {s: SHORT if s < SWITCH else LONG for s in range(STEPS)}
    logged = metrics(tmp_path / "run", "train/seq_len")
    assert logged == {s: float(SHORT if s < SWITCH else LONG) for s in range(STEPS)}
    assert len(metrics(tmp_path / "run", "val/loss")) == 2  # on the long valid blocks
    assert all(v > 0 for v in metrics(tmp_path / "run", "train/tokens_per_s").values())


def test_phased_sampler_is_a_function_of_the_step() -> None:
    """Steps [0, 6) read split 0 (30 blocks), [6, 10) split 1 (20 blocks) from its own epoch 0; any start step
    continues the same stream, on one rank or two."""
    G, m = 8, 4

    def sampler(start: int, world: int = 1, rank: int = 0) -> PhasedSampler:
        phases = [StepSampler(30, 5, G, m, world, rank, 0, 6), StepSampler(20, 5, G, m, world, rank, 0, 10, 6)]
        return PhasedSampler(phases, start)

    full = list(sampler(0))
    assert len(full) == len(sampler(0)) == 10 * G
    assert {p for p, _, _ in full[: 6 * G]} == {0} and {p for p, _, _ in full[6 * G :]} == {1}
    long_epoch0 = [(e, i) for p, e, i in full[6 * G :] if e == 0]
    assert len(long_epoch0) == 20 and sorted(i for _, i in long_epoch0) == list(range(20))
    for k in (1, 5, 6, 7, 9):
        assert list(sampler(k)) == full[k * G :]
    ranks = [list(sampler(0, 2, r)) for r in range(2)]
    for s in range(10):
        step = full[s * G : (s + 1) * G]
        assert sorted(step) == sorted(ranks[0][s * m : (s + 1) * m] + ranks[1][s * m : (s + 1) * m])


def test_resume_before_at_and_after_the_switch_is_bitwise_exact(shards: Path, corpus_file: Path,
                                                              tmp_path: Path) -> None:
    full = fit(config(tmp_path / "full", corpus_file), shards, resume=False, **QUIET)
    expected, expected_losses = final_weights(full), losses(tmp_path / "full")
    for k in (5, SWITCH, 15):
        run = tmp_path / f"stop{k}"
        fit(config(run, corpus_file), shards, resume=False, max_steps=k, **QUIET)
        resumed = fit(config(run, corpus_file), shards, resume=True, **QUIET)
        assert resumed.global_step == STEPS
        got = final_weights(resumed)
        for name, tensor in expected.items():
            assert torch.equal(got[name], tensor), f"stopped at {k}: {name} differs after resume"
        assert {s: v for s, v in losses(run).items() if s >= k} == {
            s: v for s, v in expected_losses.items() if s >= k}
    # the schedule is part of the data geometry: a resume with another one is refused
    with pytest.raises(ConfigError, match=r"data.short_fraction \(checkpoint 0.6, config 0.5\)"):
        fit(config(tmp_path / "stop15", corpus_file, "--data.short_fraction=0.5"), shards, resume=True, **QUIET)


def test_shards_of_another_short_length_are_a_clear_error(shards: Path, corpus_file: Path, tmp_path: Path) -> None:
    with pytest.raises(ShardError, match=r"points to seq_len 16, the config asks for data.short_seq_len=8: run"):
        fit(config(tmp_path / "r", corpus_file, "--data.short_seq_len=8"), shards, resume=False, **QUIET)


def test_bert_tiny_recipe_trains_with_balanced_nsp(repo_root: Path, tmp_path: Path) -> None:
    # documents of 10-30 sentences: BERT's rule makes a chunk of one sentence (a one-sentence document, or one
    # sentence longer than the block) always "random", so balance needs chunks of several sentences
    docs = [d for d in make_documents(400, seed=4, max_sentences=30) if len(d) >= 10]
    corpus_file = write_txt(tmp_path / "long-docs.txt", docs)
    run = tmp_path / "bert"
    cfg = load_config(repo_root / "configs/bert-tiny.yaml", [
        f"--run_dir={run}", f"--corpus.train={corpus_file}", "--corpus.valid_fraction=0.1",
        "--tokenizer.vocab_size=300", "--data.seq_len=128", "--data.short_seq_len=64",
        "--model.hidden_size=32", "--model.intermediate_size=64", "--batch.global_size=8", "--batch.micro_size=4",
        "--batch.num_workers=0", "--trainer.max_steps=10", "--optim.warmup_steps=2", "--trainer.val_check_interval=10",
        "--trainer.limit_val_batches=2", "--trainer.log_every_n_steps=1", "--checkpoint.every_n_steps=10",
    ])
    assert cfg.data.packing == "segment_pair" and not cfg.masking.dynamic and cfg.masking.static_copies == 10
    assert cfg.optim.betas == [0.9, 0.999] and cfg.data.short_fraction == 0.9
    meta_path = prepare_data(cfg, **SILENT)
    shares = []
    for path in (meta_path, short_phase(meta_path)[1]):
        record = read_meta(path)["splits"]["train"]
        labels = np.fromfile(path.parent / record["nsp"], np.uint8)
        assert len(labels) == record["num_blocks"] > 200 and set(labels.tolist()) == {0, 1}
        shares.append(labels.mean())
    assert all(0.4 < share < 0.6 for share in shares), f"random-B shares at 128 and 64 tokens: {shares}"
    trainer = fit(cfg, meta_path, resume=False, **QUIET)
    assert trainer.global_step == 10
    nsp = metrics(run, "train/nsp_loss")
    assert sorted(nsp) == list(range(10)) and all(np.isfinite(list(nsp.values())))
    assert metrics(run, "train/seq_len") == {s: float(64 if s < 9 else 128) for s in range(10)}
    assert list(metrics(run, "val/nsp_loss")) == [9]  # the step index Lightning logs validation at


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--data.short_seq_len=4", "data.short_seq_len=4 must be 0 (off) or in [8, data.seq_len=512)"),
        ("--data.short_seq_len=512", "data.short_seq_len=512 must be 0 (off) or in [8, data.seq_len=512)"),
        ("--data.short_seq_len=-1", "data.short_seq_len=-1 must be 0 (off)"),
        ("--data.short_seq_len=half", "data.short_seq_len: expected int, got 'half'"),
        ("--data.short_fraction=1", "data.short_fraction=1.0 must be in (0, 1)"),
        ("--data.short_fraction=0", "data.short_fraction=0.0 must be in (0, 1)"),
        ("--data.short_fraction=most", "data.short_fraction: expected float, got 'most'"),
    ],
)
def test_bad_schedule_values_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value) and "\n" not in str(err.value)
