"""The cost of linear probes while training (`eval.tasks`, pretrain/training/probing.py) as a share of a run.

    python bench/bench_probe.py                        # configs/cpu-30min.yaml with its eval section
    python bench/bench_probe.py --steps 40 --every 10 --run-steps 1656

One process trains the config (its model, batch, data and precision) for `--steps` optimizer steps with probes
every `--every` steps, so that step times and probe times interleave over the same minutes of a shared machine
(a load that drifts slows both alike). Step time: the median interval between consecutive step ends, leaving out
the intervals that hold a probe; probe time: the median of the probes' own wall time (`probe/seconds`). The share
of a run of `--run-steps` steps (default 1,656: what configs/cpu-30min.yaml's 30-minute budget decided on 2 quiet
cores) at the config's eval.every_n_steps: probes at step 0, every every_n_steps and at the last step,

    share = probes x probe time / (run_steps x step time + probes x probe time).

Then, on the trained model's features of the first task: the time of the embedding, of the logistic regression
by L-BFGS (probe.py's), and of a closed form (ridge regression onto one-hot targets, one solve) with its accuracy:
why L-BFGS is the solver.

Writes bench/results/probe.json and probe.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import pytorch_lightning as pl

ROOT = Path(__file__).resolve().parent.parent


class StepTimes(pl.Callback):
    """The host time at each optimizer step's end (before the probes, which run after this callback)."""

    def __init__(self) -> None:
        self.ends: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
            self.ends[trainer.global_step] = time.perf_counter()


def probes_in_run(run_steps: int, every: int) -> int:
    """Step 0, every `every` steps, and the last step when it is not a multiple."""
    return run_steps // every + 1 + (1 if run_steps % every else 0)


def solvers(model, task, cfg_eval) -> dict:
    """Embedding, L-BFGS and closed-form times (and accuracies) on one task's features."""
    import numpy as np
    import torch

    from pretrain.evaluation.probe import embed, probe_scores

    t0 = time.perf_counter()
    mean, cls = embed(model, [*task.train_ids, *task.valid_ids], model.cfg.pad_token_id)
    t1 = time.perf_counter()
    n = len(task.train_ids)
    scores = probe_scores(mean[:n], task.train_y, mean[n:], task.valid_y, len(task.labels), cfg_eval.l2,
                          cfg_eval.max_iter)
    t2 = time.perf_counter()
    x = mean.double()
    mu, sd = x[:n].mean(0), x[:n].std(0, unbiased=False).clamp(min=1e-12)
    z = torch.cat([(x - mu) / sd, torch.ones(len(x), 1, dtype=torch.float64)], 1)
    onehot = torch.nn.functional.one_hot(torch.from_numpy(task.train_y), len(task.labels)).double()
    W = torch.linalg.solve(z[:n].T @ z[:n] + cfg_eval.l2 * torch.eye(z.shape[1], dtype=torch.float64), z[:n].T @ onehot)
    ridge = float(((z[n:] @ W).argmax(1).numpy() == np.asarray(task.valid_y)).mean())
    t3 = time.perf_counter()
    at_s = probe_scores(cls[:n], task.train_y, cls[n:], task.valid_y, len(task.labels), cfg_eval.l2, cfg_eval.max_iter)
    return {"cls_accuracy": round(at_s["accuracy"], 4), "embed_s": round(t1 - t0, 3), "lbfgs_s": round(t2 - t1, 4), "lbfgs_accuracy": round(scores["accuracy"], 4),
            "closed_form_s": round(t3 - t2, 4), "closed_form_accuracy": round(ridge, 4), "texts": len(x)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "cpu-30min.yaml"))
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps trained here")
    parser.add_argument("--every", type=int, default=10, help="probe interval here (many probes, few steps)")
    parser.add_argument("--run-steps", type=int, default=1656, help="the run whose share is computed")
    parser.add_argument("--work", default=str(ROOT / "runs" / "bench-probe"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()

    from common import write_results

    from data_prep.config import load_config
    from pretrain.training.probing import Probing
    from pretrain.training.train import fit, training_data

    base = load_config(args.config)
    if not base.eval.tasks:
        raise SystemExit(f"{args.config} has no eval.tasks to probe")
    cfg = load_config(args.config, [f"--run_dir={args.work}", "--trainer.max_time=null",
                                    f"--trainer.max_steps={args.steps}", "--optim.warmup_steps=1",
                                    "--masking.anneal_steps=1", f"--eval.every_n_steps={args.every}",
                                    f"--trainer.val_check_interval={10 * args.steps}",
                                    f"--checkpoint.every_n_steps={10 * args.steps}", "--logger.wandb=null"])
    meta = training_data(cfg)
    timer = StepTimes()
    trainer = fit(cfg, meta, resume=False, callbacks=[timer], enable_progress_bar=False)
    probing = next(c for c in trainer.callbacks if isinstance(c, Probing))
    probe_steps = {int(h["step"]) for h in probing.history}
    steps = [s for s in sorted(timer.ends) if s - 1 in timer.ends and s - 1 not in probe_steps and s > 2]
    step_s = statistics.median(timer.ends[s] - timer.ends[s - 1] for s in steps)
    probe_s = statistics.median(h["probe/seconds"] for h in probing.history)
    every = base.eval.every_n_steps
    n = probes_in_run(args.run_steps, every)
    share = n * probe_s / (args.run_steps * step_s + n * probe_s)
    detail = solvers(trainer.lightning_module.model, probing.tasks[0], base.eval)
    e = base.eval
    report = {"config": args.config, "tasks": e.tasks, "max_train_examples": e.max_train_examples,
              "max_valid_examples": e.max_valid_examples, "every_n_steps": every, "run_steps": args.run_steps,
              "probes_in_run": n, "step_s_median": round(step_s, 4), "steps_timed": len(steps),
              "probe_s_median": round(probe_s, 3), "probes_timed": len(probing.history),
              "probe_in_steps": round(probe_s / step_s, 2), "share": round(share, 4), "solvers": detail,
              "history": probing.history}
    md = [
        "# Probe cost (bench/bench_probe.py)",
        "",
        f"`python bench/bench_probe.py --config {Path(args.config).relative_to(ROOT) if Path(args.config).is_relative_to(ROOT) else args.config} "
        f"--steps {args.steps} --every {args.every} --run-steps {args.run_steps}`",
        "",
        f"Probes of {', '.join(e.tasks)}: {e.max_train_examples} train + {e.max_valid_examples} validation texts "
        f"each, pooling {e.pooling}.",
        "",
        "| | median | timed |",
        "|---|---|---|",
        f"| optimizer step | {step_s:.3f} s | {len(steps)} |",
        f"| probe | {probe_s:.2f} s (= {probe_s / step_s:.1f} steps) | {len(probing.history)} |",
        "",
        f"A run of {args.run_steps:,} steps probed every {every} steps (and at step 0 and the last step): {n} probes, "
        f"**{share:.1%} of the run**.",
        "",
        f"One probe's parts ({detail['texts']} texts): embedding {detail['embed_s']:.2f} s; logistic regression "
        f"by L-BFGS {detail['lbfgs_s'] * 1000:.0f} ms (accuracy {detail['lbfgs_accuracy']:.3f}); closed-form "
        f"ridge {detail['closed_form_s'] * 1000:.0f} ms (accuracy {detail['closed_form_accuracy']:.3f}). The same "
        f"probe on the <s> vector (pooling cls): accuracy {detail['cls_accuracy']:.3f}.",
    ]
    write_results(args.out, "probe", report, md)
    print("\n".join(md))


if __name__ == "__main__":
    main()
