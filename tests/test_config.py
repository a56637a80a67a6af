from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from data_prep.config import (
    ConfigError,
    ExperimentConfig,
    config_from_dict,
    describe_config,
    dump_config,
    load_config,
)


# experiment configs; ablation-*.yaml are ablation files (tests/test_ablation.py parses them)
@pytest.mark.parametrize("name", sorted(p.name for p in (Path(__file__).parent.parent / "configs").glob("*.yaml")
                                        if not p.name.startswith("ablation-")))
def test_every_shipped_config_parses(repo_root: Path, name: str) -> None:
    cfg = load_config(repo_root / "configs" / name)
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.run_dir.startswith("runs/")
    # round trip through the plain-dict form that checkpoints and logs store
    assert config_from_dict(cfg.to_dict()) == cfg


def test_roberta_configs_follow_table9(repo_root: Path) -> None:
    base = load_config(repo_root / "configs/roberta-base.yaml")
    large = load_config(repo_root / "configs/roberta-large.yaml")
    for cfg in (base, large):
        assert cfg.optim.betas == [0.9, 0.98] and cfg.optim.eps == 1e-6 and cfg.optim.weight_decay == 0.01
        assert cfg.batch.global_size == 8192 and cfg.trainer.max_steps == 500_000 and cfg.optim.grad_clip == 0
        assert cfg.data.seq_len == 512 and cfg.data.packing == "full_sentences" and cfg.masking.dynamic
        assert cfg.tokenizer.vocab_size == 50265
    assert (base.model.num_layers, base.model.hidden_size, base.model.num_heads, base.model.intermediate_size) == (
        12, 768, 12, 3072)
    assert (large.model.num_layers, large.model.hidden_size, large.model.num_heads,
            large.model.intermediate_size) == (24, 1024, 16, 4096)
    assert (base.optim.peak_lr, base.optim.warmup_steps) == (6e-4, 24000)
    assert (large.optim.peak_lr, large.optim.warmup_steps) == (4e-4, 30000)


def test_dotted_overrides_are_typed() -> None:
    cfg = load_config(None, ["--tokenizer.vocab_size=8000", "--optim.peak_lr=1e-3", "--optim.betas=[0.9, 0.999]",
                             "--corpus.train=a.txt", "--model.init_from=null", "--trainer.devices=2"])
    assert cfg.tokenizer.vocab_size == 8000
    assert cfg.optim.peak_lr == pytest.approx(1e-3) and isinstance(cfg.optim.peak_lr, float)
    assert cfg.optim.betas == [0.9, 0.999]
    assert cfg.corpus.train == ["a.txt"]
    assert cfg.model.init_from is None
    assert cfg.trainer.devices == 2


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--tokenizer.vocab_sise=8000", "unknown key tokenizer.vocab_sise"),
        ("--nosection.key=1", "unknown key nosection"),
        ("--tokenizer.vocab_size=big", "tokenizer.vocab_size: expected int, got 'big'"),
        ("--tokenizer.vocab_size=8000.5", "tokenizer.vocab_size: expected int"),
        ("--masking.dynamic=maybe", "masking.dynamic: expected bool"),
        ("--data.packing=paragraphs", "data.packing: 'paragraphs' is not one of"),
        ("--batch.micro_size=3", "batch.global_size=8192 is not a multiple of batch.micro_size=3"),
        ("--model.num_heads=5", "model.num_heads=5 does not divide model.hidden_size=768"),
        ("--optim.betas=[0.9]", "optim.betas=[0.9] must be two numbers"),
        ("--trainer.devices=many", "trainer.devices"),
        ("tokenizer.vocab_size=8000", "must look like --section.key=value"),
    ],
)
def test_bad_values_name_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  hidden_size: [1,\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+: not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(listy)


def test_yaml_round_trip(tmp_path: Path) -> None:
    cfg = load_config(None, ["--seed=7", "--logger.wandb={project: x, mode: offline}"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg
    assert cfg.logger.wandb == {"project": "x", "mode": "offline"}


def test_every_key_is_documented() -> None:
    text = describe_config()
    for line in text.splitlines():
        assert line.rstrip().endswith((".", ")", ":", "]")) or ": " in line, line
    assert "tokenizer.vocab_size (int, default 50265, in [261, 4194304])" in text
    assert "data.num_proc (int, default 0, >= 0)" in text and "model.dropout (float, default 0.1)" in text
    assert "data.packing ('full_sentences' | 'doc_sentences' | 'segment_pair' | 'sentence_pair'" in text


def test_cli_error_is_one_line_and_nonzero(repo_root: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "data_prep", "tokenizer", "--config", "configs/tiny.yaml", "--optim.peak_lr=fast"],
        cwd=repo_root, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: configs/tiny.yaml: optim.peak_lr: expected float, got 'fast'"
