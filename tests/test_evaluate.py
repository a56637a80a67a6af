"""`make evaluate`: pseudo-perplexity against a direct unbatched computation, the fixed-mask loss (deterministic, the
same for a checkpoint and its export), bad inputs as one line, and the CLI end to end (table and plot written)."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep.config import ExperimentConfig, load_config
from data_prep.prepare import prepare_data
from pretrain.__main__ import main
from pretrain.evaluation.evaluate import EvaluateError, HeldOut, candidates
from pretrain.evaluation.pppl import pseudo_perplexity
from pretrain.hf.export import export
from pretrain.model.config import RobertaConfig
from pretrain.model.encoder import RobertaForMLM
from pretrain.training.train import fit

from .conftest import WORDS, make_documents, write_txt

SETTINGS = [
    "--corpus.valid_fraction=0.1", "--tokenizer.vocab_size=300", "--data.seq_len=32", "--data.num_proc=1",
    "--model.hidden_size=32", "--model.num_layers=2", "--model.num_heads=2", "--model.intermediate_size=64",
    "--optim.peak_lr=3e-3", "--optim.warmup_steps=2", "--batch.global_size=8", "--batch.micro_size=4",
    "--batch.num_workers=0", "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.max_steps=6",
    "--trainer.val_check_interval=3", "--trainer.limit_val_batches=2", "--checkpoint.every_n_steps=3",
    "--eval.heldout_blocks=24", "--eval.pppl_blocks=3",
]


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[ExperimentConfig, list[str]]:
    """A tiny run with checkpoints at steps 3 and 6, and the settings that describe it."""
    d = tmp_path_factory.mktemp("evaluate")
    corpus = write_txt(d / "c.txt", make_documents(300, seed=3))
    args = [f"--run_dir={d / 'run'}", f"--corpus.train={corpus}", *SETTINGS]
    cfg = load_config(None, args)
    fit(cfg, prepare_data(cfg, log=lambda *_: None), resume=False, enable_progress_bar=False,
        enable_model_summary=False)
    return cfg, args


def topic_task(directory: Path) -> Path:
    """A two-label task file whose label is readable from the words (disjoint halves of the vocabulary)."""
    rng = random.Random(0)
    halves = (WORDS[: len(WORDS) // 2], WORDS[len(WORDS) // 2:])
    for split, n in (("train", 40), ("valid", 20)):
        rows = [{"text": " ".join(rng.choice(halves[i % 2]) for _ in range(8)), "label": f"t{i % 2}"} for i in range(n)]
        (directory / f"topics-{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = directory / "topics.yaml"
    path.write_text(f"task:\n  name: topics\n  train: {directory / 'topics-train.jsonl'}\n"
                    f"  valid: {directory / 'topics-valid.jsonl'}\nfinetune:\n  max_length: 32\n")
    return path


def direct_pll(model: RobertaForMLM, block: torch.Tensor, specials: set[int], mask_id: int) -> tuple[float, int]:
    """Salazar et al.'s definition, one full forward per masked position, the logits read at that position."""
    total, n = 0.0, 0
    for t in range(len(block)):
        if int(block[t]) in specials:
            continue
        x = block.clone()
        x[t] = mask_id
        logp = torch.log_softmax(model(x[None])[0, t].double(), -1)
        total, n = total - float(logp[block[t]]), n + 1
    return total, n


@torch.no_grad()
def test_pseudo_perplexity_equals_one_forward_per_masked_token() -> None:
    torch.manual_seed(0)
    cfg = RobertaConfig(vocab_size=50, max_position_embeddings=40, hidden_size=32, num_layers=2, num_heads=2,
                        intermediate_size=64, dropout=0.1, attention_dropout=0.1)
    model = RobertaForMLM(cfg).eval()
    specials, mask_id = {0, 1, 2, 3, 49}, 49
    g = torch.Generator().manual_seed(1)
    # blocks of different lengths, with </s> inside (a document boundary) and at the end, as FULL-SENTENCES has
    blocks = []
    for length in (21, 12, 5):
        b = torch.randint(4, 49, (length,), generator=g)
        b[0], b[-1], b[length // 2] = 0, 2, 2
        blocks.append(b)
    total, count = 0.0, 0
    for b in blocks:
        nll, n = direct_pll(model, b, specials, mask_id)
        total, count = total + nll, count + n
    model.train()  # pseudo_perplexity scores in eval mode and puts the mode back
    # rows=4: chunks of 4 copies, the last one short, so the batching is exercised
    got = pseudo_perplexity(model, blocks, specials, mask_id, rows=4)
    assert model.training
    assert got["tokens"] == count == sum(len(b) - 3 for b in blocks)
    assert got["pll"] == pytest.approx(total / count, abs=1e-5)
    assert got["pppl"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_fixed_mask_loss_is_deterministic_and_the_same_for_a_checkpoint_and_its_export(trained, tmp_path) -> None:
    cfg, _ = trained
    ckpt = cfg.run_path / "checkpoints" / "step-0000006.ckpt"
    out = export(cfg, ckpt, tmp_path / "hf", log=lambda *_: None)
    meta_path = next((cfg.run_path / "data").glob("*/meta.json"))
    found = candidates([ckpt, out])
    assert [c.kind for c in found] == ["checkpoint", "export"]
    assert found[0].step == found[1].step == 6
    assert found[0].tokens == pytest.approx(found[1].tokens, abs=0.5)  # the card states it rounded
    scores = []
    for _ in range(2):  # a second sample, drawn again: the same blocks and masks
        held = HeldOut(meta_path, blocks=24, pppl_blocks=2, seed=7)
        for c in found:
            held.check(c)
        scores += [held.score(c.model()) for c in found]
    assert scores[0]["masked_tokens"] > 0 and scores[0]["pppl_tokens"] > 0
    assert all(s == scores[0] for s in scores)  # exact: the export holds the same fp32 weights
    other = HeldOut(meta_path, blocks=24, pppl_blocks=2, seed=8).score(found[0].model())
    assert other["mlm_loss"] != scores[0]["mlm_loss"]  # the seed decides the masks


def test_bad_inputs_are_one_line_before_work(trained, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg, args = trained
    ckpt = cfg.run_path / "checkpoints" / "step-0000003.ckpt"
    with pytest.raises(EvaluateError, match="does not exist"):
        candidates([ckpt, tmp_path / "nope.ckpt"])
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(EvaluateError, match="model_type 'bert' is another architecture"):
        candidates([tmp_path / "bert"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvaluateError, match="holds no checkpoints"):
        candidates([tmp_path / "empty"])
    # a checkpoint of another tokenizer than the held-out blocks: one line from the CLI, exit 2, no report
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    state["hyper_parameters"]["meta"]["tokenizer_sha256"] = "0" * 64
    torch.save(state, tmp_path / "other.ckpt")
    out = tmp_path / "report"
    assert main(["evaluate", *args, "--ckpts", f"{ckpt} {tmp_path / 'other.ckpt'}", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "other.ckpt" in err[0] and "another tokenizer" in err[0], err
    assert not out.exists()


def test_cli_end_to_end_writes_the_table_and_the_plot(trained, tmp_path: Path, capsys: pytest.CaptureFixture
                                                      ) -> None:
    cfg, args = trained
    checkpoints = cfg.run_path / "checkpoints"
    out = tmp_path / "report"
    task = topic_task(tmp_path)
    probes = [f"--eval.tasks=[{task}]", "--eval.max_train_examples=40", "--eval.max_valid_examples=20"]
    assert main(["evaluate", *args, *probes, "--ckpts", str(checkpoints), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "evaluate.json").read_text())
    # the directory stands for its checkpoints by step; last.ckpt (step 6, as step-0000006.ckpt) is left out
    assert [r["name"] for r in report["rows"]] == ["step-0000003.ckpt", "step-0000006.ckpt"]
    assert [r["step"] for r in report["rows"]] == [3, 6]
    first, second = report["rows"]
    assert 0 < first["tokens_seen"] < second["tokens_seen"] <= 6 * 8 * 32
    for r in report["rows"]:
        assert np.isfinite([r["mlm_loss"], r["pppl"], r["mlm_accuracy"]]).all() and r["pppl"] > 1
        assert 0 <= r["probe/topics/accuracy"] <= 1 and 0 <= r["probe/topics/macro_f1"] <= 1
    table = (out / "evaluate.md").read_text()
    assert "| `step-0000003.ckpt` | 3 |" in table and "pseudo-perplexity" in table and "probe/topics/accuracy" in table
    assert table[table.index("| checkpoint"):] in printed
    assert (out / "evaluate.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the default output: run_dir/evaluate; the same numbers from the same checkpoint
    assert main(["evaluate", *args, "--ckpts", str(checkpoints / "step-0000003.ckpt")]) == 0
    again = json.loads((cfg.run_path / "evaluate" / "evaluate.json").read_text())["rows"]
    assert again[0]["mlm_loss"] == first["mlm_loss"] and again[0]["pppl"] == first["pppl"]
    shutil.rmtree(cfg.run_path / "evaluate")


def test_a_sharded_checkpoint_scores_and_averages_as_its_file(trained, tmp_path: Path) -> None:
    import warnings

    from pretrain.hf.average import average
    from pretrain.training.sharding import ShardedStrategy

    cfg, _ = trained
    ckpt = cfg.run_path / "checkpoints" / "step-0000006.ckpt"
    sharded = tmp_path / "step-0000006.ckpt"  # what trainer.strategy: fsdp writes: a directory
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no process group: saving as one process"
        ShardedStrategy().save_checkpoint(torch.load(ckpt, map_location="cpu", weights_only=True), sharded)
    file, directory = candidates([ckpt, sharded])
    assert directory.kind == "sharded checkpoint" and (directory.step, directory.tokens) == (file.step, file.tokens)
    held = HeldOut(next((cfg.run_path / "data").glob("*/meta.json")), blocks=8, pppl_blocks=1, seed=3)
    assert held.score(directory.model()) == held.score(file.model())
    mean = average([sharded, ckpt], log=lambda *_: None)
    weights = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.equal(mean.weights[k.removeprefix("model.")], v) for k, v in weights.items())
