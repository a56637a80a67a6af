"""Time to loss: this project's recipe against Hugging Face's `run_mlm.py` recipe, for the same wall-clock budget.

    python bench/bench_quality.py                          # configs/cpu-30min.yaml (else tiny.yaml), 600 s a side
    python bench/bench_quality.py --config configs/tiny.yaml --budget 120 --parity-steps 100

Both sides train the same model size on the same packed blocks (this project's shards, in the order of its
sampler: the HF side reads them sequentially in that order) for `--budget` seconds of training time each, one
after the other, each in its own process:
- ours: the config's recipe through `pretrain.training.train.fit`, with `trainer.max_time` set to the budget (it times
  its first steps, then fixes max_steps so that its schedule ends at the budget);
- HF: `run_mlm.py`'s recipe, `transformers.Trainer` + `DataCollatorForLanguageModeling` (15%, 80/10/10) on a
  `RobertaForMaskedLM` (SDPA) of the same size, with RoBERTa's hyperparameters: AdamW betas (0.9, 0.98), eps 1e-6,
  the config's peak rate, warmup, weight decay and batch, linear warmup and decay, dropout 0.1, and the Trainer's
  default gradient clipping (max_grad_norm 1.0). So only what this project changes differs: its speed and the
  config's recipe changes (schedule, masking rate, dropout). Its linear schedule needs max_steps: a short
  calibration run (not counted) measures its step time, and max_steps = budget / step time.
Each side is also stopped at the budget by a callback, whatever its max_steps (ours then raises
`TrainingIncomplete`, recorded as `stopped`).

Training time runs from the start of the first step (model build, data prep, tokenizer and data-loader start-up
excluded) and stops while the weights are copied to host memory at `--points` evenly spaced times; the copies are
scored after training, so scoring takes no training time. Every copy (and the initial weights) is scored by a
stock `transformers.RobertaForMaskedLM` (ours converted with `pretrain.hf.convert.to_hf`) on the same held-out blocks with
the same masks (`pretrain.evaluation.yardstick.Yardstick`: the first `--eval-blocks` validation blocks, fixed masks):
cross-entropy summed over the masked tokens / their number, in nats. Headline: the time each side takes to reach
HF's final loss (linear between points), and the ratio HF / ours (target >= 3).

Parity row: both sides with that RoBERTa recipe, no clipping on
either side, `--parity-steps` steps each on the same blocks; the final held-out losses and their difference
(target: ours - HF <= 0.02 nats).

Writes bench/results/quality.json (every point), quality.md and quality.png (held-out loss against seconds).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

from common import (
    ROOT,
    SHARED_CORPUS,
    default_corpus,
    hf_mlm_model,
    hf_training_args,
    run_side,
    time_to_reach,
    write_results,
)

TINY = ROOT / "configs" / "tiny.yaml"
SHARED_VALID = SHARED_CORPUS.with_name("kernel_docs_valid.txt")
SIDES = ("ours", "hf", "ours-parity", "hf-parity")


def default_config() -> Path:
    """configs/cpu-30min.yaml when it exists, else configs/tiny.yaml."""
    path = ROOT / "configs" / "cpu-30min.yaml"
    return path if path.is_file() else TINY


# ---------------------------------------------------------------------------------------------------------------
# Configs: the experiment, ours' budget, RoBERTa's recipe


def experiment(args: argparse.Namespace):
    """The experiment of `--config` on the benchmark's corpus, writing under `--work`; no wandb, no export."""
    from data_prep.config import load_config

    valid = json.dumps([args.valid]) if args.valid else "[]"
    return load_config(args.config, [
        f"--run_dir={args.work}", f"--corpus.train={json.dumps([args.corpus])}", f"--corpus.valid={valid}",
        "--logger.wandb=null", "--checkpoint.export_hf=false",
    ])


def with_run_dir(cfg, run_dir: Path):
    from data_prep.config import config_from_dict

    return config_from_dict({**cfg.to_dict(), "run_dir": str(run_dir)})


def budgeted(cfg, budget_s: float):
    """Ours for a wall-clock budget: `trainer.max_time` calibrates and fixes max_steps itself (pretrain/training/budget.py).
    No validation and no probes: neither side evaluates while it trains (the scoring is done afterwards). A masking anneal that
    the config sized for its own max_time (masking.anneal_steps is in steps) is scaled to the budget, so the rate
    falls over the same share of the run."""
    from data_prep.config import config_from_dict, parse_duration

    d = cfg.to_dict()
    if cfg.trainer.max_time is not None and cfg.masking.anneal_steps:
        share = budget_s / parse_duration(cfg.trainer.max_time, "trainer.max_time")
        d["masking"]["anneal_steps"] = max(1, round(cfg.masking.anneal_steps * share))
    d["trainer"].update(max_time=budget_s, limit_val_batches=0)
    d["eval"]["tasks"] = []
    return config_from_dict(d)


def roberta_recipe(cfg, max_steps: int | None = None, grad_clip: float = 0.0):
    """`cfg` with RoBERTa's recipe: its peak rate, warmup, weight decay, AdamW betas/eps and batch, but a linear
    schedule, a constant 15% masking rate and dropout 0.1, `grad_clip`; `max_steps` fixed when given. Warmup is cut
    to half of a run shorter than it (development runs only), so the schedule still decays."""
    from data_prep.config import config_from_dict

    d = cfg.to_dict()
    d["optim"].update(schedule="linear", grad_clip=grad_clip)
    d["batch"].update(start_size=0, warmup_tokens=0)
    d["masking"].update(probability=0.15, start_probability=None, anneal_steps=0)
    d["model"].update(dropout=0.1, attention_dropout=0.1)
    d["trainer"].update(max_time=None, limit_val_batches=0)
    d["eval"]["tasks"] = []
    if max_steps is not None:
        d["trainer"]["max_steps"] = max_steps
        d["optim"]["warmup_steps"] = min(d["optim"]["warmup_steps"], max(1, max_steps // 2))
    return config_from_dict(d)


def on_cuda(cfg) -> bool:
    import torch

    return torch.cuda.is_available() and cfg.trainer.accelerator != "cpu"


# ---------------------------------------------------------------------------------------------------------------
# Measurement shared by both sides


class Clock:
    """Training time (wall time since the first step began, less the pauses for snapshots), and copies of the
    weights in host memory at `points` evenly spaced times of the budget (and at step 0 and the end)."""

    def __init__(self, budget_s: float, points: int, cuda: bool):
        self.budget_s, self.cuda = budget_s, cuda
        self.marks = [budget_s * k / points for k in range(1, points + 1)] if points and math.isfinite(budget_s) else []
        self.t0: float | None = None
        self.paused = 0.0
        self.last = (0, 0.0)  # (step, seconds) at the end of the newest step
        self.snapshots: list[dict[str, Any]] = []

    def now(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter() - self.t0 - self.paused

    def begin(self, model) -> None:
        """At the start of the first step: the initial weights, then the clock starts."""
        if self.t0 is None:
            self.snapshot(model, 0, 0.0)
            self.t0 = time.perf_counter()

    def after_step(self, model, step: int) -> bool:
        """At the end of an optimizer step: a snapshot when a mark has passed; True when the budget is spent."""
        t = self.now()
        self.last = (step, t)
        if self.marks and t >= self.marks[0]:
            while self.marks and t >= self.marks[0]:
                self.marks.pop(0)
            paused = time.perf_counter()
            self.snapshot(model, step, t)
            self.paused += time.perf_counter() - paused
        return t >= self.budget_s

    def finish(self, model) -> None:
        step, t = self.last
        if self.snapshots[-1]["step"] != step:
            self.snapshot(model, step, t)

    def snapshot(self, model, step: int, seconds: float) -> None:
        state = {k.removeprefix("_orig_mod."): v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        self.snapshots.append({"step": step, "seconds": seconds, "state": state})


def tokens_through(meta_path: Path, seed: int, global_size: int, steps: int) -> int:
    """Real tokens of the first `steps` optimizer steps: positions [0, steps x global_size) of the sampler's
    stream (pretrain/training/data.py), the same on both sides since HF reads the blocks in that order."""
    from data_prep.shards import open_split
    from pretrain.training.samplers import epoch_permutation

    lengths = open_split(meta_path, "train").block_lengths()
    n, left, total, epoch = len(lengths), steps * global_size, 0, 0
    while left > 0:
        take = min(left, n)
        total += int(lengths[epoch_permutation(seed, epoch, n)[:take]].sum())
        left, epoch = left - take, epoch + 1
    return total


def held_out_loss(hf_model, batches: list[dict], device: str) -> dict[str, float]:
    """A stock `RobertaForMaskedLM` on the yardstick's batches: its encoder on the whole input, its LM head on
    the masked positions; the cross-entropy summed over the masked tokens / their number (nats), and accuracy."""
    import torch
    import torch.nn.functional as F

    from pretrain.training.masking import IGNORE

    hf_model.to(device).eval()
    total, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for b in batches:
            hidden = hf_model.roberta(input_ids=b["input_ids"].to(device),
                                      attention_mask=b["attention_mask"].to(device)).last_hidden_state  # (B, T, C)
            real = b["masked_targets"] != IGNORE
            positions, targets = b["masked_positions"][real].to(device), b["masked_targets"][real].to(device)
            logits = hf_model.lm_head(hidden.flatten(0, 1)[positions]).float()  # (S, V)
            total += float(F.cross_entropy(logits, targets, reduction="sum"))
            correct += int((logits.argmax(-1) == targets).sum())
            count += int(targets.numel())
    return {"loss": total / count, "accuracy": correct / count, "masked_tokens": count}


def score(clock: Clock, build_hf, meta_path: Path, cfg, eval_blocks: int, cuda: bool) -> dict[str, Any]:
    """{points: every snapshot's held-out loss, eval_blocks}; `build_hf(state)` makes the stock HF model of a
    snapshot."""
    from pretrain.evaluation.yardstick import Yardstick

    batches = Yardstick(meta_path, blocks=eval_blocks).batches()
    points = []
    for snap in clock.snapshots:
        result = held_out_loss(build_hf(snap["state"]), batches, "cuda" if cuda else "cpu")
        points.append({"seconds": round(snap["seconds"], 3), "step": snap["step"],
                       "tokens": tokens_through(meta_path, cfg.seed, cfg.batch.global_size, snap["step"]),
                       "loss": round(result["loss"], 5), "accuracy": round(result["accuracy"], 5),
                       "masked_tokens": result["masked_tokens"]})
    return {"points": points, "eval_blocks": sum(int(b["input_ids"].shape[0]) for b in batches)}


# ---------------------------------------------------------------------------------------------------------------
# The sides, each run in its own process


def side_ours(args: argparse.Namespace, parity: bool) -> dict[str, Any]:
    import pytorch_lightning as pl

    from data_prep.prepare import prepare_data
    from data_prep.shards import read_meta
    from pretrain.hf.convert import model_config, to_hf
    from pretrain.model.encoder import RobertaForMLM
    from pretrain.training.train import TrainingIncomplete, fit

    cfg = experiment(args)
    meta_path = prepare_data(cfg, log=lambda _: None)
    cfg = with_run_dir(cfg, Path(args.work) / ("ours-parity" if parity else "ours"))
    cfg = roberta_recipe(cfg, args.parity_steps) if parity else budgeted(cfg, args.budget)
    cuda = on_cuda(cfg)
    clock = Clock(math.inf if parity else args.budget, 0 if parity else args.points, cuda)
    seen: dict[str, Any] = {}

    class Watch(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            seen["module"] = pl_module
            clock.begin(pl_module.model)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if (batch_idx + 1) % trainer.accumulate_grad_batches == 0 and clock.after_step(pl_module.model,
                                                                                           trainer.global_step):
                trainer.should_stop = True  # the safety net: max_time should have ended it already

    stopped = None
    try:
        fit(cfg, meta_path, resume=False, callbacks=[Watch()], enable_progress_bar=False, enable_checkpointing=False,
            logger=False, limit_val_batches=0)
    except TrainingIncomplete as e:
        stopped = str(e)
    module = seen["module"]
    clock.finish(module.model)
    meta = read_meta(meta_path)

    def build_hf(state):
        model = RobertaForMLM(model_config(cfg, meta))
        model.load_state_dict(state)
        return to_hf(model, meta["special_ids"])

    return {"max_steps": int(module.budget["max_steps"]) if getattr(module, "budget", None) else cfg.trainer.max_steps,
            "budget_decision": getattr(module, "budget", None), "stopped": stopped,
            "recipe": {**{k: cfg.to_dict()[k] for k in ("optim", "batch", "masking")}, "dropout": cfg.model.dropout,
                       "precision": cfg.trainer.precision, "compile": cfg.trainer.compile,
                       "anneal_steps": cfg.masking.anneal_steps},
            **score(clock, build_hf, meta_path, cfg, args.eval_blocks, cuda)}


def side_hf(args: argparse.Namespace, parity: bool) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer, DataCollatorForLanguageModeling, Trainer, TrainerCallback

    from data_prep.prepare import prepare_data
    from data_prep.shards import open_split, read_meta
    from data_prep.tokenizer import tokenizer_dir
    from pretrain.training.samplers import epoch_permutation

    cfg = experiment(args)
    meta_path = prepare_data(cfg, log=lambda _: None)
    meta = read_meta(meta_path)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir(cfg))
    cfg = roberta_recipe(cfg, args.parity_steps if parity else None)
    cuda = on_cuda(cfg)
    split, G = open_split(meta_path, "train"), cfg.batch.global_size

    class StepOrder(torch.utils.data.Dataset):
        """Item k: the block at position k of our sampler's stream (pretrain/training/data.py), read sequentially, so
        HF's optimizer step s trains on the blocks of our step s."""

        def __init__(self, steps: int):
            self.length, self.perm = (steps + 1) * G, (-1, None)

        def __len__(self) -> int:
            return self.length

        def __getitem__(self, k: int) -> dict[str, list[int]]:
            epoch, i = divmod(k, split.num_blocks)
            if self.perm[0] != epoch:
                self.perm = (epoch, epoch_permutation(cfg.seed, epoch, split.num_blocks))
            return {"input_ids": split.block(int(self.perm[1][i])).astype("int64").tolist()}

    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=cfg.masking.probability)
    clip = 0.0 if parity else 1.0  # Trainer's default max_grad_norm, as run_mlm.py leaves it

    def train(model, max_steps: int, callback) -> None:
        with tempfile.TemporaryDirectory() as out:
            targs = hf_training_args(cfg, out, max_steps, cuda, max_grad_norm=clip,
                                     train_sampling_strategy="sequential")
            Trainer(model=model, args=targs, train_dataset=StepOrder(max_steps), data_collator=collator,
                    processing_class=tokenizer, callbacks=[callback]).train()

    ids = meta["special_ids"]

    def new_model():
        return hf_mlm_model(cfg, meta, bos_token_id=ids["bos"], eos_token_id=ids["eos"])

    calibration = None
    if parity:
        max_steps = args.parity_steps
    else:
        # 1) calibration: a throwaway model's step time over the second half of a few steps (warm-up not timed)
        ends: list[float] = []

        class Lap(TrainerCallback):
            def on_step_end(self, *a, **k):
                ends.append(time.perf_counter())

        steps = cfg.trainer.calibration_steps
        train(new_model(), steps, Lap())
        half = len(ends) // 2  # all 19 timed steps gave 1.89 s/step, the run 1.56 (2026-12-03)
        step_s = (ends[-1] - ends[half]) / (len(ends) - 1 - half)
        # 2) the run: its linear schedule ends at the budget
        max_steps = max(1, int(args.budget / step_s))
        calibration = {"steps": steps, "step_time_s": round(step_s, 4), "max_steps": max_steps}
        print(f"hf: {step_s:.3f} s/step over the last {len(ends) - 1 - half} of {steps} calibration steps -> "
              f"max_steps {max_steps}", flush=True)
    clock = Clock(math.inf if parity else args.budget, 0 if parity else args.points, cuda)
    model = new_model()
    stopped: list[str] = []

    class Watch(TrainerCallback):
        def on_step_begin(self, targs, state, control, **kwargs):
            clock.begin(model)

        def on_step_end(self, targs, state, control, **kwargs):
            if clock.after_step(model, state.global_step) and state.global_step < state.max_steps:
                control.should_training_stop = True
                stopped.append(f"stopped at the budget at step {state.global_step} of max_steps {state.max_steps}")

    train(model, max_steps, Watch())
    clock.finish(model)

    def build_hf(state):
        m = new_model()
        m.load_state_dict(state)
        return m

    return {"max_steps": max_steps, "calibration": calibration, "stopped": stopped[0] if stopped else None,
            "recipe": {"optim": cfg.to_dict()["optim"], "batch": cfg.to_dict()["batch"], "max_grad_norm": clip,
                       "mlm_probability": cfg.masking.probability, "dropout": cfg.model.dropout,
                       "precision": cfg.trainer.precision},
            **score(clock, build_hf, meta_path, cfg, args.eval_blocks, cuda)}


# ---------------------------------------------------------------------------------------------------------------
# Report


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    end = result["points"][-1]
    return {"steps": end["step"], "tokens": end["tokens"], "seconds": end["seconds"], "final_loss": end["loss"]}


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for side, label in (("ours", "ours"), ("hf", "HF run_mlm.py")):
        points = report[side]["points"]
        ax.plot([p["seconds"] for p in points], [p["loss"] for p in points], marker="o", label=label)
    target = report["hf_final_loss"]
    ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"HF final loss {target:.3f}")
    later = [p["loss"] for side in ("ours", "hf") for p in report[side]["points"] if p["step"] > 0]
    if later:  # the initial loss (about ln V) would squash the curves
        ax.set_ylim(min(later) - 0.1, max(later) + 0.3)
    ax.set_xlabel("training seconds")
    ax.set_ylabel("held-out MLM loss (nats)")
    ax.set_title(f"{report['config']}: {report['budget_s']:.0f} s each, {report['machine']['cpus']} CPUs")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(report: dict[str, Any], dev_note: str) -> list[str]:
    def secs(t: float | None) -> str:
        return f"{t:.1f} s" if t is not None else "not reached"

    hf_recipe = report["hf"]["recipe"]
    lines = ([dev_note, ""] if dev_note else []) + [
        f"Time to loss, `{report['config']}` ({report['model']}), {report['budget_s']:.0f} s of training each, "
        f"one side after the other on {report['machine']['cpus']} CPUs; held-out loss of a stock "
        f"`RobertaForMaskedLM` on {report['eval']['blocks']} blocks of `{Path(report['valid'] or report['corpus']).name}`"
        f" ({report['eval']['masked_tokens']:,} masked tokens, the same masks for every point).", "",
        "| side | recipe | steps | tokens | training s | final held-out loss | time to HF's final loss | peak memory |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for side, recipe in (("ours", f"the config's ({report['ours']['recipe_note']})"),
                         ("hf", f"run_mlm.py, RoBERTa's (lr {hf_recipe['optim']['peak_lr']:g}, warmup "
                                f"{hf_recipe['optim']['warmup_steps']}, batch {hf_recipe['batch']['global_size']}, "
                                f"max_grad_norm {hf_recipe['max_grad_norm']:g})")):
        r, s = report[side], report[side]["summary"]
        lines.append(f"| {'ours' if side == 'ours' else 'HF'} | {recipe} | {s['steps']:,} | {s['tokens']:,} | "
                     f"{s['seconds']:.1f} | {s['final_loss']:.4f} | {secs(r['time_to_hf_final_s'])} | "
                     f"{r['peak_rss_mb']} MB |")
    ratio = report["speedup"]
    lines += ["", f"HF's time / ours' time to HF's final loss: **{f'{ratio:.2f}x' if ratio else 'not reached'}** "
              "(target >= 3x)."]
    for side in ("ours", "hf"):
        if report[side]["stopped"]:
            lines.append(f"{'Ours' if side == 'ours' else 'HF'}: {report[side]['stopped']}.")
    p = report.get("parity")
    if p:
        lines += ["", f"Equal-tokens parity: both sides RoBERTa's recipe (the config's optimiser and batch, linear, "
                  f"15% masking, dropout 0.1; warmup {p['warmup_steps']}), no clipping, {p['steps']} steps on the same blocks "
                  f"({p['tokens']:,} tokens).", "",
                  "| side | steps | training s | final held-out loss |", "|---|---|---|---|",
                  f"| ours | {p['ours']['steps']} | {p['ours']['seconds']:.1f} | {p['ours']['final_loss']:.4f} |",
                  f"| HF | {p['hf']['steps']} | {p['hf']['seconds']:.1f} | {p['hf']['final_loss']:.4f} |", "",
                  f"ours - HF: **{p['difference']:+.4f} nats** (target <= +0.02)."]
    lines += ["", "Points (seconds, step, loss) are in quality.json; the curves in quality.png."]
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(default_config()), help="ours' experiment (default: %(default)s)")
    p.add_argument("--corpus", default=str(SHARED_CORPUS), help="training text (the embedded corpus when absent)")
    p.add_argument("--valid", default=str(SHARED_VALID) if SHARED_VALID.is_file() else "",
                   help="held-out text (corpus.valid); empty: a seeded split of the corpus")
    p.add_argument("--budget", type=float, default=600.0, help="training seconds per side")
    p.add_argument("--points", type=int, default=16, help="evenly spaced scoring points per side (plus the end); "
                   "the time to a loss is linear between points, which overstates it on a convex curve: 16, not 8")
    p.add_argument("--parity-steps", type=int, default=300, help="steps of the equal-tokens row; 0: skip it")
    p.add_argument("--eval-blocks", type=int, default=512, help="held-out blocks scored at every point")
    p.add_argument("--work", default=str(ROOT / "runs" / "bench-quality"), help="tokenizer, shards, run logs")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--note", default="", help="a line put at the top of quality.md (e.g. a development run)")
    p.add_argument("--_side", choices=SIDES, help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    if args._side:
        side = side_ours if args._side.startswith("ours") else side_hf
        print(json.dumps(side(args, parity=args._side.endswith("parity"))), flush=True)
        return

    import torch

    from data_prep.prepare import prepare_data
    from data_prep.shards import read_meta

    args.corpus = default_corpus(args.corpus)
    cfg = experiment(args)
    meta = read_meta(prepare_data(cfg))  # the tokenizer and shards, once, before any clock
    argv = [f"--config={args.config}", f"--corpus={args.corpus}", f"--valid={args.valid}", f"--budget={args.budget}",
            f"--points={args.points}", f"--parity-steps={args.parity_steps}", f"--eval-blocks={args.eval_blocks}",
            f"--work={args.work}"]
    results = {}
    for side in ("ours", "hf"):
        print(f"--- {side}: {args.budget:.0f} s", flush=True)
        results[side] = run_side(__file__, side, argv)
    m = cfg.model
    report: dict[str, Any] = {
        "config": os.path.relpath(args.config, ROOT), "corpus": args.corpus, "valid": args.valid,
        "budget_s": args.budget, "model": f"{m.num_layers}x{m.hidden_size}, ffn {m.intermediate_size}, vocab "
        f"{meta['vocab_size']}, seq {meta['seq_len']}",
        "machine": {"cpus": os.cpu_count(), "threads": torch.get_num_threads(), "platform": platform.platform(),
                    "cuda": torch.cuda.get_device_name() if on_cuda(cfg) else None},
        "eval": {"blocks": results["ours"]["eval_blocks"], "masked_tokens": results["ours"]["points"][0]["masked_tokens"]},
    }
    target = results["hf"]["points"][-1]["loss"]
    report["hf_final_loss"] = target
    for side in ("ours", "hf"):
        r = results[side]
        r["summary"] = summarise(r)
        r["time_to_hf_final_s"] = time_to_reach([(q["seconds"], q["loss"]) for q in r["points"]], target)
        report[side] = r
    o = results["ours"]["recipe"]["optim"]
    r = results["ours"]["recipe"]
    masking = (f"masking {r['masking']['start_probability']:g} -> {r['masking']['probability']:g} over "
               f"{r['anneal_steps']} steps" if r["masking"]["start_probability"] is not None
               else f"masking {r['masking']['probability']:g}")
    report["ours"]["recipe_note"] = (f"{o.get('schedule', 'linear')}, lr {o['peak_lr']:g}, warmup {o['warmup_steps']}, "
                                     f"batch {r['batch']['global_size']}, clip {o['grad_clip']:g}, {masking}, "
                                     f"dropout {r['dropout']:g}, max_time")
    ours_t, hf_t = report["ours"]["time_to_hf_final_s"], report["hf"]["time_to_hf_final_s"]
    report["speedup"] = round(hf_t / ours_t, 3) if ours_t and hf_t else None
    report["target_speedup"] = 3.0
    if args.parity_steps:
        parity = {}
        for side in ("ours", "hf"):
            print(f"--- {side} parity: {args.parity_steps} steps", flush=True)
            parity[side] = run_side(__file__, f"{side}-parity", argv)
        report["parity"] = {
            "steps": args.parity_steps, "tokens": parity["ours"]["points"][-1]["tokens"],
            "warmup_steps": parity["hf"]["recipe"]["optim"]["warmup_steps"],
            "ours": {**summarise(parity["ours"]), "stopped": parity["ours"]["stopped"],
                     "peak_rss_mb": parity["ours"]["peak_rss_mb"], "points": parity["ours"]["points"]},
            "hf": {**summarise(parity["hf"]), "peak_rss_mb": parity["hf"]["peak_rss_mb"],
                   "points": parity["hf"]["points"]},
        }
        report["parity"]["difference"] = round(report["parity"]["ours"]["final_loss"]
                                               - report["parity"]["hf"]["final_loss"], 5)
        report["parity"]["target_difference"] = 0.02
    lines = markdown(report, args.note)
    print("\n".join(lines))
    write_results(args.out, "quality", report, lines)
    plot(report, Path(args.out) / "quality.png")
    print(f"wrote {Path(args.out) / 'quality.png'}")


if __name__ == "__main__":
    main()
