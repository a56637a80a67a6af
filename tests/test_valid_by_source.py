"""A validation loss per named source (issue 15): the held-out documents of each named source are packed into
blocks of their own, the valid split records how many blocks each source has (per slice), and training logs
`val/loss/<name>` beside `val/loss`, each the exact token-weighted mean over its blocks."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep import shards
from data_prep.config import load_config
from data_prep.prepare import prepare_data
from data_prep.tokenizer_training import train_tokenizer
from pretrain.training.data import ShardDataModule
from pretrain.training.module import MLMModule
from pretrain.training.train import fit
from tests.conftest import make_documents, write_txt

SIZES = {"wiki": 60, "books": 40, "news": 50}
TINY = ["--tokenizer.vocab_size=300", "--data.seq_len=32", "--data.num_proc=1", "--corpus.valid_fraction=0.15"]
TRAIN = ["--model.hidden_size=32", "--model.num_layers=2", "--model.num_heads=2", "--model.intermediate_size=64",
         "--optim.warmup_steps=1", "--batch.global_size=8", "--batch.micro_size=4", "--batch.num_workers=0",
         "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.max_steps=4", "--trainer.val_check_interval=4",
         "--trainer.limit_val_batches=2", "--trainer.log_every_n_steps=1", "--checkpoint.every_n_steps=4"]


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("by-source")
    return {name: write_txt(tmp / f"{name}.txt", make_documents(n, seed=i + 20))
            for i, (name, n) in enumerate(SIZES.items())}


def mix(corpora: dict[str, Path], named: bool = True) -> str:
    entries = [{"path": str(p), "weight": 1.0, **({"name": n} if named else {})} for n, p in corpora.items()]
    return "--corpus.train=" + json.dumps(entries)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, corpora) -> Path:
    tmp = tmp_path_factory.mktemp("tok")
    cfg = load_config(None, [f"--run_dir={tmp}", mix(corpora), *TINY])
    return train_tokenizer(cfg, log=lambda _: None)


def config(run: Path, *overrides: str):
    return load_config(None, [f"--run_dir={run}", *TINY, *overrides])


def prep(run: Path, tokenizer: Path, *overrides: str) -> Path:
    cfg = config(run, *overrides)
    if not (cfg.run_path / "tokenizer").exists():
        shutil.copytree(tokenizer, cfg.run_path / "tokenizer")
    return prepare_data(cfg, log=lambda _: None)


def text_tokens(split: shards.ShardSplit, blocks) -> int:
    """Tokens of `blocks` that are corpus text (not <s> or </s>)."""
    bos, eos = split.special_ids["bos"], split.special_ids["eos"]
    return sum(int(np.isin(split.block(int(i)), [bos, eos], invert=True).sum()) for i in blocks)


@pytest.mark.parametrize("slices", [1, 2])
def test_each_named_source_has_blocks_of_its_own_text_only(tmp_path, corpora, tokenizer, slices) -> None:
    """The blocks a source's loss is measured on hold exactly its held-out tokens: no block crosses sources."""
    meta_path = None
    for k in range(slices):
        meta_path = prep(tmp_path, tokenizer, mix(corpora), f"--data.num_shards={slices}", f"--data.shard_index={k}")
    valid = shards.open_split(meta_path, "valid")
    per_source = valid.source_blocks()
    assert per_source is not None and len(per_source) == 3
    assert sorted(np.concatenate(per_source).tolist()) == list(range(valid.num_blocks))  # each block once
    counts = json.loads(Path(meta_path).read_text())["splits"]["valid"]["sources"]
    for blocks, count in zip(per_source, counts, strict=True):
        assert count["documents"] > 0 and len(blocks) > 0
        assert text_tokens(valid, blocks) == count["tokens"]
    assert shards.open_split(meta_path, "train").source_blocks() is None  # training blocks still cross sources


def test_unnamed_sources_keep_one_validation_set_and_their_shard_directory(tmp_path, corpora, tokenizer) -> None:
    plain = prep(tmp_path / "plain", tokenizer, mix(corpora, named=False))
    assert shards.open_split(plain, "valid").source_blocks() is None
    assert "valid_by_source" not in json.loads(plain.read_text())["settings"]
    named = prep(tmp_path / "named", tokenizer, mix(corpora))
    assert json.loads(named.read_text())["settings"]["valid_by_source"] is True
    # an explicit validation set is not the train sources: with unnamed entries, one validation set whatever
    # the train sources' names
    explicit = prep(tmp_path / "explicit", tokenizer, mix(corpora), f"--corpus.valid=[{corpora['news']}]")
    assert shards.open_split(explicit, "valid").source_blocks() is None


def test_named_entries_of_an_explicit_validation_set_get_blocks_and_a_loss_of_their_own(tmp_path, corpora,
                                                                                        tokenizer) -> None:
    valid = json.dumps([{"path": str(corpora["news"]), "name": "news"}, str(corpora["books"])])
    args = ("--corpus.train=" + json.dumps([str(corpora["wiki"])]), f"--corpus.valid={valid}")
    meta_path = prep(tmp_path, tokenizer, *args)
    split = shards.open_split(meta_path, "valid")
    per_source = split.source_blocks()
    assert per_source is not None and len(per_source) == 2
    assert sorted(np.concatenate(per_source).tolist()) == list(range(split.num_blocks))
    counts = json.loads(Path(meta_path).read_text())["splits"]["valid"]["sources"]
    assert [c["documents"] for c in counts] == [SIZES["news"], SIZES["books"]]  # every document, once
    for blocks, count in zip(per_source, counts, strict=True):
        assert text_tokens(split, blocks) == count["tokens"]
    dm = ShardDataModule(config(tmp_path, *args, *TRAIN), meta_path)
    dm.setup()
    assert len(dm.val_dataloader()) == 2 and dm.val_names == ["news", "source1"]


def test_a_weight_on_a_validation_entry_is_refused_in_one_line(tmp_path, corpora) -> None:
    from data_prep.config import ConfigError

    valid = json.dumps([{"path": str(corpora["news"]), "weight": 2.0}])
    with pytest.raises(ConfigError, match=r"^corpus\.valid\[0\]\.weight: 2: validation text is not weighted"):
        config(tmp_path, f"--corpus.valid={valid}")


def test_training_logs_the_exact_validation_loss_of_each_source(tmp_path, corpora, tokenizer) -> None:
    run = tmp_path / "run"
    meta_path = prep(run, tokenizer, mix(corpora))
    cfg = config(run, mix(corpora), *TRAIN)
    fit(cfg, meta_path, resume=False, enable_progress_bar=False, enable_model_summary=False)
    with open(run / "logs" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val/loss")]
    logged = {k: float(v) for k, v in rows[-1].items() if k.startswith("val/loss")}
    assert set(logged) == {"val/loss", "val/loss/wiki", "val/loss/books", "val/loss/news"}

    # the same numbers, summed here by hand over each source's loader with the final weights
    dm = ShardDataModule(cfg, meta_path)
    dm.setup()
    loaders = dm.val_dataloader()
    assert dm.val_names == ["wiki", "books", "news"] and len(loaders) == 3
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    module = MLMModule(ckpt["hyper_parameters"]["config"], ckpt["hyper_parameters"]["meta"])
    module.load_state_dict(ckpt["state_dict"])
    module.eval()
    sums = {}
    with torch.no_grad():
        for name, loader in zip(dm.val_names, loaders, strict=True):
            # limit_val_batches x micro_size = 8 sequences, shared by 3 sources: the first 3 blocks of each
            assert [i for _, i in loader.sampler] == dm.val_sources()[dm.val_names.index(name)][1][:3].tolist()
            outs = [module._losses(batch) for batch in loader]
            sums[name] = (sum(float(o["mlm_sum"]) for o in outs), sum(float(o["n_masked"]) for o in outs))
    for name, (loss_sum, n) in sums.items():
        assert logged[f"val/loss/{name}"] == pytest.approx(loss_sum / n, rel=1e-5)
    total = sum(s for s, _ in sums.values()) / sum(n for _, n in sums.values())
    assert logged["val/loss"] == pytest.approx(total, rel=1e-5)
    assert len({round(v, 4) for k, v in logged.items() if k != "val/loss"}) == 3, "three different sources"
