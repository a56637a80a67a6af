"""Downstream fine-tuning: a tiny pretrained export learns a learnable task, the saved classifier is a stock
`transformers` model that reproduces its reported accuracy, labels round-trip, metrics equal hand-computed values,
every shipped task YAML parses, and bad input is one clear line."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from data_prep.config import ConfigError, load_config
from data_prep.prepare import prepare_data
from pretrain.evaluation import metrics
from pretrain.evaluation.finetune import (
    FinetuneConfig,
    FinetuneError,
    build_model,
    finetune,
    label_set,
    load_task,
    read_examples,
    resolve_model,
)
from pretrain.training.train import fit

from .conftest import WORDS, make_documents, write_txt

transformers = pytest.importorskip("transformers")

PRETRAIN = [
    "--corpus.valid_fraction=0.1", "--tokenizer.vocab_size=600", "--data.seq_len=64", "--model.hidden_size=32",
    "--model.num_layers=2", "--model.num_heads=2", "--model.intermediate_size=64", "--optim.peak_lr=3e-3",
    "--optim.warmup_steps=2", "--batch.global_size=8", "--batch.micro_size=8", "--batch.num_workers=0",
    "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.max_steps=200", "--trainer.val_check_interval=200",
    "--trainer.limit_val_batches=1", "--checkpoint.every_n_steps=200", "--trainer.log_every_n_steps=5",
]
# each class has its own vocabulary; a sentence is mostly shared words plus a few of its class's. Two classes: with
# three, a 2-layer 32-wide encoder pretrained for 200 steps often settles for 2/3 (two classes merged) within the
# test's budget, while the same architecture from scratch separates them (seen with several seeds and rates).
CLASSES = {
    "water": "river ocean lake stream harbor rain".split(),
    "fruit": "apple banana cherry grape lemon mango".split(),
}
FINETUNE = ["--finetune.max_length=64", "--finetune.epochs=4", "--finetune.batch_size=16",
            "--finetune.peak_lr=3e-3", "--finetune.evals_per_epoch=1", "--finetune.accelerator=cpu"]


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def examples(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = list(CLASSES)[i % len(CLASSES)]
        words = [rng.choice(WORDS) for _ in range(rng.randint(2, 6))] + rng.sample(CLASSES[label], 3)
        rng.shuffle(words)
        out.append({"text": " ".join(words), "label": label})
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_task(path: Path, train: Path, valid: Path, **task) -> Path:
    data = {"task": {"train": str(train), "valid": str(valid), "metrics": ["accuracy", "macro_f1"]} | task,
            "finetune": {"seeds": 1}}
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("data")
    train, valid = examples(480, seed=1), examples(90, seed=2)
    docs = make_documents(150, seed=3) + [[r["text"] for r in train[i:i + 5]] for i in range(0, 480, 5)]
    return {"corpus": write_txt(d / "corpus.txt", docs), "train": write_jsonl(d / "train.jsonl", train),
            "valid": write_jsonl(d / "valid.jsonl", valid),
            "task": write_task(d / "toy.yaml", d / "train.jsonl", d / "valid.jsonl"), "dir": d}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, data) -> Path:
    """A tiny pretraining run with a checkpoint and no export yet: `finetune` exports it first."""
    run_dir = tmp_path_factory.mktemp("run")
    cfg = load_config(None, [f"--run_dir={run_dir}", f"--corpus.train={data['corpus']}", *PRETRAIN])
    fit(cfg, prepare_data(cfg, log=lambda *_: None), resume=False, enable_progress_bar=False,
        enable_model_summary=False)
    return run_dir


@pytest.fixture(scope="module")
def finetuned(run: Path, data) -> dict:
    from pretrain.__main__ import main

    assert not (run / "hf").exists()
    assert main(["finetune", "--task", str(data["task"]), f"--run_dir={run}", *FINETUNE,
                 "--finetune.seeds=2"]) == 0
    assert (run / "hf" / "config.json").is_file(), "exported from the checkpoint first"
    return json.loads((run / "finetune" / "toy" / "report.json").read_text())


def test_pretrained_export_fine_tunes_well_above_chance(finetuned: dict, run: Path) -> None:
    v = finetuned["variants"]["pretrained"]
    assert [s["seed"] for s in v["seeds"]] == [0, 1] and v["model"] == str(run / "hf")
    accuracy = v["summary"]["accuracy"]
    assert accuracy["min"] > 0.9, f"chance is 1/2; got {accuracy}"
    assert accuracy["median"] == pytest.approx(np.median([s["metrics"]["accuracy"] for s in v["seeds"]]))
    assert finetuned["labels"] == ["fruit", "water"] and finetuned["valid_examples"] == 90
    table = (run / "finetune" / "toy" / "report.md").read_text()
    assert f"| pretrained ({run / 'hf'}) | 2 | {100 * accuracy['median']:.2f} [" in table


def test_saved_classifier_loads_offline_and_reproduces_the_reported_accuracy(finetuned: dict, data) -> None:
    seed = finetuned["variants"]["pretrained"]["seeds"][0]
    model = transformers.AutoModelForSequenceClassification.from_pretrained(seed["dir"]).eval()
    tok = transformers.AutoTokenizer.from_pretrained(seed["dir"])
    assert type(model).__name__ == "RobertaForSequenceClassification"
    assert model.config.id2label == {0: "fruit", 1: "water"}, "string labels round-trip (sorted, not first-seen)"
    rows = [json.loads(line) for line in data["valid"].read_text().splitlines()]
    batch = tok([r["text"] for r in rows], truncation=True, max_length=seed["max_length"], padding=True,
                return_tensors="pt")
    with torch.no_grad():
        pred = model(**batch).logits.argmax(-1).tolist()
    accuracy = np.mean([model.config.id2label[p] == r["label"] for p, r in zip(pred, rows, strict=True)])
    assert accuracy == pytest.approx(seed["metrics"]["accuracy"], abs=1e-9)


def test_from_scratch_baseline_joins_the_report(finetuned: dict, run: Path, data) -> None:
    cfg = load_config(None, [f"--run_dir={run}"])
    tf = load_task(data["task"], [*FINETUNE, "--finetune.epochs=1", "--finetune.from_scratch=true"])
    lines: list[str] = []
    report = finetune(cfg, tf, log=lines.append)
    assert set(report["variants"]) == {"pretrained", "from_scratch"}
    assert report["variants"]["pretrained"] == finetuned["variants"]["pretrained"], "the other variant is kept"
    assert (run / "finetune" / "toy" / "scratch-seed-0" / "model.safetensors").is_file()
    assert "| from scratch (same architecture) | 1 |" in lines[-1] and "| pretraining bought (median) |" in lines[-1]

    # same config.json, every weight re-initialised
    names = ["fruit", "water"]
    pretrained, scratch = (build_model(run / "hf", tf.task, names, s) for s in (False, True))
    a, b = pretrained.config.to_dict(), scratch.config.to_dict()
    assert {k: v for k, v in a.items() if k != "dtype"} == {k: v for k, v in b.items() if k != "dtype"}
    emb = "roberta.embeddings.word_embeddings.weight"
    assert not torch.equal(pretrained.state_dict()[emb], scratch.state_dict()[emb])


def test_regression_task(finetuned: dict, run: Path, data) -> None:
    rng = random.Random(4)
    d = data["dir"]

    def rows(n: int) -> list[dict]:  # the score is the number of fruit words, 0..3
        out = []
        for _ in range(n):
            k = rng.randint(0, 3)
            words = [rng.choice(WORDS) for _ in range(6)] + rng.sample(CLASSES["fruit"], k)
            rng.shuffle(words)
            out.append({"sentence": " ".join(words), "score": k + 0.5 * rng.random()})
        return out

    task = write_task(d / "score.yaml", write_jsonl(d / "st.jsonl", rows(300)), write_jsonl(d / "sv.jsonl", rows(80)),
                      text_field="sentence", label_field="score", problem="regression",
                      metrics=["pearson", "spearman"])
    report = finetune(load_config(None, [f"--run_dir={run}"]), load_task(task, FINETUNE), log=lambda *_: None)
    summary = report["variants"]["pretrained"]["summary"]
    assert summary["pearson"]["median"] > 0.5 and summary["spearman"]["median"] > 0.5
    saved = json.loads((run / "finetune" / "score" / "seed-0" / "config.json").read_text())
    assert len(saved["id2label"]) == 1
    assert saved["problem_type"] == "regression"


def test_formats_pairs_and_integer_labels(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    labels = [2, 10, 1, 2, 10]
    pq.write_table(pa.table({"premise": ["a b", "c", "d", "e", "f"], "hypothesis": list("vwxyz"), "y": labels}),
                   tmp_path / "t.parquet")
    (tmp_path / "v.csv").write_text("premise,hypothesis,y\nq,r,1\ns,t,10\n")
    task = load_task(write_task(tmp_path / "t.yaml", tmp_path / "t.parquet", tmp_path / "v.csv",
                                text_field="premise", pair_field="hypothesis", label_field="y")).task
    train, valid = read_examples(task.train, task, "train"), read_examples(task.valid, task, "valid")
    assert train.pairs == list("vwxyz") and valid.texts == ["q", "s"] and valid.labels == ["1", "10"]
    assert label_set(task, train, valid) == ["1", "2", "10"], "integers sort numerically"


@pytest.mark.parametrize("pred, gold, expected", [
    # accuracy 4/6; F1 of class 1: tp 2, fp 1, fn 1 -> 2*2/(4+2) = 2/3
    ([1, 1, 0, 0, 1, 0], [1, 0, 0, 1, 1, 0], {"accuracy": 4 / 6, "f1": 2 / 3,
                                              # classes 0 and 1 both F1 2/3; MCC (tp*tn-fp*fn)/sqrt(...) = 3/9
                                              "macro_f1": 2 / 3, "matthews": (2 * 2 - 1 * 1) / 9}),
    # 3 classes: confusion rows gold [[2,0,0],[1,1,0],[0,1,1]] -> c=4, s=6, t=(2,2,2), p=(3,2,1)
    ([0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 2, 2], {"accuracy": 4 / 6,
                                              "macro_f1": (0.8 + 0.5 + 2 / 3) / 3,
                                              "matthews": (4 * 6 - 12) / np.sqrt((36 - 14) * (36 - 12))}),
    # the same with label ids 0, 1, 3: an absent class 2 does not enter the macro mean
    ([0, 0, 0, 1, 1, 3], [0, 0, 1, 1, 3, 3], {"macro_f1": (0.8 + 0.5 + 2 / 3) / 3}),
    # undefined Matthews (a constant side) is 0, as sklearn: torchmetrics alone gives -1 and 0.577 here
    ([0, 0, 0], [1, 1, 1], {"accuracy": 0.0, "f1": 0.0, "matthews": 0.0}),
    ([0, 0, 0, 1], [0, 0, 0, 0], {"accuracy": 3 / 4, "f1": 0.0, "macro_f1": (6 / 7 + 0) / 2, "matthews": 0.0}),
    ([0, 0], [0, 0], {"accuracy": 1.0, "f1": 0.0, "macro_f1": 1.0, "matthews": 0.0}),
])
def test_classification_metrics_equal_hand_computed_values(pred, gold, expected) -> None:
    got = metrics.compute(list(expected), np.array(pred), np.array(gold))
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, abs=1e-6), name  # torchmetrics counts in float32


def test_correlations_equal_hand_computed_values() -> None:
    x, y = np.array([1.0, 2.0, 3.0, 4.0]), np.array([2.0, 4.0, 5.0, 9.0])
    # deviations (-1.5,-.5,.5,1.5) and (-3,-1,0,4): sum of products 11; sums of squares 5 and 26
    assert metrics.pearson(x, y) == pytest.approx(11 / np.sqrt(5 * 26), abs=1e-12)
    assert metrics.spearman(x, y) == pytest.approx(1.0, abs=1e-6)
    # ties get mean ranks: (10, 20, 20, 30) -> (1, 2.5, 2.5, 4)
    assert metrics.spearman(np.array([1.0, 2, 3, 4]), np.array([10.0, 20, 20, 30])) == pytest.approx(
        metrics.pearson(np.array([1.0, 2, 3, 4]), np.array([1, 2.5, 2.5, 4])), abs=1e-6)
    assert metrics.pearson(np.ones(4), y) == 0.0, "a constant prediction earns nothing"
    assert metrics.spearman(y, np.full(4, 2.5)) == 0.0


def _closed_forms(pred: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    """The metrics as this project computed them by hand before torchmetrics (numpy, GLUE's definitions)."""
    def f1_of(c):
        tp, fp_fn = np.sum((pred == c) & (gold == c)), np.sum((pred == c) != (gold == c))
        return 2 * tp / (2 * tp + fp_fn) if tp + fp_fn else 0.0

    classes, inverse = np.unique(np.concatenate([gold, pred]), return_inverse=True)
    confusion = np.zeros((len(classes),) * 2)
    np.add.at(confusion, (inverse[: len(gold)], inverse[len(gold):]), 1.0)
    t, p, c, s = confusion.sum(1), confusion.sum(0), np.trace(confusion), confusion.sum()
    denominator = np.sqrt((s * s - p @ p) * (s * s - t @ t))
    return {"accuracy": float(np.mean(pred == gold)), "f1": f1_of(1),
            "macro_f1": float(np.mean([f1_of(c) for c in classes])),
            "matthews": float((c * s - t @ p) / denominator) if denominator else 0.0}


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x - x.mean(), y - y.mean()
    return float(x @ y / np.sqrt((x @ x) * (y @ y)))


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given the mean of the ranks they span (scipy.stats.rankdata)."""
    return np.array([np.sum(x < v) + (np.sum(x == v) + 1) / 2 for v in x])


@pytest.mark.parametrize("seed", range(5))
def test_metrics_equal_the_closed_forms_on_random_inputs(seed: int) -> None:
    g = np.random.default_rng(seed)
    for k in (2, 3, 5):
        pred, gold = g.integers(0, k, 200), g.integers(0, k, 200)
        pred[:120] = gold[:120]  # better than chance, so every metric is away from 0
        got = metrics.compute(list(metrics.CLASSIFICATION), pred, gold)
        for name, value in _closed_forms(pred, gold).items():
            assert got[name] == pytest.approx(value, abs=1e-6), (name, k)
    gold = g.normal(size=300).round(1)  # rounded: ties on both sides
    pred = (gold + g.normal(size=300)).round(1)
    assert metrics.pearson(pred, gold) == pytest.approx(_pearson(pred, gold), abs=1e-12)
    assert metrics.spearman(pred, gold) == pytest.approx(_pearson(_ranks(pred), _ranks(gold)), abs=1e-6)


def test_every_shipped_task_yaml_parses(repo_root: Path) -> None:
    tasks = {p.stem: load_task(p) for p in sorted((repo_root / "configs" / "tasks").glob("*.yaml"))}
    glue = {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte"}
    assert glue | {"kernel_topics"} <= set(tasks)
    assert tasks["mnli"].task.valid == "hf:glue/mnli:validation_matched"
    assert tasks["stsb"].task.problem == "regression" and tasks["stsb"].task.metrics[0] == "pearson"
    assert tasks["cola"].task.metrics[0] == "matthews" and tasks["mrpc"].task.metrics[0] == "f1"
    assert tasks["qqp"].task.metrics[0] == "f1" and tasks["kernel_topics"].task.metrics[0] == "accuracy"
    assert all(t.task.pair_field for n, t in tasks.items() if n in glue - {"cola", "sst2"})


def _bad_label(d: Path) -> list[str]:
    rows = [{"text": r["text"], "topic": r["label"]} for r in examples(6, 0)]
    return [f"--task.train={write_jsonl(d / 'nolabel.jsonl', rows)}"]


def _one_label(d: Path) -> list[str]:
    return [f"--task.train={write_jsonl(d / 'one.jsonl', [{'text': 'a b', 'label': 'x'}] * 6)}"]


def _not_roberta(d: Path) -> list[str]:
    (d / "bert").mkdir()
    (d / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    return [f"--finetune.model={d / 'bert'}"]


@pytest.mark.parametrize("make_args, problem", [
    (_bad_label, "task.label_field='label': {d}/nolabel.jsonl has no such field (its fields: text, topic)"),
    (_one_label, "task.train={d}/one.jsonl: field 'label' has one label only ('x'); classification needs at least two"),
    (lambda d: ["--task.text_field=body"], "task.text_field='body': {train} has no such field (its fields: text, label)"),
    (lambda d: ["--task.pair_field=hypothesis"], "task.pair_field='hypothesis': {train} has no such field"),
    (_not_roberta, "finetune.model={d}/bert: config.json has model_type 'bert', not 'roberta'"),
    (lambda d: ["--finetune.nope=1"], "unknown key finetune.nope"),
    (lambda d: ["--finetune.epochs=many"], "finetune.epochs: expected int, got 'many'"),
    (lambda d: [f"--run_dir={d / 'empty'}"], "{d}/empty/hf does not exist and {d}/empty/checkpoints has no checkpoint"),
])
def test_bad_input_is_one_clear_line(finetuned: dict, run: Path, data, tmp_path: Path, make_args, problem: str,
                                     capsys: pytest.CaptureFixture) -> None:
    from pretrain.__main__ import main

    args = make_args(tmp_path)
    code = main(["finetune", "--task", str(data["task"]), f"--run_dir={run}", *FINETUNE, *args])
    err = capsys.readouterr().err
    assert code == 2
    assert problem.format(d=tmp_path, train=data["train"]) in err and err.count("\n") == 1, err


def test_a_task_without_data_is_refused(tmp_path: Path) -> None:
    (tmp_path / "t.yaml").write_text("task: {valid: x.jsonl}\n")
    with pytest.raises(ConfigError, match=r"t.yaml: task.train is required"):
        load_task(tmp_path / "t.yaml")
    with pytest.raises(ConfigError, match=r"task.metrics=\['pearson'\]: classification metrics are accuracy"):
        load_task(write_task(tmp_path / "u.yaml", tmp_path / "a.jsonl", tmp_path / "b.jsonl", metrics=["pearson"]))
    with pytest.raises(FinetuneError, match=r"task.train=.*missing.jsonl: file does not exist"):
        read_examples(str(tmp_path / "missing.jsonl"), load_task(tmp_path / "u.yaml", ["--task.metrics=[f1]"]).task,
                      "train")


def test_datasets_source_uses_the_class_label_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """hf:NAME/CONFIG:SPLIT goes to datasets.load_dataset (stubbed: no hub here); ClassLabel ids become names."""
    import datasets

    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        features = datasets.Features({"sentence": datasets.Value("string"),
                                      "label": datasets.ClassLabel(names=["positive", "negative"])})
        labels = [-1, -1] if split == "test" else [1, 0, 1]
        return datasets.Dataset.from_dict({"sentence": ["good", "bad", "fine"][: len(labels)], "label": labels},
                                          features=features)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    task = load_task(write_task(tmp_path / "t.yaml", "hf:glue/sst2:train", "hf:glue/sst2",
                                text_field="sentence")).task
    train, valid = read_examples(task.train, task, "train"), read_examples(task.valid, task, "valid")
    assert calls == [("glue", "sst2", "train"), ("glue", "sst2", "validation")]
    assert train.labels == ["negative", "positive", "negative"] and train.texts == ["good", "bad", "fine"]
    assert label_set(task, train, valid) == ["positive", "negative"], "the dataset's order, not sorted"
    read_examples("hf:nyu-mll/glue/sst2:train", task, "train")
    assert calls[-1] == ("nyu-mll/glue", "sst2", "train")
    with pytest.raises(FinetuneError, match="hf:glue/sst2:test: example 1 has no label in field 'label'"):
        read_examples("hf:glue/sst2:test", task, "valid")
    with pytest.raises(FinetuneError, match=r"task.pair_field='hypothesis': hf:glue/sst2:train has no such field"):
        read_examples("hf:glue/sst2:train", load_task(tmp_path / "t.yaml", ["--task.pair_field=hypothesis"]).task,
                      "train")


def test_finished_seeds_are_reused_and_other_settings_train_again(finetuned: dict, run: Path, data,
                                                                   tmp_path: Path) -> None:
    cfg = load_config(None, [f"--run_dir={tmp_path / 'r'}"])
    common = [*FINETUNE, "--finetune.epochs=1", f"--finetune.model={run / 'hf'}"]
    first: list[str] = []
    one = finetune(cfg, load_task(data["task"], [*common, "--finetune.seeds=1"]), log=first.append)
    assert not any("reusing" in line for line in first)
    seed0 = one["variants"]["pretrained"]["seeds"][0]

    again: list[str] = []
    two = finetune(cfg, load_task(data["task"], [*common, "--finetune.seeds=2"]), log=again.append)
    assert any(line.startswith("seed 0: reusing the finished run") for line in again)
    assert not any(line.startswith("seed 1: reusing") for line in again)
    assert two["variants"]["pretrained"]["seeds"][0] == seed0 and len(two["variants"]["pretrained"]["seeds"]) == 2

    other: list[str] = []
    finetune(cfg, load_task(data["task"], [*common, "--finetune.seeds=1", "--finetune.peak_lr=1e-3"]),
             log=other.append)
    assert not any("reusing" in line for line in other), "another learning rate is another run"
    task_dir = tmp_path / "r" / "finetune" / "toy"
    assert sorted(p.name for p in task_dir.iterdir()) == ["report.json", "report.md", "seed-0", "seed-1"]
    assert json.loads((task_dir / "seed-0" / "metrics.json").read_text())["settings"]["finetune"]["peak_lr"] == 1e-3


def test_an_export_older_than_the_newest_checkpoint_is_named(finetuned: dict, run: Path) -> None:
    cfg = load_config(None, [f"--run_dir={run}"])
    lines: list[str] = []
    assert resolve_model(cfg, FinetuneConfig(), lines.append) == run / "hf" and lines == []
    newest = max((run / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    before = newest.stat()
    later = (run / "hf" / "model.safetensors").stat().st_mtime + 10
    os.utime(newest, (later, later))
    try:
        resolve_model(cfg, FinetuneConfig(), lines.append)
    finally:
        os.utime(newest, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert len(lines) == 1 and "is older than the newest checkpoint" in lines[0] and "make export" in lines[0]
