"""The recipe ablation runner: variants at equal tokens on shared shards, one yardstick, a rerun that skips
finished variants, and a report whose significance and agreement columns follow the stated rule."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from data_prep.config import ConfigError
from pretrain.ablation import run as ablation
from pretrain.ablation.report import build_report, markdown, verdict
from pretrain.ablation.run import run_ablation, selected_variants
from pretrain.ablation.spec import load_ablation
from pretrain.evaluation.yardstick import Yardstick, load_model

from .conftest import make_documents, write_txt

BASE = {
    "seed": 0,
    "corpus": {"valid_fraction": 0.1},
    "tokenizer": {"vocab_size": 400},
    "data": {"seq_len": 32, "num_proc": 1},
    "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64},
    "optim": {"peak_lr": 3e-3, "warmup_steps": 2},
    "batch": {"global_size": 8, "micro_size": 2, "num_workers": 0},
    "trainer": {"max_steps": 8, "accelerator": "cpu", "devices": 1, "limit_val_batches": 1,
                "log_every_n_steps": 2},
    "checkpoint": {"keep_last": 3},
}
VARIANTS = [
    {"name": "roberta", "what": "the base", "changes": {}, "paper": "baseline"},
    {"name": "static-masking", "what": "static", "changes": {"masking.dynamic": False}, "paper": "similar"},
    {"name": "segment-pair-nsp", "what": "pairs", "changes": {"data.packing": "segment_pair"}, "paper": "worse"},
    {"name": "batch-small", "what": "batch 4", "changes": {"batch.global_size": 4, "batch.micro_size": 4},
     "paper": "worse"},
]


def write_ablation(d: Path, variants=VARIANTS, **settings) -> Path:
    corpus = write_txt(d / "corpus.txt", make_documents(200, seed=5))
    (d / "base.yaml").write_text(yaml.safe_dump(BASE))
    spec = {"base": str(d / "base.yaml"), "overrides": {"run_dir": str(d / "run"), "corpus.train": [str(corpus)]},
            "ablation": {"seeds": 1, "baseline": "roberta", "eval_blocks": 16, "evals": 2} | settings,
            "variants": variants}
    (d / "ablation.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return d / "ablation.yaml"


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    d = tmp_path_factory.mktemp("ablation")
    path = write_ablation(d)
    report = run_ablation(path, log=lambda *_: None, enable_progress_bar=False, enable_model_summary=False)
    return d, report


def test_every_variant_runs_at_equal_tokens_on_shared_shards(finished) -> None:
    d, report = finished
    rows = {r["variant"]: r for r in report["rows"]}
    assert list(rows) == [v["name"] for v in VARIANTS]
    budget = report["budget_tokens"]
    for r in rows.values():  # within one step's worth of tokens
        assert abs(r["tokens"] - budget) <= r["tokens"] / r["steps"] / 2 + 1, r
    assert rows["batch-small"]["steps"] == 2 * rows["roberta"]["steps"] == 16, "half the batch, twice the steps"
    # a format with other block lengths gets the batch (whole micro-batches of 2) that matches the base's tokens
    # per step, and then steps = budget / (that batch x the mean tokens per block of its own shards). Here the
    # pairs are the longer blocks: FULL-SENTENCES at 32 tokens leaves room unused when a sentence does not fit.
    metas = {json.loads(m.read_text())["packing"]: json.loads(m.read_text()) for m in (d / "run" / "data").glob("*/meta.json")}
    mean = {k: m["splits"]["train"]["num_tokens"] / m["splits"]["train"]["num_blocks"] for k, m in metas.items()}
    batch = round(8 * mean["full_sentences"] / mean["segment_pair"] / 2) * 2
    assert batch != 8 and rows["segment-pair-nsp"]["global_size"] == batch
    assert rows["segment-pair-nsp"]["steps"] == round(budget / (batch * mean["segment_pair"]))
    assert rows["roberta"]["global_size"] == rows["static-masking"]["global_size"] == 8
    assert rows["batch-small"]["global_size"] == 4
    # one tokenizer and one shard directory for all, reached through links
    root = d / "run"
    for name in rows:
        vdir = root / "ablation" / name / "seed-0"
        assert (vdir / "tokenizer").resolve() == (root / "tokenizer").resolve()
        assert (vdir / "data").resolve() == (root / "data").resolve()
    packings = {json.loads(m.read_text())["packing"] for m in (root / "data").glob("*/meta.json")}
    assert packings == {"full_sentences", "segment_pair"}


def test_the_yardstick_is_the_same_blocks_and_masks_for_every_variant(finished) -> None:
    d, report = finished
    root = d / "run"
    results = [json.loads(p.read_text()) for p in sorted((root / "ablation").glob("*/seed-0/result.json"))]
    assert len(results) == len(VARIANTS)
    assert len({r["heldout"]["tokens"] for r in results}) == 1 and results[0]["heldout"]["blocks"] == 16
    for r in results:  # the curves' x axis: training tokens at each checkpoint, not the scored count
        trained = [c["trained_tokens"] for c in r["curve"]]
        expected = [c["step"] * r["tokens"] / r["steps"] for c in r["curve"]]
        assert all(abs(t - e) <= 1 for t, e in zip(trained, expected, strict=True)), r["variant"]
        assert trained == sorted(set(trained)) and trained[-1] == r["tokens"], r["variant"]
    # rescoring a checkpoint reproduces the recorded number exactly: fixed blocks, fixed masks
    r = next(r for r in results if r["variant"] == "segment-pair-nsp")
    ref = next(m for m in (root / "data").glob("*/meta.json") if json.loads(m.read_text())["packing"] == "full_sentences")
    model, info = load_model(root / "ablation" / "segment-pair-nsp" / "seed-0" / "checkpoints" / "last.ckpt")
    assert model.nsp_head is not None and info["step"] == r["steps"]
    again = Yardstick(ref, blocks=16, seed=12345).score(model)
    assert again["loss"] == r["heldout"]["loss"]
    assert [c["step"] for c in r["curve"]][-1] == r["steps"] and len(r["curve"]) >= 2
    assert (root / "ablation" / "report.md").read_text() == markdown(report)
    assert (root / "ablation" / "report.png").stat().st_size > 1000


def test_a_rerun_skips_finished_variants(finished, monkeypatch: pytest.MonkeyPatch) -> None:
    d, report = finished

    def no_training(*args, **kwargs):
        raise AssertionError("a finished variant was trained again")

    monkeypatch.setattr("pretrain.training.train.fit", no_training)
    lines: list[str] = []
    again = run_ablation(d / "ablation.yaml", log=lines.append)
    assert again["rows"] == report["rows"]
    assert sum("finished earlier, skipped" in line for line in lines) == len(VARIANTS)


def _result(name: str, seed: int, loss: float) -> dict:
    return {"variant": name, "seed": seed, "steps": 10, "global_size": 8, "tokens": 1000, "wall_s": 1.0, "epochs": 0.5,
            "heldout": {"loss": loss, "tokens": 100}, "curve": [], "downstream": None}


def test_report_applies_the_significance_rule_to_recorded_metrics(tmp_path: Path) -> None:
    af, _ = load_ablation(write_ablation(tmp_path, seeds=3))
    losses = {"roberta": [5.00, 5.02, 4.98],          # std 0.02
              "static-masking": [5.01, 5.03, 5.00],   # +0.013 < spread: n.s., the paper says similar: agrees
              "segment-pair-nsp": [5.20, 5.22, 5.18],  # +0.20 > spread: worse, as the paper: agrees
              "batch-small": [4.90, 4.92, 4.88]}       # -0.10: better, the paper says worse: disagrees
    results = [_result(n, s, v) for n, vs in losses.items() for s, v in enumerate(vs)]
    rows = {r["variant"]: r for r in build_report(af, results, 1000)["rows"]}
    assert rows["roberta"]["loss_spread"] == pytest.approx(0.02)
    assert (rows["static-masking"]["significant"], rows["static-masking"]["agrees"]) == ("n.s.", "yes")
    assert (rows["segment-pair-nsp"]["significant"], rows["segment-pair-nsp"]["agrees"]) == ("yes", "yes")
    assert (rows["batch-small"]["significant"], rows["batch-small"]["agrees"]) == ("yes", "no")
    assert rows["segment-pair-nsp"]["delta"] == pytest.approx(0.2)
    assert rows["segment-pair-nsp"]["ppl"] == pytest.approx(math.exp(5.2))
    table = markdown(build_report(af, results, 1000))
    assert "| segment-pair-nsp | pairs |" in table and "| 5.2000 +- 0.0200 |" in table


def test_verdict_without_spread_uses_the_similar_threshold() -> None:
    assert verdict(0.01, None, "similar", 0.02) == ("< 0.02 (1 seed)", "yes")
    assert verdict(0.05, None, "worse", 0.02) == ("1 seed", "yes")
    assert verdict(-0.05, None, "worse", 0.02) == ("1 seed", "no")
    assert verdict(0.05, 0.1, "worse", 0.02) == ("n.s.", "no")


def test_bad_ablation_files_are_one_clear_line(tmp_path: Path) -> None:
    bad = [dict(VARIANTS[0]), {"name": "x", "changes": {"optim.nope": 1}}]
    with pytest.raises(ConfigError, match="variant x: unknown key optim.nope"):
        load_ablation(write_ablation(tmp_path, variants=bad))
    with pytest.raises(ConfigError, match="ablation.baseline='roberta' is not a variant"):
        load_ablation(write_ablation(tmp_path, variants=[{"name": "other", "changes": {}}]))
    with pytest.raises(ConfigError, match="names must be unique"):
        load_ablation(write_ablation(tmp_path, variants=[VARIANTS[0], VARIANTS[0]]))
    with pytest.raises(ConfigError, match="ablation.seeds"):
        load_ablation(write_ablation(tmp_path), ["--ablation.seeds=0"])
    with pytest.raises(ConfigError, match=r"^data.shards_url=s3://b/x: the ablation prepares its own shards"):
        run_ablation(write_ablation(tmp_path), ["--data.shards_url=s3://b/x"], log=lambda _: None)


def test_only_selects_variants_and_keeps_the_baseline(tmp_path: Path) -> None:
    path = write_ablation(tmp_path)
    af, _ = load_ablation(path, ["--ablation.only=[batch-small]"])
    assert [v.name for v in selected_variants(af)] == ["roberta", "batch-small"]
    af, _ = load_ablation(path)
    assert [v.name for v in selected_variants(af)] == [v["name"] for v in VARIANTS]
    af, _ = load_ablation(path, ["--ablation.only=[nope]"])
    with pytest.raises(ConfigError, match="ablation.only: no variant named nope"):
        selected_variants(af)


def test_shipped_ablation_files_parse(repo_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(repo_root)
    for path in sorted((repo_root / "configs").glob("ablation-*.yaml")):
        af, _ = load_ablation(path)
        assert af.ablation.baseline in [v.name for v in af.variants]
    assert ablation  # the module is importable without running anything


def test_a_run_of_other_settings_is_set_aside_not_resumed(tmp_path: Path) -> None:
    path = write_ablation(tmp_path, variants=VARIANTS[:1])
    quiet = {"log": lambda *_: None, "enable_progress_bar": False, "enable_model_summary": False}
    first = run_ablation(path, **quiet)
    assert first["rows"][0]["steps"] == 8
    lines: list[str] = []
    again = run_ablation(path, ["--trainer.max_steps=4"], **{**quiet, "log": lines.append})
    vdir = tmp_path / "run" / "ablation" / "roberta" / "seed-0"
    assert again["rows"][0]["steps"] == 4 and any("moved it to" in line for line in lines)
    # trained again from step 0, not "resumed" from the old run's step 8
    assert sorted(p.name for p in (vdir / "checkpoints").glob("step-*.ckpt")) == [
        "step-0000002.ckpt", "step-0000004.ckpt"]
    assert json.loads((vdir / "result.json").read_text())["curve"][-1]["step"] == 4
    assert json.loads((vdir / "stale-0" / "result.json").read_text())["steps"] == 8
