"""The project deletes or replaces only what it wrote (pretrain/hf/outputs.py): export's target and fine-tuning's
seed directories are replaced only when they carry the marker (or hold exactly what an older version wrote, or
are empty or missing); anything else, a symbolic link included, is one line and exit 2 before any work. A task's
name is a name, never a path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from data_prep.config import ConfigError, load_config
from data_prep.tokenizer import FILES
from pretrain.__main__ import main
from pretrain.evaluation.finetune import PARTIAL, SEED, check_outputs, load_task
from pretrain.hf.export import EXPORT
from pretrain.hf.outputs import MARKER, OutputDirError, check_name, is_ours, mark, replace

pytestmark = pytest.mark.timeout(60)


def export_files(d: Path, names=("config.json", "model.safetensors", "README.md", *FILES)) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for name in names:
        (d / name).write_text(name)
    return d


def tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def export_cli(tmp_path: Path, out: str, capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """`python -m pretrain export --out OUT` with a checkpoint that does not exist: only the target's check can
    answer before the checkpoint is looked at."""
    code = main(["export", "--out", out, "--ckpt", str(tmp_path / "missing.ckpt"), f"--run_dir={tmp_path / 'run'}"])
    return code, capsys.readouterr().err


def test_export_refuses_a_directory_it_did_not_write_before_any_work(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    mine = tmp_path / "mine"
    (mine / "sub").mkdir(parents=True)
    (mine / "thesis.tex").write_text("years of work")
    (mine / "sub" / "data.csv").write_text("1,2")
    before = tree(mine)
    code, err = export_cli(tmp_path, str(mine), capsys)
    assert code == 2
    assert err == (f"error: {mine} exists and is not an export (no {MARKER}): choose another --out or remove it "
                   "yourself\n")
    assert tree(mine) == before
    # an older export's files plus one of the user's: not only what export writes, so not replaced either
    old = export_files(tmp_path / "old")
    (old / "notes.txt").write_text("mine")
    assert export_cli(tmp_path, str(old), capsys)[0] == 2 and (old / "notes.txt").is_file()


def test_export_to_the_home_directory_deletes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture) -> None:
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_text("key")
    monkeypatch.setenv("HOME", str(home))
    for out in ("~", str(home), f"{home}/.ssh/..", "/"):
        code, err = export_cli(tmp_path, out, capsys)
        assert code == 2 and err.count("\n") == 1, (out, err)
        assert ("exists and is not an export" in err or "cannot be an export directory" in err), err
    assert (home / ".ssh" / "id_ed25519").read_text() == "key"


def test_a_symlink_as_out_is_never_followed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    target = export_files(tmp_path / "export")
    mark(target, "test")
    before = tree(target)
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    code, err = export_cli(tmp_path, str(link), capsys)
    assert code == 2
    assert err.startswith(f"error: {link} is a symbolic link, and is never followed") and err.count("\n") == 1
    assert tree(target) == before and link.is_symlink()
    # a file is no export either
    (tmp_path / "file").write_text("x")
    assert export_cli(tmp_path, str(tmp_path / "file"), capsys)[0] == 2 and (tmp_path / "file").read_text() == "x"


def test_what_counts_as_ours(tmp_path: Path) -> None:
    assert is_ours(tmp_path / "missing", EXPORT)
    (tmp_path / "empty").mkdir()
    assert is_ours(tmp_path / "empty", EXPORT)
    marked = tmp_path / "marked"
    marked.mkdir()
    (marked / "anything").write_text("x")
    mark(marked, "test")
    assert is_ours(marked, EXPORT)
    # written before markers: exactly an export's files (config.json and the weights among them)
    assert is_ours(export_files(tmp_path / "legacy"), EXPORT)
    assert is_ours(export_files(tmp_path / "legacy-no-card", ("config.json", "model.safetensors")), EXPORT)
    assert not is_ours(export_files(tmp_path / "no-weights", ("config.json", "README.md")), EXPORT)
    extra = export_files(tmp_path / "extra")
    (extra / "sub").mkdir()
    assert not is_ours(extra, EXPORT)
    linked = export_files(tmp_path / "linked", ("config.json",))
    (linked / "model.safetensors").symlink_to(tmp_path / "elsewhere")
    assert not is_ours(linked, EXPORT)
    # a marker that is a link (to a marker elsewhere) does not count
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "x").write_text("x")
    (fake / MARKER).symlink_to(marked / MARKER)
    assert not is_ours(fake, EXPORT)
    # fine-tuning's seed directories of older versions: the model, tokenizer, metrics.json and the CSV logs
    seed = export_files(tmp_path / "seed-0", ("config.json", "model.safetensors", "metrics.json",
                                              "tokenizer.json", "tokenizer_config.json"))
    export_files(seed / "logs", ("metrics.csv", "hparams.yaml"))
    assert is_ours(seed, SEED)
    (seed / "logs" / "mine.txt").write_text("x")
    assert not is_ours(seed, SEED)
    assert is_ours(export_files(tmp_path / "seed-1.partial" / "logs", ("metrics.csv",)).parent, PARTIAL)
    assert not is_ours(tmp_path / "seed-1.partial", SEED), "a finished seed has its model and metrics"


def test_replace_swaps_in_and_keeps_a_foreign_directory(tmp_path: Path) -> None:
    new = tmp_path / "new"
    new.mkdir()
    mark(new, "test")
    (new / "config.json").write_text("new")
    out = export_files(tmp_path / "out")  # an older export: replaced
    replace(new, out, EXPORT)
    assert (out / "config.json").read_text() == "new" and not new.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "the old one is removed"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep").write_text("x")
    new.mkdir()
    with pytest.raises(OutputDirError, match="exists and is not an export"):
        replace(new, foreign, EXPORT)
    assert (foreign / "keep").read_text() == "x" and new.is_dir()


@pytest.mark.parametrize("name", ["..", "../escape", "/etc", "a/b", ".", ".hidden", "x\\..\\y", "a b"])
def test_a_task_name_is_a_name_never_a_path(tmp_path: Path, name: str) -> None:
    task = tmp_path / "t.yaml"
    task.write_text(yaml.safe_dump({"task": {"name": name, "train": "a.jsonl", "valid": "b.jsonl"}}))
    with pytest.raises(ConfigError) as e:
        load_task(task)
    assert str(e.value).startswith(f"{task}: task.name={name!r} is not a name") and "\n" not in str(e.value)


def test_a_task_file_whose_name_is_not_a_name_needs_task_name(tmp_path: Path) -> None:
    task = tmp_path / ".yaml"  # the stem would be ".yaml": a hidden name
    task.write_text(yaml.safe_dump({"task": {"train": "a.jsonl", "valid": "b.jsonl"}}))
    with pytest.raises(ConfigError, match=r"task.name='.yaml' is not a name .*set task.name to one"):
        load_task(task)
    assert load_task(task, ["--task.name=ok"]).task.name == "ok"


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from("ab.-_/\\~ \x00"), max_size=8))
def test_an_accepted_name_is_one_directory_under_its_root(name: str) -> None:
    root = Path("/srv/run/finetune")
    if check_name(name, "task.name") is None:
        joined = Path(os.path.normpath(root / name))
        assert joined.parent == root and joined.name == name


def test_finetune_refuses_a_seed_directory_it_did_not_write_before_any_work(tmp_path: Path,
                                                                             capsys: pytest.CaptureFixture) -> None:
    task = tmp_path / "toy.yaml"
    task.write_text(yaml.safe_dump({"task": {"train": "a.jsonl", "valid": "b.jsonl"}, "finetune": {"seeds": 2}}))
    run = tmp_path / "run"
    seed1 = run / "finetune" / "toy" / "seed-1"
    seed1.mkdir(parents=True)
    (seed1 / "results-by-hand.txt").write_text("x")
    # no model and no data: the seed directory is what answers first
    code = main(["finetune", "--task", str(task), f"--run_dir={run}"])
    err = capsys.readouterr().err
    assert code == 2
    assert err == (f"error: {seed1} exists and is not a fine-tuning seed directory (no {MARKER}): choose another "
                   "task.name or remove it yourself\n")
    assert (seed1 / "results-by-hand.txt").is_file()
    # marked (or empty) it is fine-tuning's to replace
    mark(seed1, "test")
    check_outputs(load_config(None, [f"--run_dir={run}"]), load_task(task))


def test_training_with_export_hf_refuses_a_foreign_run_dir_hf(tmp_path: Path) -> None:
    from pretrain.hf.export import ExportError, HFExportCallback

    cfg = load_config(None, [f"--run_dir={tmp_path}", "--checkpoint.export_hf=true"])
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "weights-from-elsewhere.bin").write_text("x")
    with pytest.raises(ExportError, match=f"^{tmp_path / 'hf'} exists and is not an export"):
        HFExportCallback(cfg)  # built with the trainer, before the first step
    (tmp_path / "hf" / "weights-from-elsewhere.bin").unlink()
    HFExportCallback(cfg)
