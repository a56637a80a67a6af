"""Downstream metrics as GLUE defines them, computed by `torchmetrics`: accuracy, binary F1 (MRPC, QQP), macro F1,
Matthews correlation (CoLA), Pearson and Spearman correlation (STS-B).

Every metric is "higher is better", so the first metric of a task can drive early stopping and model
selection as it is. Classification metrics take label ids; regression metrics take floats.

What stays hand-written here, and why:
- the undefined cases: a Matthews or a correlation coefficient with a constant side (a constant prediction, or
  a single gold class) is 0 here, as in GLUE's scorers (scikit-learn, scipy) - a constant predictor earns
  nothing - where torchmetrics gives -1 or another finite special value (Matthews) or nan with a warning
  (Pearson);
- the labels are re-indexed to the classes that occur, so torchmetrics' `num_classes` is known.
torchmetrics computes the classification metrics in float32: the values equal the exact fractions to about 1e-7.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torchmetrics.functional import pearson_corrcoef, spearman_corrcoef
from torchmetrics.functional.classification import (
    binary_f1_score,
    multiclass_accuracy,
    multiclass_f1_score,
    multiclass_matthews_corrcoef,
)


def _classes(pred: np.ndarray, gold: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(pred, gold) as indices into the classes that occur in either, and the number of those classes (>= 2, as
    torchmetrics' multiclass metrics require; an absent class has no true or false positives and does not count)."""
    classes, inverse = np.unique(np.concatenate([gold, pred]), return_inverse=True)
    index = torch.from_numpy(inverse.astype(np.int64))
    return index[len(gold):], index[: len(gold)], max(2, len(classes))


def accuracy(pred: np.ndarray, gold: np.ndarray) -> float:
    if not len(gold):
        return 0.0
    p, g, k = _classes(pred, gold)
    return float(multiclass_accuracy(p, g, num_classes=k, average="micro"))


def f1(pred: np.ndarray, gold: np.ndarray, positive: int = 1) -> float:
    """Binary F1 of the class `positive` (label id 1: `equivalent` in MRPC, `duplicate` in QQP); 0 when it
    occurs in neither."""
    p, g = (torch.from_numpy(np.asarray(x == positive, dtype=np.int64)) for x in (pred, gold))
    return float(binary_f1_score(p, g))


def macro_f1(pred: np.ndarray, gold: np.ndarray) -> float:
    """The mean of the per-class F1 over the classes that occur in `gold` or `pred` (as sklearn's average='macro')."""
    if not len(gold):
        return 0.0
    p, g, k = _classes(pred, gold)
    return float(multiclass_f1_score(p, g, num_classes=k, average="macro"))


def matthews(pred: np.ndarray, gold: np.ndarray) -> float:
    """Matthews correlation, multi-class (Gorodkin 2004, the form sklearn computes); 0 when undefined."""
    if len(np.unique(pred)) < 2 or len(np.unique(gold)) < 2:
        return 0.0  # a zero denominator: sklearn's 0, where torchmetrics gives -1 or a finite special value
    p, g, k = _classes(pred, gold)
    return float(multiclass_matthews_corrcoef(p, g, num_classes=k))


def _floats(pred: np.ndarray, gold: np.ndarray) -> tuple[torch.Tensor, torch.Tensor] | None:
    """float64 tensors, or None when either side is constant (the correlation is undefined: 0)."""
    if len(gold) < 2 or np.ptp(pred) == 0 or np.ptp(gold) == 0:
        return None
    return (torch.from_numpy(np.asarray(pred, dtype=np.float64)),
            torch.from_numpy(np.asarray(gold, dtype=np.float64)))


def pearson(pred: np.ndarray, gold: np.ndarray) -> float:
    """Pearson correlation; 0 when either side is constant (undefined, and a constant predictor earns nothing)."""
    xy = _floats(pred, gold)
    return float(pearson_corrcoef(*xy)) if xy else 0.0


def spearman(pred: np.ndarray, gold: np.ndarray) -> float:
    """Spearman correlation: Pearson on the ranks, ties given the mean of the ranks they span (as scipy)."""
    xy = _floats(pred, gold)
    return float(spearman_corrcoef(*xy)) if xy else 0.0


Metric = Callable[[np.ndarray, np.ndarray], float]
CLASSIFICATION: dict[str, Metric] = {"accuracy": accuracy, "f1": f1, "macro_f1": macro_f1, "matthews": matthews}
REGRESSION: dict[str, Metric] = {"pearson": pearson, "spearman": spearman}


def compute(names: list[str], pred: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    """{name: value} for each metric in `names` (all of one problem type)."""
    table = CLASSIFICATION | REGRESSION
    return {name: table[name](np.asarray(pred), np.asarray(gold)) for name in names}
