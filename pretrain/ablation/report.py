"""The ablation's report: per variant the mean held-out loss over seeds and its spread, the difference from the
baseline, whether it exceeds the spread, the paper's direction and whether this run agrees (report.json,
report.md), and the held-out loss curves against tokens processed (report.png).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np

from .spec import AblationFile, Direction


def _mean_spread(values: list[float]) -> tuple[float, float | None]:
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), (float(v.std(ddof=1)) if len(v) > 1 else None)


def verdict(delta: float, spread: float | None, paper: Direction, similar_nats: float) -> tuple[str, str]:
    """(significance, agreement) of a variant's difference from the baseline (positive: higher loss, worse).

    With a spread (2+ seeds): a difference no larger than the spread is not significant ("n.s."). Without one:
    below `similar_nats` counts as similar, otherwise the sign decides. Agreement compares with the paper's
    direction: worse needs a significant increase, better a significant decrease, similar a non-significant one.
    """
    if spread is not None:
        significant = abs(delta) > spread
        sig = "yes" if significant else "n.s."
    else:
        significant = abs(delta) >= similar_nats
        sig = "1 seed" if significant else f"< {similar_nats:g} (1 seed)"
    if paper == "baseline":
        return "", ""
    observed = "similar" if not significant else ("worse" if delta > 0 else "better")
    return sig, "yes" if observed == paper else "no"


def build_report(af: AblationFile, results: list[dict[str, Any]], budget: float) -> dict[str, Any]:
    st = af.ablation
    by_name: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by_name.setdefault(r["variant"], []).append(r)
    base_mean, base_spread = _mean_spread([r["heldout"]["loss"] for r in by_name[st.baseline]])
    rows = []
    for v in af.variants:
        runs = by_name.get(v.name, [])
        if not runs:
            continue
        mean, spread = _mean_spread([r["heldout"]["loss"] for r in runs])
        delta = mean - base_mean
        both = [s for s in (spread, base_spread) if s is not None]
        sig, agrees = verdict(delta, max(both) if both else None, "baseline" if v.name == st.baseline else v.paper,
                              st.similar_nats)
        downstream = [r["downstream"]["value"] for r in runs if r.get("downstream")]
        rows.append({
            "variant": v.name, "what": v.what, "paper": v.paper, "paper_note": v.paper_note,
            "seeds": [r["seed"] for r in runs], "steps": runs[0]["steps"], "global_size": runs[0]["global_size"],
            "tokens": float(np.mean([r["tokens"] for r in runs])),
            "wall_s": float(np.mean([r["wall_s"] for r in runs])),
            "epochs": float(np.mean([r.get("epochs", 0.0) for r in runs])),
            "loss": mean, "loss_spread": spread, "ppl": math.exp(mean), "delta": delta,
            "significant": sig, "agrees": agrees,
            "downstream": float(np.median(downstream)) if downstream else None,
            "downstream_metric": runs[0]["downstream"]["metric"] if downstream else None,
            "losses": [r["heldout"]["loss"] for r in runs],
        })
    return {"base": af.base, "overrides": af.overrides, "baseline": st.baseline, "seeds": st.seeds,
            "budget_tokens": round(budget), "eval_blocks": st.eval_blocks, "eval_seed": st.eval_seed,
            "yardstick_tokens": results[0]["heldout"]["tokens"] if results else 0,
            "settings": dataclasses.asdict(st), "rows": rows}


def markdown(report: dict[str, Any]) -> str:
    seeds = report["seeds"]
    spread_note = ("mean over seeds +- sample std; a difference no larger than the larger spread is n.s."
                   if seeds > 1 else f"one seed: no spread; |delta| < {report['settings']['similar_nats']:g} nats "
                   "counts as similar")
    lines = [
        f"Recipe ablation: {len(report['rows'])} variants, {seeds} seed(s), {report['budget_tokens']:,} tokens "
        f"each; held-out MLM loss (nats) on the same {report['eval_blocks']} FULL-SENTENCES blocks with the same "
        f"masks ({report['yardstick_tokens']:,} masked tokens); {spread_note}. Baseline: {report['baseline']}.",
        "",
    ]
    has_down = any(r["downstream"] is not None for r in report["rows"])
    head = ["variant", "what changed", "tokens", "epochs", "batch", "steps", "wall (s)", "held-out loss", "ppl", "delta vs baseline",
            "significant"] + ([f"downstream ({report['rows'][0]['downstream_metric']})"] if has_down else []) + [
            "paper's direction", "agrees"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["rows"]:
        loss = f"{r['loss']:.4f}" + (f" +- {r['loss_spread']:.4f}" if r["loss_spread"] is not None else "")
        delta = "" if r["paper"] == "baseline" else f"{r['delta']:+.4f}"
        paper = "baseline" if r["paper"] == "baseline" else f"{r['paper']} ({r['paper_note']})" if r["paper_note"] \
            else r["paper"]
        cells = [r["variant"], r["what"], f"{r['tokens'] / 1e6:.2f}M", f"{r['epochs']:.2f}", str(r["global_size"]), str(r["steps"]), f"{r['wall_s']:.0f}", loss,
                 f"{r['ppl']:.2f}", delta, r["significant"]]
        if has_down:
            cells.append(f"{100 * r['downstream']:.2f}" if r["downstream"] is not None else "")
        cells += [paper, r["agrees"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(results: list[dict[str, Any]], out_png: Path) -> Path | None:
    """Held-out (yardstick) loss against tokens processed, one line per variant (seed mean)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    by_name: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by_name.setdefault(r["variant"], []).append(r)
    fig, ax = plt.subplots(figsize=(8, 5))
    for name, runs in by_name.items():
        points: dict[int, list[tuple[float, float]]] = {}
        for r in runs:
            for c in r["curve"]:
                # from the step, not a stored count: results written before "trained_tokens" existed plot too
                points.setdefault(c["step"], []).append((c["step"] * r["tokens"] / r["steps"], c["loss"]))
        steps = sorted(points)
        ax.plot([np.mean([t for t, _ in points[s]]) / 1e6 for s in steps],
                [np.mean([loss for _, loss in points[s]]) for s in steps], marker="o", label=name)
    ax.set_xlabel("tokens processed (millions)")
    ax.set_ylabel("held-out MLM loss (nats), fixed blocks and masks")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = out_png.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(out_png)
    return out_png
