"""`make evaluate`'s report: one row per checkpoint, as a markdown table (evaluate.md, also printed), the numbers
(evaluate.json) and each metric against tokens seen (evaluate.png, one panel per metric; matplotlib's Agg
backend, no display needed). Lower is better for the loss and the pseudo-perplexity, higher for the rest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from data_prep.tempfiles import write_bytes_atomic, write_json_atomic

METRICS = {
    "mlm_loss": "fixed-mask MLM loss (nats)",
    "mlm_accuracy": "fixed-mask MLM accuracy",
    "pppl": "pseudo-perplexity",
}
"""The columns every evaluation has (pppl unless eval.pppl_blocks is 0), in table order; probes follow."""


def metric_names(rows: list[dict[str, Any]]) -> list[str]:
    """The metrics present, the fixed ones first, then the probes' (`probe/<task>/<metric>`) in sorted order."""
    present = {k for r in rows for k, v in r.items() if isinstance(v, float)}
    return [m for m in METRICS if m in present] + sorted(k for k in present if k.startswith("probe/"))


def _tokens(value: float | None) -> str:
    if value is None:
        return "?"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= size:
            return f"{value / size:.2f}{unit}"
    return f"{value:.0f}"


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table: checkpoint, step, tokens seen, then each metric; the best value of each in bold."""
    names = metric_names(rows)
    best = {}
    for m in names:
        values = [r[m] for r in rows if isinstance(r.get(m), float)]
        if len(set(values)) > 1:  # a tie everywhere marks nothing
            best[m] = min(values) if m in ("mlm_loss", "pppl") else max(values)
    head = ["checkpoint", "step", "tokens seen", *(METRICS.get(m, m) for m in names)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"`{r['name']}`", "?" if r.get("step") is None else f"{r['step']:,}", _tokens(r.get("tokens_seen"))]
        for m in names:
            v = r.get(m)
            text = "-" if v is None else (f"{v:.2f}" if m == "pppl" else f"{v:.4f}")
            cells.append(f"**{text}**" if v is not None and v == best.get(m) else text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], out_png: Path) -> Path | None:
    """Each metric against tokens seen, one panel per metric, each point named; None when no metric is there.
    Rows whose tokens seen are unknown are left out of the panels (the table has them)."""
    names = metric_names(rows)
    if not names:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(len(names), 3)
    nrows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3.4 * nrows), squeeze=False)
    for ax, m in zip(axes.flat, names, strict=False):
        points = sorted((r["tokens_seen"], r[m], r["name"], r.get("kind") == "export") for r in rows
                        if r.get("tokens_seen") is not None and isinstance(r.get(m), float))
        # the checkpoints as a curve; exports (an average among them) as points beside it
        for exported, style, label in ((False, "o-", "checkpoints"), (True, "s", "exports")):
            mine = [p for p in points if p[3] == exported]
            if mine:
                ax.plot([p[0] for p in mine], [p[1] for p in mine], style, label=label)
        for x, y, name, _ in points:
            ax.annotate(name, (x, y), fontsize=7, alpha=0.7, xytext=(3, 3), textcoords="offset points")
        if any(p[3] for p in points) and not all(p[3] for p in points):
            ax.legend(fontsize=8)
        ax.set_title(METRICS.get(m, m), fontsize=10)
        ax.set_xlabel("tokens seen")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def write_report(rows: list[dict[str, Any]], out: Path, header: dict[str, Any]) -> dict[str, Path]:
    """evaluate.md, evaluate.json and evaluate.png under `out` (each written whole, then renamed into place)."""
    out.mkdir(parents=True, exist_ok=True)
    text = (f"# Evaluation\n\n{header['what']}\n\n" + table(rows))
    write_bytes_atomic(out / "evaluate.md", text.encode())
    write_json_atomic(out / "evaluate.json", {**header, "rows": rows})
    paths = {"table": out / "evaluate.md", "json": out / "evaluate.json"}
    png = plot(rows, out / "evaluate.png")
    if png:
        paths["plot"] = png
    return paths
