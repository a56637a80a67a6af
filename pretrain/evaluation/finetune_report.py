"""The fine-tuning report: run_dir/finetune/NAME/report.json with both variants (pretrained, from scratch), per
seed and summarised (median, min, max over seeds), and report.md, the table `finetune` prints.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.config import ExperimentConfig

from .task import TaskFile, task_dir


def summarise(values: list[float]) -> dict[str, float]:
    v = np.asarray(values, dtype=np.float64)
    return {"median": float(np.median(v)), "min": float(v.min()), "max": float(v.max()), "mean": float(v.mean()),
            "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0}


def update_report(cfg: ExperimentConfig, tf: TaskFile, variant: str, model_dir: Path, runs: list[dict[str, Any]],
                   names: list[str], n_train: int, n_valid: int, max_length: int) -> dict[str, Any]:
    """report.json holds both variants; this run replaces its own and keeps the other when the task is the same."""
    task = tf.task
    path = task_dir(cfg, task) / "report.json"
    head = {"task": task.name, "train": task.train, "valid": task.valid, "problem": task.problem,
            "labels": names, "metrics": task.metrics, "train_examples": n_train, "valid_examples": n_valid}
    report: dict[str, Any] = {}
    if path.is_file():
        try:
            report = json.loads(path.read_text())
        except ValueError:
            report = {}
        if any(report.get(k) != v for k, v in head.items() if k != "train_examples"):
            report = {}  # another task's data or label set: the old numbers are not comparable
    report = head | {"variants": report.get("variants", {})}
    report["variants"][variant] = {
        "model": str(model_dir), "from_scratch": tf.finetune.from_scratch, "max_length": max_length,
        "finetune": dataclasses.asdict(tf.finetune),
        "summary": {m: summarise([r["metrics"][m] for r in runs]) for m in task.metrics},
        "seeds": [{k: v for k, v in r.items() if k not in ("history", "settings")} for r in runs],
    }
    path.write_text(json.dumps(report, indent=2) + "\n")
    return report


def markdown(report: dict[str, Any]) -> str:
    """The report as a short table: per variant the median over seeds and [min, max], in percent (as GLUE)."""
    metrics, variants = report["metrics"], report["variants"]
    lines = [f"{report['task']}: validation ({report['valid_examples']:,} examples"
             + (f", {len(report['labels'])} labels" if report["labels"] else ", regression")
             + "), median over seeds [min, max], x100", "",
             "| model | seeds | " + " | ".join(metrics) + " |", "|---|---:|" + "---:|" * len(metrics)]
    for variant in ("pretrained", "from_scratch"):
        if variant in variants:
            v = variants[variant]
            label = f"pretrained ({v['model']})" if variant == "pretrained" else "from scratch (same architecture)"
            cells = [f"{100 * s['median']:.2f} [{100 * s['min']:.2f}, {100 * s['max']:.2f}]"
                     for s in (v["summary"][m] for m in metrics)]
            lines.append(f"| {label} | {len(v['seeds'])} | " + " | ".join(cells) + " |")
    if len(variants) == 2:
        delta = [100 * (variants["pretrained"]["summary"][m]["median"] - variants["from_scratch"]["summary"][m]["median"])
                 for m in metrics]
        lines.append("| pretraining bought (median) | | " + " | ".join(f"{d:+.2f}" for d in delta) + " |")
    return "\n".join(lines) + "\n"
