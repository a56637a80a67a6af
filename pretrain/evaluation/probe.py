"""Linear probes: how much of a labelled task a frozen encoder's features already make linearly readable.

A probe embeds a task's texts with the encoder as it is (eval mode, no gradients), one vector per text, fits a
multinomial logistic regression on the train texts' vectors and scores the validation texts (accuracy, macro-F1).
This is the "linear evaluation" of representation learning (Alain & Bengio 2016, arXiv 1610.01644; SentEval,
Conneau & Kiela 2018): it needs no fine-tuning run, so it is cheap enough to run while pretraining
(training/probing.py, `eval.every_n_steps`) and over a list of checkpoints (`make evaluate`), and it answers the
question the loss curve does not: is more pretraining still buying anything on the task?

The public API (what training/probing.py and `make evaluate` import):
    read_probe_tasks(cfg, paths)           the tasks' capped, seeded subsets as texts and label ids (ProbeTexts);
                                           every problem one ConfigError naming eval.tasks[i] and the file
    load_probe_tasks(cfg, tokenizer_dir, max_length, paths)   the same as token ids (ProbeTask)
    embed(model, ids, ...)                 (mean, cls) features of a RobertaForMLM, frozen, in input order
    fit_logistic / probe_scores            the classifier and its validation metrics
    probe(model, tasks, ...)               {"probe/<task>/accuracy": ..., "probe/<task>/macro_f1": ...}
`cfg` is the experiment's `eval` section (data_prep/eval_config.py EvalConfig): the caps, the seed, the
pooling, the solver's L2 and iterations.

Features: the last layer's hidden states averaged over the text's real tokens (`mean`, the default), or the last
layer at <s> (`cls`); `embed` computes both at once. RoBERTa trains no objective on <s> (no NSP), so until a
classifier is fine-tuned on it, <s> is one token's context among others; the mean pools every token's
(docs/evaluation.md has both measured on kernel_topics).

Classifier: softmax regression on features standardised with the train subset's mean and deviation, minimising
the summed cross-entropy + l2/2 |W|^2 (scikit-learn's LogisticRegression with C = 1/l2, multinomial) by full-batch
L-BFGS (strong-Wolfe line search) in float64 on the CPU, from zero weights, for at most `max_iter` iterations.
The objective is strictly convex, so there is one optimum and the solver reaches it the same way every time. Why
not scikit-learn: it is not a dependency, and the fit is a few percent of a probe, whose time is the embedding's
(bench/results/probe.md), so a faster solver would barely show. Why not a closed form (least squares onto one-hot
targets, one 257 x 257 solve): it saves those few percent, and it is not a logistic regression (its scores are
not probabilities, and it weighs well-classified points as much as the boundary's).

Determinism: the subsets are numpy `default_rng(seed)` choices, the texts are embedded in a fixed (length) order
in fixed batches, and nothing draws random numbers; `frozen` also puts back the global RNG states and every
module's train/eval mode, so a probe inside a training run changes nothing the run computes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_prep.config import ConfigError

from .metrics import accuracy, macro_f1
from .task import FinetuneError, label_set, load_task, read_examples, targets

# ---------------------------------------------------------------------------------------------------------------
# The tasks: capped, seeded subsets of a task file's labelled data


@dataclass
class ProbeTexts:
    """One task's probe data before tokenizing: the texts (and second texts of pairs) and label ids of the
    capped train and validation subsets."""

    name: str
    source: str  # the task file
    labels: list[str]  # class names in id order
    train: tuple[list[str], list[str] | None]
    train_y: np.ndarray  # (N,) int64
    valid: tuple[list[str], list[str] | None]
    valid_y: np.ndarray  # (M,) int64
    max_length: int = 512  # the task's finetune.max_length: tokens per text at most (also capped by the model)


@dataclass
class ProbeTask:
    """One task's probe data as token ids (<s> A </s>, or <s> A </s></s> B </s>), unpadded, and label ids."""

    name: str
    source: str
    labels: list[str]
    train_ids: list[list[int]]
    train_y: np.ndarray
    valid_ids: list[list[int]]
    valid_y: np.ndarray


def subset(n: int, cap: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded random subset of `cap` of `n` items; all of them when n <= cap."""
    if n <= cap:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, cap, replace=False))


def read_probe_task(path: str | Path, key: str, max_train: int, max_valid: int, seed: int) -> ProbeTexts:
    """One task file's probe data; `key` (eval.tasks[i]=PATH) starts every error's one line."""
    try:
        tf = load_task(path)
    except ConfigError as e:
        raise ConfigError(f"{key}: {e}") from None
    task = tf.task
    if task.problem != "classification":
        raise ConfigError(f"{key}: task.problem is {task.problem}: a probe is a classifier; drop the task from "
                          "eval.tasks (`make finetune` evaluates regression tasks)")
    try:
        train, valid = read_examples(task.train, task, "train"), read_examples(task.valid, task, "valid")
        names = label_set(task, train, valid)
        y_train, y_valid = targets(task, train, names), targets(task, valid, names)
    except FinetuneError as e:  # a missing file or field, a hub task offline: finetune's own line
        raise ConfigError(f"{key}: {e}") from None
    # distinct streams for the two splits, both fixed by the seed
    keep_train = subset(len(y_train), max_train, seed)
    keep_valid = subset(len(y_valid), max_valid, seed + 1)

    def pick(ex: Any, keep: np.ndarray) -> tuple[list[str], list[str] | None]:
        return [ex.texts[i] for i in keep], [ex.pairs[i] for i in keep] if ex.pairs is not None else None

    return ProbeTexts(task.name, str(path), names, pick(train, keep_train), y_train[keep_train],
                      pick(valid, keep_valid), y_valid[keep_valid], tf.finetune.max_length)


def read_probe_tasks(cfg: Any, paths: Sequence[str | Path] | None = None) -> list[ProbeTexts]:
    """The probe data of `paths` (default: cfg.tasks), capped by cfg.max_train_examples / max_valid_examples and
    chosen by cfg.seed (`cfg`: an EvalConfig). Needs no tokenizer: training reads them before any step, so that
    a bad task is one line at the start, not an error after the first interval."""
    paths = list(cfg.tasks if paths is None else paths)
    tasks = [read_probe_task(p, f"eval.tasks[{i}]={p}", cfg.max_train_examples, cfg.max_valid_examples, cfg.seed)
             for i, p in enumerate(paths)]
    seen: dict[str, str] = {}
    for t in tasks:
        if t.name in seen:  # the metric names would collide
            raise ConfigError(f"eval.tasks: {seen[t.name]} and {t.source} are both named {t.name!r} (task.name); "
                              "rename one")
        seen[t.name] = t.source
    return tasks


def tokenize(texts: ProbeTexts, tokenizer_dir: str | Path, max_length: int) -> ProbeTask:
    """`texts` as token ids with the tokenizer of `tokenizer_dir` (run_dir/tokenizer, or an export), truncated to
    `max_length` tokens (the longer text of a pair is cut first, as `transformers` does)."""
    from data_prep.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    tok.no_padding()
    tok.enable_truncation(max_length, strategy="longest_first")

    def ids(split: tuple[list[str], list[str] | None]) -> list[list[int]]:
        first, second = split
        inputs = list(zip(first, second, strict=True)) if second is not None else first
        return [e.ids for e in tok.encode_batch(inputs)]

    return ProbeTask(texts.name, texts.source, texts.labels, ids(texts.train), texts.train_y, ids(texts.valid),
                     texts.valid_y)


def load_probe_tasks(cfg: Any, tokenizer_dir: str | Path, max_length: int,
                     paths: Sequence[str | Path] | None = None) -> list[ProbeTask]:
    """`read_probe_tasks` then `tokenize`: each task's capped subsets as token ids. `max_length`: the model's
    positions (data.seq_len), lowered to a task's finetune.max_length when that is smaller."""
    return [tokenize(t, tokenizer_dir, min(max_length, t.max_length)) for t in read_probe_tasks(cfg, paths)]


# ---------------------------------------------------------------------------------------------------------------
# Features: the frozen encoder, in eval mode, without gradients


@contextlib.contextmanager
def frozen(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode and no gradients inside; afterwards every module's own train/eval mode and the global RNG states
    (CPU, and the CUDA device's) exactly as before."""
    modes = [(m, m.training) for m in model.modules()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in modes:
            m.training = mode
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def _device(model: torch.nn.Module) -> torch.device:
    p = next(model.parameters())
    return torch.device(p.device_mesh.device_type) if hasattr(p, "device_mesh") else p.device  # an FSDP2 DTensor


def embed(model: torch.nn.Module, ids: Sequence[Sequence[int]], pad_id: int = 1, batch_tokens: int = 8192,
          context: Callable[[], contextlib.AbstractContextManager] | None = None, rank: int = 0, world_size: int = 1,
          all_gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, cls): float32 CPU tensors (N, C), row i the features of `ids[i]`: the mean of the last layer over its
    real tokens, and the last layer at <s> (its first token). `model` is a RobertaForMLM (its `encode`), run frozen
    (`frozen`). Texts go in length order, in batches of the same number of texts (about `batch_tokens` tokens at the
    longest), so padding is small and the batches do not depend on the rank.

    `context`: entered around each forward pass (Lightning's precision context: autocast under bf16-mixed).
    With `world_size` > 1 every rank embeds every world_size-th text of the length order (rank `rank`'s share,
    padded with repeats to equal counts, so that every rank runs the same number of forward passes: under FSDP each
    is a collective) and `all_gather` ((n, C) -> (W, n, C), every rank's) brings the shares together."""
    N = len(ids)
    order = sorted(range(N), key=lambda i: (len(ids[i]), i))
    share = math.ceil(N / world_size)
    mine = order[rank::world_size]
    mine = mine + mine[-1:] * (share - len(mine)) if mine else [order[0]] * share
    per_batch = max(1, batch_tokens // max(1, max(len(x) for x in ids)))
    device = _device(model)
    means, clss = [], []
    with frozen(model):
        for start in range(0, share, per_batch):
            rows = [ids[i] for i in mine[start:start + per_batch]]
            T = max(len(r) for r in rows)
            input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)  # (B, T)
            for b, r in enumerate(rows):
                input_ids[b, : len(r)] = torch.as_tensor(r, dtype=torch.long)
            input_ids = input_ids.to(device)
            mask = input_ids.ne(pad_id)
            with context() if context is not None else contextlib.nullcontext():
                hidden = model.encode(input_ids, mask.long()).float()  # (B, T, C)
            m = mask.unsqueeze(-1).float()  # (B, T, 1)
            means.append((hidden * m).sum(1) / m.sum(1).clamp(min=1.0))  # (B, C)
            clss.append(hidden[:, 0])  # (B, C)
    mean, cls = torch.cat(means), torch.cat(clss)  # (share, C)
    if world_size > 1:
        assert all_gather is not None, "embed over several ranks needs all_gather"
        gathered = all_gather(torch.stack([mean, cls]))  # (W, 2, share, C)
        mean = torch.empty(N, mean.shape[1], device=mean.device)
        cls = torch.empty_like(mean)
        for r in range(world_size):
            theirs = order[r::world_size]
            mean[theirs] = gathered[r, 0, : len(theirs)]
            cls[theirs] = gathered[r, 1, : len(theirs)]
        return mean.cpu(), cls.cpu()
    out = torch.empty(N, mean.shape[1])
    back = torch.as_tensor(mine[:N])
    out_cls = torch.empty_like(out)
    out[back], out_cls[back] = mean.cpu(), cls.cpu()
    return out, out_cls


# ---------------------------------------------------------------------------------------------------------------
# The classifier: multinomial logistic regression by L-BFGS


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, l2: float = 1.0, max_iter: int = 100
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(W (C, K), b (K,)) minimising sum_i CE(x_i W + b, y_i) + l2/2 |W|^2, float64, from zeros. `x` (N, C)
    should be standardised (`probe_scores` does it): L-BFGS converges in far fewer iterations then."""
    x, y = x.double(), y.long()
    W = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, history_size=10, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-7, tolerance_change=1e-12)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ W + b, y, reduction="sum") + 0.5 * l2 * W.square().sum()
        loss.backward()
        return loss

    # one thread: these (N, C) x (C, K) products are too small to split, and on a busy machine the thread pool's
    # hand-offs made the fit 3-30x slower (0.2 s alone against 0.7-5.9 s on two threads, 600 x 256, 8 classes);
    # the same arithmetic whatever torch's thread count, too
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.enable_grad():
            opt.step(closure)
    finally:
        torch.set_num_threads(threads)
    return W.detach(), b.detach()


def probe_scores(x_train: torch.Tensor, y_train: np.ndarray, x_valid: torch.Tensor, y_valid: np.ndarray,
                 num_classes: int, l2: float = 1.0, max_iter: int = 100) -> dict[str, float]:
    """{"accuracy", "macro_f1"} on the validation features of a logistic regression fitted on the train ones."""
    x_train, x_valid = x_train.double(), x_valid.double()
    mu, sd = x_train.mean(0), x_train.std(0, unbiased=False).clamp(min=1e-12)
    W, b = fit_logistic((x_train - mu) / sd, torch.from_numpy(np.asarray(y_train)), num_classes, l2, max_iter)
    pred = (((x_valid - mu) / sd) @ W + b).argmax(1).numpy()
    gold = np.asarray(y_valid)
    return {"accuracy": accuracy(pred, gold), "macro_f1": macro_f1(pred, gold)}


def probe(model: torch.nn.Module, tasks: Sequence[ProbeTask], pooling: str = "mean", l2: float = 1.0,
          max_iter: int = 100, pad_id: int = 1, batch_tokens: int = 8192, **embed_kwargs: Any) -> dict[str, float]:
    """`probe/<task>/accuracy` and `probe/<task>/macro_f1` of every task: the model's `pooling` features (mean or
    cls) of the train and validation texts, a logistic regression fitted on the train ones. `embed_kwargs`:
    embed's context, rank, world_size and all_gather."""
    assert pooling in ("mean", "cls"), f"pooling {pooling!r} is mean or cls"
    out: dict[str, float] = {}
    for task in tasks:
        n = len(task.train_ids)
        mean, cls = embed(model, [*task.train_ids, *task.valid_ids], pad_id, batch_tokens, **embed_kwargs)
        x = mean if pooling == "mean" else cls
        scores = probe_scores(x[:n], task.train_y, x[n:], task.valid_y, len(task.labels), l2, max_iter)
        out.update({f"probe/{task.name}/{k}": v for k, v in scores.items()})
    return out
