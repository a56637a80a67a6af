"""Downstream metrics in numpy, as GLUE defines them (no sklearn or scipy): accuracy, binary F1 (MRPC, QQP),
macro F1, Matthews correlation (CoLA), Pearson and Spearman correlation (STS-B).

Every metric is "higher is better", so the first metric of a task can drive early stopping and model
selection as it is. Classification metrics take label ids; regression metrics take floats.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def accuracy(pred: np.ndarray, gold: np.ndarray) -> float:
    return float(np.mean(pred == gold)) if len(gold) else 0.0


def f1(pred: np.ndarray, gold: np.ndarray, positive: int = 1) -> float:
    """Binary F1 of the class `positive` (label id 1: `equivalent` in MRPC, `duplicate` in QQP)."""
    tp = np.sum((pred == positive) & (gold == positive))
    fp_fn = np.sum((pred == positive) != (gold == positive))
    return float(2 * tp / (2 * tp + fp_fn)) if tp + fp_fn else 0.0


def macro_f1(pred: np.ndarray, gold: np.ndarray) -> float:
    """The mean of the per-class F1 over the classes that occur in `gold` or `pred` (as sklearn's average='macro')."""
    classes = np.union1d(pred, gold)
    if not len(classes):
        return 0.0
    scores = []
    for c in classes:
        tp = np.sum((pred == c) & (gold == c))
        fp_fn = np.sum((pred == c) != (gold == c))
        scores.append(2 * tp / (2 * tp + fp_fn) if tp + fp_fn else 0.0)
    return float(np.mean(scores))


def matthews(pred: np.ndarray, gold: np.ndarray) -> float:
    """Matthews correlation, multi-class (Gorodkin 2004, the form sklearn computes); 0 when undefined."""
    classes, inverse = np.unique(np.concatenate([gold, pred]), return_inverse=True)
    k, n = len(classes), len(gold)
    confusion = np.zeros((k, k), dtype=np.float64)
    np.add.at(confusion, (inverse[:n], inverse[n:]), 1.0)  # rows: gold, columns: predicted
    t, p = confusion.sum(1), confusion.sum(0)
    c, s = np.trace(confusion), confusion.sum()
    denominator = np.sqrt((s * s - p @ p) * (s * s - t @ t))
    return float((c * s - t @ p) / denominator) if denominator else 0.0


def pearson(pred: np.ndarray, gold: np.ndarray) -> float:
    """Pearson correlation; 0 when either side is constant (undefined, and a constant predictor earns nothing)."""
    x, y = pred.astype(np.float64) - pred.mean(), gold.astype(np.float64) - gold.mean()
    denominator = np.sqrt((x @ x) * (y @ y))
    return float(x @ y / denominator) if denominator else 0.0


def rank(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given the mean of the ranks they span (as scipy.stats.rankdata)."""
    ordinal = np.empty(len(x), dtype=np.float64)
    ordinal[np.argsort(x, kind="stable")] = np.arange(1, len(x) + 1)
    _, groups, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(groups, weights=ordinal) / counts)[groups]


def spearman(pred: np.ndarray, gold: np.ndarray) -> float:
    return pearson(rank(pred), rank(gold))


Metric = Callable[[np.ndarray, np.ndarray], float]
CLASSIFICATION: dict[str, Metric] = {"accuracy": accuracy, "f1": f1, "macro_f1": macro_f1, "matthews": matthews}
REGRESSION: dict[str, Metric] = {"pearson": pearson, "spearman": spearman}


def compute(names: list[str], pred: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    """{name: value} for each metric in `names` (all of one problem type)."""
    table = CLASSIFICATION | REGRESSION
    return {name: table[name](np.asarray(pred), np.asarray(gold)) for name in names}
