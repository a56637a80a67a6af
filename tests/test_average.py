"""Checkpoint averaging (pretrain/hf/average.py): the mean of copies is the checkpoint, the mean of two is (a + b) / 2
exactly, checkpoints of other runs are refused with one line naming the checkpoint and the key, and the mean is
exported with the parity check and a card that names what was averaged (`make average`, checkpoint.average_last).

The checkpoints are written as the trainer writes them (`state_dict` with `model.` names, `global_step`,
`hyper_parameters` with the config and the shards' meta), from models with different seeds: no training needed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from data_prep.config import ExperimentConfig, load_config
from data_prep.prepare import prepare_data
from data_prep.shards import read_meta
from pretrain.__main__ import main
from pretrain.hf.average import AverageError, average, last_checkpoints
from pretrain.hf.convert import from_hf_state_dict, model_config
from pretrain.hf.export import export
from pretrain.model.encoder import RobertaForMLM

from .conftest import make_documents, write_txt

SETTINGS = ["--corpus.valid_fraction=0.1", "--tokenizer.vocab_size=300", "--data.seq_len=32", "--data.num_proc=1", "--model.hidden_size=32", "--model.num_layers=2",
            "--model.num_heads=2", "--model.intermediate_size=64", "--trainer.accelerator=cpu"]


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[ExperimentConfig, dict, list[str]]:
    """A run_dir with a tokenizer and shards (what export checks the weights against), and their meta."""
    d = tmp_path_factory.mktemp("average")
    corpus = write_txt(d / "c.txt", make_documents(200, seed=5))
    args = [f"--run_dir={d / 'run'}", f"--corpus.train={corpus}", *SETTINGS]
    cfg = load_config(None, args)
    return cfg, read_meta(prepare_data(cfg, log=lambda *_: None)), args


def write_checkpoint(path: Path, cfg: ExperimentConfig, meta: dict, seed: int, step: int,
                     dtype: torch.dtype = torch.float32, **config_changes: dict) -> dict[str, torch.Tensor]:
    """A checkpoint as the trainer writes it, of a model initialised with `seed`; returns its weights."""
    torch.manual_seed(seed)
    weights = {k: v.to(dtype) for k, v in RobertaForMLM(model_config(cfg, meta)).state_dict().items()}
    config = cfg.to_dict()
    for section, changes in config_changes.items():
        config[section] = {**config[section], **changes} if isinstance(changes, dict) else changes
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {f"model.{k}": v for k, v in weights.items()}, "global_step": step,
                "hyper_parameters": {"config": config, "meta": meta}}, path)
    return weights


def test_the_mean_of_copies_of_one_checkpoint_is_that_checkpoint(run, tmp_path: Path) -> None:
    cfg, meta, _ = run
    for dtype in (torch.float32, torch.bfloat16):
        a = write_checkpoint(tmp_path / "a.ckpt", cfg, meta, seed=1, step=6, dtype=dtype)
        copies = [tmp_path / f"copy{i}.ckpt" for i in range(3)]
        for c in copies:
            shutil.copy(tmp_path / "a.ckpt", c)
        for members in (copies[:2], copies):  # 3 copies too: an fp32 running sum of three would round
            mean = average(members, log=lambda *_: None)
            assert mean.weights.keys() == a.keys()
            for k, v in a.items():
                assert mean.weights[k].dtype == dtype and torch.equal(mean.weights[k], v), k


def test_the_mean_of_two_checkpoints_is_their_exact_midpoint(run, tmp_path: Path) -> None:
    cfg, meta, _ = run
    a = write_checkpoint(tmp_path / "a.ckpt", cfg, meta, seed=1, step=3)
    b = write_checkpoint(tmp_path / "b.ckpt", cfg, meta, seed=2, step=6)
    mean = average([tmp_path / "a.ckpt", tmp_path / "b.ckpt"], log=lambda *_: None)
    for k in a:
        expected = ((a[k].double() + b[k].double()) / 2).float()  # exact in float64, rounded once
        assert torch.equal(mean.weights[k], expected), k
        assert torch.allclose(mean.weights[k], (a[k] + b[k]) / 2, atol=1e-7, rtol=0)
    assert mean.step == 6 and mean.members == [(str(tmp_path / "a.ckpt"), 3), (str(tmp_path / "b.ckpt"), 6)]


@pytest.mark.parametrize(("changes", "key"), [
    ({"run_dir": "elsewhere"}, "run_dir"),
    ({"model": {"hidden_size": 64}}, "model.hidden_size"),
    ({"meta": {"tokenizer_sha256": "0" * 64}}, "tokenizer_sha256"),
])
def test_checkpoints_of_other_runs_are_refused_with_one_line(run, tmp_path: Path, changes: dict, key: str) -> None:
    cfg, meta, _ = run
    write_checkpoint(tmp_path / "a.ckpt", cfg, meta, seed=1, step=3)
    other_meta = {**meta, **changes.pop("meta", {})}
    write_checkpoint(tmp_path / "b.ckpt", cfg, other_meta, seed=2, step=6, **changes)
    with pytest.raises(AverageError) as e:
        average([tmp_path / "a.ckpt", tmp_path / "b.ckpt"])
    message = str(e.value)
    assert "\n" not in message and f"{tmp_path / 'b.ckpt'} differs from {tmp_path / 'a.ckpt'} in {key} " in message
    assert "average checkpoints of one run" in message


def test_too_few_missing_or_unreadable_checkpoints_are_one_line(run, tmp_path: Path) -> None:
    cfg, meta, _ = run
    write_checkpoint(tmp_path / "a.ckpt", cfg, meta, seed=1, step=3)
    (tmp_path / "bad.ckpt").write_bytes(b"not a checkpoint")
    for members, match in (([tmp_path / "a.ckpt"], "at least two"), ([tmp_path / "a.ckpt", tmp_path / "no.ckpt"],
                           "does not exist"), ([tmp_path / "a.ckpt", tmp_path / "bad.ckpt"], "unreadable")):
        with pytest.raises(AverageError, match=match):
            average(members)
    d = tmp_path / "checkpoints"
    write_checkpoint(d / "step-0000003.ckpt", cfg, meta, seed=1, step=3)
    with pytest.raises(AverageError, match=r"checkpoint.average_last=2 but .* holds 1 checkpoint\(s\)"):
        last_checkpoints(d, 2)


def test_cli_average_exports_the_mean_with_parity_and_its_card_says_so(run, capsys: pytest.CaptureFixture) -> None:
    cfg, meta, args = run
    d = cfg.run_path / "checkpoints"
    ws = [write_checkpoint(d / f"step-{s:07d}.ckpt", cfg, meta, seed=s, step=s) for s in (2, 4, 6)]
    shutil.copy(d / "step-0000006.ckpt", d / "last.ckpt")  # the same step as step-0000006: counted once
    assert [p.name for p in last_checkpoints(d, 2)] == ["step-0000004.ckpt", "step-0000006.ckpt"]
    assert [p.name for p in last_checkpoints(d, 2, upto=d / "step-0000004.ckpt")] == ["step-0000002.ckpt",
                                                                                       "step-0000004.ckpt"]

    out = cfg.run_path / "mean"
    members = f"{d / 'step-0000004.ckpt'} {d / 'step-0000006.ckpt'}"
    assert main(["average", *args, "--ckpts", members, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "from the mean of 2 checkpoints (steps 4, 6)" in printed and "parity" in printed
    exported = from_hf_state_dict(load_file(out / "model.safetensors"), cfg.model.num_layers)
    for k, v in exported.items():
        assert torch.equal(v, ((ws[1][k].double() + ws[2][k].double()) / 2).float()), k
    card = (out / "README.md").read_text()
    assert "of 2 checkpoints of this run:" in card and "step-0000004.ckpt` (step 4)" in card
    assert "not measured for the averaged weights" in card

    # checkpoint.average_last at export: the run's last three distinct steps
    export(load_config(None, [*args, "--checkpoint.average_last=3"]), out=out, log=print)
    assert "from the mean of 3 checkpoints (steps 2, 4, 6)" in capsys.readouterr().out
    exported = from_hf_state_dict(load_file(out / "model.safetensors"), cfg.model.num_layers)
    k = "encoder.layers.0.ffn_in.weight"
    assert torch.equal(exported[k], (sum(w[k].double() for w in ws) / 3).float())

    # a bad member: one line, exit 2, the export left as it was
    before = (out / "model.safetensors").read_bytes()
    assert main(["average", *args, "--ckpts", f"{d / 'step-0000004.ckpt'} {d / 'nope.ckpt'}",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.ckpt does not exist" in err[0]
    assert (out / "model.safetensors").read_bytes() == before
