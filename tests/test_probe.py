"""Linear probes (pretrain/evaluation/probe.py) and probes while training (pretrain/training/probing.py): exact
numbers for tasks whose answer is known, deterministic, resume-safe, and training unchanged by them."""

from __future__ import annotations

import csv
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep.config import ConfigError, load_config
from data_prep.prepare import prepare_data
from pretrain.evaluation.probe import embed, load_probe_tasks, probe, probe_scores, read_probe_tasks
from pretrain.model.config import RobertaConfig
from pretrain.model.encoder import RobertaForMLM
from pretrain.training.train import fit

from .conftest import WORDS, make_documents, write_txt

FAST = [
    "--tokenizer.vocab_size=300", "--data.seq_len=32", "--model.hidden_size=32", "--model.num_layers=2",
    "--model.num_heads=2", "--model.intermediate_size=64", "--optim.peak_lr=3e-3", "--optim.warmup_steps=4",
    "--batch.global_size=8", "--batch.micro_size=4", "--batch.num_workers=0", "--trainer.accelerator=cpu",
    "--trainer.devices=1", "--trainer.max_steps=12", "--trainer.val_check_interval=100",
    "--trainer.log_every_n_steps=1", "--checkpoint.every_n_steps=100", "--checkpoint.keep_last=1",
    "--model.dropout=0.1",  # dropout on: a probe that disturbed the RNG or the train mode would show
]
QUIET = {"enable_progress_bar": False, "enable_model_summary": False}


def write_task(directory: Path, name: str, train: list[dict], valid: list[dict], **task: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", train), ("valid", valid)):
        (directory / f"{name}-{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fields = {"train": str(directory / f"{name}-train.jsonl"), "valid": str(directory / f"{name}-valid.jsonl"), **task}
    body = "".join(f"  {k}: {v}\n" for k, v in fields.items())
    path = directory / f"{name}.yaml"
    path.write_text(f"task:\n  name: {name}\n{body}finetune:\n  max_length: 32\n")
    return path


def topic_rows(n: int, seed: int) -> list[dict]:
    """Two topics with disjoint halves of the vocabulary: the label is readable from any text."""
    rng = random.Random(seed)
    half = len(WORDS) // 2
    rows = []
    for i in range(n):
        label = i % 2
        words = WORDS[:half] if label == 0 else WORDS[half:]
        rows.append({"text": " ".join(rng.choice(words) for _ in range(rng.randint(3, 12))), "label": f"t{label}"})
    return rows


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, Path]:
    """(prep run_dir with its tokenizer, meta.json, a two-topic task file, the corpus) built once."""
    root = tmp_path_factory.mktemp("probe")
    corpus = write_txt(root / "c.txt", make_documents(300, seed=5))
    run = root / "prep"
    meta = prepare_data(config(run, corpus), log=lambda *_: None)
    task = write_task(root / "tasks", "topics", topic_rows(40, 0), topic_rows(20, 1))
    return run, meta, task, corpus


def config(run_dir: Path, corpus: Path | None = None, *extra: str):
    corpus_args = [f"--corpus.train={corpus}"] if corpus else []
    return load_config(None, [f"--run_dir={run_dir}", *corpus_args, "--corpus.valid_fraction=0.1", *FAST, *extra])


def run_cfg(prepared, run_dir: Path, *extra: str):
    """A run over the prepared shards, with the prep's tokenizer in its run_dir (where `make pretrain` has it)."""
    prep, _, _, corpus = prepared
    if not (run_dir / "tokenizer").exists():
        shutil.copytree(prep / "tokenizer", run_dir / "tokenizer")
    return config(run_dir, corpus, *extra)


def probe_rows(run_dir: Path) -> dict[int, dict[str, str]]:
    with open(run_dir / "logs" / "metrics.csv") as f:
        return {int(r["step"]): {k: v for k, v in r.items() if k.startswith("probe/") and k != "probe/seconds"}
                for r in csv.DictReader(f) if r.get("probe/topics/accuracy")}


def weights(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.lightning_module.model.state_dict().items()}


def test_probes_change_no_bit_of_training_and_resume_gives_the_same_probes(prepared, tmp_path: Path) -> None:
    _, meta, task, _ = prepared
    probes = [f"--eval.tasks=[{task}]", "--eval.every_n_steps=4"]
    with_probes = fit(run_cfg(prepared, tmp_path / "with", *probes), meta, resume=False, **QUIET)
    without = fit(run_cfg(prepared, tmp_path / "without"), meta, resume=False, **QUIET)
    expected = weights(with_probes)
    for name, tensor in weights(without).items():
        assert torch.equal(expected[name], tensor), f"{name} differs when probing"
    rows = probe_rows(tmp_path / "with")
    assert sorted(rows) == [0, 4, 8, 12]  # step 0 (the baseline), every 4, the last
    assert rows[12]["probe/tokens"] == str(float(12 * 8 * 32))  # steps x global batch x seq_len
    assert all(0.0 <= float(r["probe/topics/accuracy"]) <= 1.0 for r in rows.values())

    # stopped at 6 (not a probe step: its final-step probe is dropped by the resume), then at 8
    # (a probe step, whose row the resumed run logs again at its start), then to the end
    run = tmp_path / "stopped"
    fit(run_cfg(prepared, run, *probes), meta, resume=False, max_steps=6, **QUIET)
    assert sorted(probe_rows(run)) == [0, 4, 6]
    fit(run_cfg(prepared, run, *probes), meta, resume=True, max_steps=8, **QUIET)
    resumed = fit(run_cfg(prepared, run, *probes), meta, resume=True, **QUIET)
    assert probe_rows(run) == rows  # the same steps, the same numbers (the CSV's own text)
    for name, tensor in weights(resumed).items():
        assert torch.equal(expected[name], tensor), f"{name} differs after the resumed run"


def tiny_model(seed: int = 0) -> RobertaForMLM:
    torch.manual_seed(seed)
    return RobertaForMLM(RobertaConfig(vocab_size=300, max_position_embeddings=34, hidden_size=32, num_layers=2,
                                       num_heads=2, intermediate_size=64))


def test_probe_numbers_are_deterministic_and_leave_the_model_as_it_was(prepared) -> None:
    prep, _, task, _ = prepared
    cfg = config(prep, None, f"--eval.tasks=[{task}]").eval
    tasks = load_probe_tasks(cfg, prep / "tokenizer", 32)
    assert len(tasks[0].train_ids) == 40 and tasks[0].labels == ["t0", "t1"]
    model = tiny_model().train()
    model.encoder.layers[0].eval()  # a mixed state, put back as it was
    state = torch.get_rng_state()
    first = probe(model, tasks)
    assert model.training and not model.encoder.layers[0].training and model.encoder.layers[1].training
    assert torch.equal(torch.get_rng_state(), state)
    assert probe(model, tasks) == first
    assert set(first) == {"probe/topics/accuracy", "probe/topics/macro_f1"}
    # one text per class: two distinct feature points, which a logistic regression always puts on their sides
    # (from zero weights, the direction between them lowers the cross-entropy at first order and the L2 term only
    # at second), so every validation text is right, whatever the (random) encoder
    two = [{"text": "kernel driver module.", "label": "a"}, {"text": "network packet socket.", "label": "b"}]
    twotexts = write_task(task.parent, "two", two * 10, two[::-1] * 5)
    cfg = config(prep, None, f"--eval.tasks=[{twotexts}]").eval
    assert probe(model, load_probe_tasks(cfg, prep / "tokenizer", 32)) == {"probe/two/accuracy": 1.0,
                                                                           "probe/two/macro_f1": 1.0}


def test_subsets_are_capped_and_seeded(prepared) -> None:
    prep, _, task, _ = prepared
    caps = ["--eval.max_train_examples=10", "--eval.max_valid_examples=5"]
    a = read_probe_tasks(config(prep, None, f"--eval.tasks=[{task}]", *caps).eval)[0]
    b = read_probe_tasks(config(prep, None, f"--eval.tasks=[{task}]", *caps).eval)[0]
    c = read_probe_tasks(config(prep, None, f"--eval.tasks=[{task}]", *caps, "--eval.seed=1").eval)[0]
    assert len(a.train[0]) == 10 and len(a.valid[0]) == 5
    assert a.train == b.train and list(a.train_y) == list(b.train_y)
    assert a.train != c.train


def test_embed_rows_are_each_texts_own_features_in_any_batching_and_rank_split() -> None:
    model = tiny_model().eval()
    rng = np.random.default_rng(0)
    ids = [[0, *rng.integers(4, 299, int(rng.integers(1, 30))).tolist(), 2] for _ in range(23)]
    mean, cls = embed(model, ids, batch_tokens=64)
    for i in (0, 7, 22):
        with torch.no_grad():
            h = model.encode(torch.tensor([ids[i]]))[0]  # (T, C), alone: no padding
        torch.testing.assert_close(mean[i], h.mean(0), rtol=0, atol=1e-6)
        torch.testing.assert_close(cls[i], h[0], rtol=0, atol=1e-6)
    # three ranks: each embeds its share, all_gather brings them together (here the shares computed beforehand)
    shares = {}
    for r in range(3):
        def keep(t: torch.Tensor, r: int = r) -> torch.Tensor:
            shares[r] = t
            return torch.stack([t] * 3)
        embed(model, ids, batch_tokens=64, rank=r, world_size=3, all_gather=keep)
    gathered = torch.stack([shares[r] for r in range(3)])
    mean3, cls3 = embed(model, ids, batch_tokens=64, rank=1, world_size=3, all_gather=lambda t: gathered)
    torch.testing.assert_close(mean3, mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(cls3, cls, rtol=0, atol=1e-6)


def test_separable_features_score_one_and_shuffled_labels_score_chance() -> None:
    g = torch.Generator().manual_seed(0)
    # two classes 10 standard deviations apart along one axis of 16: P(a validation point across the midpoint) =
    # Phi(-5) ~ 3e-7 each, so all 400 fall on their side (and the fixed seed makes it a fact, not a chance)
    y_train, y_valid = np.arange(200) % 2, np.arange(400) % 2
    x_train, x_valid = torch.randn(200, 16, generator=g), torch.randn(400, 16, generator=g)
    x_train[:, 0] += torch.from_numpy(y_train * 10.0 - 5.0).float()
    x_valid[:, 0] += torch.from_numpy(y_valid * 10.0 - 5.0).float()
    assert probe_scores(x_train, y_train, x_valid, y_valid, 2) == {"accuracy": 1.0, "macro_f1": 1.0}
    # labels independent of the features, 4 balanced classes: validation accuracy is Binomial(2000, 1/4) / 2000,
    # mean 0.25, sd 0.0097; 0.04 is four sd
    y_train, y_valid = np.arange(400) % 4, np.arange(2000) % 4
    x_train, x_valid = torch.randn(400, 16, generator=g), torch.randn(2000, 16, generator=g)
    shuffled = probe_scores(x_train, np.random.default_rng(0).permutation(y_train), x_valid, y_valid, 4)
    assert abs(shuffled["accuracy"] - 0.25) < 0.04
    # the same separable data with its train labels shuffled: nothing to learn, chance again (400 valid, 2
    # classes: sd 0.025)
    x_train, x_valid = torch.randn(200, 16, generator=g), torch.randn(400, 16, generator=g)
    labels = np.arange(200) % 2
    x_train[:, 0] += torch.from_numpy(labels * 10.0 - 5.0).float()
    x_valid[:, 0] += torch.from_numpy(np.arange(400) % 2 * 10.0 - 5.0).float()
    shuffled = probe_scores(x_train, np.random.default_rng(1).permutation(labels), x_valid, np.arange(400) % 2, 2)
    assert abs(shuffled["accuracy"] - 0.5) < 0.1


def test_bad_eval_tasks_are_one_line_before_any_work(prepared, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    prep, meta, task, _ = prepared
    notask = tmp_path / "notask.yaml"
    notask.write_text("finetune:\n  epochs: 1\n")
    cases = {tmp_path / "nope.yaml": r"eval.tasks\[0\]=.*nope.yaml: no such file; name a task file",
             notask: r"eval.tasks\[0\]=.*notask.yaml: no task: section"}
    for path, message in cases.items():  # when the config is read: before any data preparation
        with pytest.raises(ConfigError, match=message) as e:
            load_config(None, [f"--run_dir={tmp_path / 'run'}", f"--eval.tasks=[{path}]"])
        assert "\n" not in str(e.value)
    # the task's data: when training starts, before anything is written
    gone = write_task(tmp_path / "m", "gone", [], [])
    (tmp_path / "m" / "gone-train.jsonl").unlink()
    with pytest.raises(ConfigError, match=r"eval.tasks\[0\]=.*gone.yaml: task.train=.*gone-train.jsonl: file does "
                                          "not exist") as e:
        fit(run_cfg(prepared, tmp_path / "run", f"--eval.tasks=[{gone}]"), meta, resume=False, **QUIET)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run" / "logs").exists()  # nothing was written
    regression = write_task(tmp_path / "r", "sts", [{"text": "a", "label": 0.5}], [{"text": "b", "label": 1.0}],
                            problem="regression", metrics="[pearson]")
    with pytest.raises(ConfigError, match=r"eval.tasks\[0\]=.*sts.yaml: task.problem is regression: a probe is a "):
        read_probe_tasks(config(prep, None, f"--eval.tasks=[{regression}]").eval)
    hub = write_task(tmp_path / "h", "hub", [], [])
    hub.write_text(hub.read_text().replace(f"train: {tmp_path / 'h' / 'hub-train.jsonl'}", "train: hf:glue/sst2"))

    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'glue' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ConfigError, match=r"eval.tasks\[0\]=.*hub.yaml: task.train=hf:glue/sst2: cannot load "
                                          r"dataset 'glue'") as e:
        read_probe_tasks(config(prep, None, f"--eval.tasks=[{hub}]").eval)
    assert "\n" not in str(e.value)


def test_loss_plot_gets_a_probe_panel_when_the_run_probed(tmp_path: Path) -> None:
    import struct

    from pretrain.training.train import plot_losses

    rows = ["step,train/loss,probe/tokens,probe/t/accuracy,probe/t/macro_f1", "0,,0.0,0.5,0.4", "1,7.0,,,",
            "2,6.5,,,", "2,,512.0,0.75,0.7"]
    (tmp_path / "with.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "without.csv").write_text("\n".join(rows[:1] + rows[2:4]) + "\n")

    def width(png: Path) -> int:
        return struct.unpack(">I", png.read_bytes()[16:20])[0]  # the IHDR chunk's width

    assert width(plot_losses(tmp_path / "with.csv", tmp_path / "with.png")) == 1200  # two panels, 12 x 4 in
    assert width(plot_losses(tmp_path / "without.csv", tmp_path / "without.png")) == 700  # the loss alone
