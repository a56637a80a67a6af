"""Linear probes while training (`eval.tasks`, `eval.every_n_steps`): is more pretraining still buying anything on
the tasks the user cares about? The loss curve does not say; a fine-tuning run per checkpoint says it in minutes
each, after the run. A probe (evaluation/probe.py) says it in seconds, during the run: the frozen encoder's
features of each task's capped train and validation texts, a logistic regression, the validation accuracy and
macro-F1. ModernBERT's authors ran MNLI fine-tuning beside their pretraining for the same reason.

When: at step 0 of a fresh run (the random initialisation: the baseline the curve starts from), at every
`eval.every_n_steps` optimizer steps, and at the last step (trainer.max_steps). Each probe step is a function of
the step alone, and the numbers of a function of the weights alone, so a resumed or rolled-back run probes at the
same steps and logs the same numbers as the run that never stopped. One case needs care: the loggers drop what
was logged from the resumed step on (train.py's CSV logger keeps the rows before it, TensorBoard purges from
it), and a checkpoint of a probe step is saved after its probe (the checkpoint callbacks run last); so a run that
resumes at a probe step probes again at its start: the same weights, the same numbers, logged again.

What it logs, to every logger at the probe's step (rank 0): `probe/<task>/accuracy`, `probe/<task>/macro_f1`,
`probe/tokens` (tokens trained so far: sequences of the batch schedule x data.seq_len, padding included, the x
axis of the loss plot's probe panel) and `probe/seconds` (the probe's wall time, its cost); and one console line.

Training is unchanged by it, bit for bit (tests/test_probe.py): the probe runs between optimizer steps, in eval
mode and without gradients, and puts back every module's mode and the global RNG states (`probe.frozen`); every
step reseeds its randomness anyway (steps.py).

Several ranks (DDP, FSDP): every rank embeds its share of the texts (every world_size-th of the length order) and
the shares are gathered (`strategy.all_gather`), so a probe costs 1/W of one rank's time and FSDP's sharded
`encode` (a collective per forward) runs on every rank as it must; the same number of forward passes on every
rank, so no rank waits on another's collective. Then rank 0 alone fits the classifier and logs, with no
collective inside; the other ranks go on to the next step and wait for it at the step's gradient all-reduce.

The task files are read when the callback is built (train.fit, before the first step: a bad task is one line at
the start, not an error after an interval; data_prep's config check has already found that the files exist) and
tokenized once per run, at the first probe, with the run's tokenizer (run_dir/tokenizer); rollbacks reuse them.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from data_prep.config import ConfigError, ExperimentConfig
from data_prep.tokenizer import tokenizer_dir

from ..evaluation.probe import ProbeTask, ProbeTexts, embed, probe_scores, read_probe_tasks, tokenize
from .schedules import BatchSchedule


class Probing(pl.Callback):
    """Probes the encoder at step 0, every `eval.every_n_steps` steps and at the last step (module docstring)."""

    def __init__(self, cfg: ExperimentConfig, texts: list[ProbeTexts] | None = None):
        self.cfg = cfg
        self.every = cfg.eval.every_n_steps
        self.texts = read_probe_tasks(cfg.eval) if texts is None else texts
        self.tasks: list[ProbeTask] | None = None  # tokenized at the first probe, kept for the run
        self.batches = BatchSchedule.from_config(cfg.batch, cfg.data.seq_len)
        self.history: list[dict[str, float]] = []  # this process's probes, rank 0: the metrics and the step
        self.seconds = 0.0  # time spent probing in this process, all probes (every rank: Throughput leaves it out)
        self.probe_seconds: float | None = None  # the last probe's time, tokenizing aside (TimeBudget prices probes)

    def _tokenized(self, max_length: int, meta: dict[str, Any]) -> list[ProbeTask]:
        if self.tasks is None:
            from data_prep.prepare import sha256_file

            path = tokenizer_dir(self.cfg) / "tokenizer.json"
            if not path.is_file():
                raise ConfigError(f"eval.tasks: the run's tokenizer {path} does not exist, and probes tokenize with "
                                  "it (run `make tokenizer`, or empty eval.tasks)")
            if meta.get("tokenizer_sha256") not in (None, sha256_file(path)):
                raise ConfigError(f"eval.tasks: {path} is not the tokenizer the shards were made with (meta.json's "
                                  "tokenizer_sha256): the probes would read other ids than the model learnt; run "
                                  "`make tokenizer` and `make data` again, or empty eval.tasks")
            self.tasks = [tokenize(t, path.parent, min(max_length, t.max_length)) for t in self.texts]
        return self.tasks

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # step 0 of a fresh run (the baseline), or a run resumed at a probe step, whose earlier row the loggers dropped
        if trainer.global_step % self.every == 0:
            self.run(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches:  # not the end of an optimizer step
            return
        step = trainer.global_step
        if step % self.every == 0 or step == trainer.max_steps:
            self.run(trainer, pl_module)

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float] | None:
        """Probe now; rank 0 logs and returns the metrics, the other ranks return None."""
        model = pl_module.model
        t0 = time.perf_counter()
        tasks = self._tokenized(model.cfg.max_seq_len, getattr(pl_module, "meta", {}))
        t1 = time.perf_counter()  # tokenizing happens once per run: not part of a probe's price
        e = self.cfg.eval
        rank, world = trainer.global_rank, trainer.world_size
        # every rank embeds its share (equal forward passes everywhere); rank 0 alone fits: no collective after
        features = []
        for task in tasks:
            mean, cls = embed(model, [*task.train_ids, *task.valid_ids], model.cfg.pad_token_id,
                              self.cfg.batch.micro_size * self.cfg.data.seq_len,
                              context=trainer.strategy.precision_plugin.forward_context, rank=rank,
                              world_size=world, all_gather=trainer.strategy.all_gather if world > 1 else None)
            features.append(mean if e.pooling == "mean" else cls)
        if rank != 0:
            self.seconds += time.perf_counter() - t0
            return None
        metrics: dict[str, float] = {}
        for task, x in zip(tasks, features, strict=True):
            n = len(task.train_ids)
            scores = probe_scores(x[:n], task.train_y, x[n:], task.valid_y, len(task.labels), e.l2, e.max_iter)
            metrics.update({f"probe/{task.name}/{k}": v for k, v in scores.items()})
        seconds = time.perf_counter() - t0
        self.seconds += seconds
        self.probe_seconds = time.perf_counter() - t1
        step = trainer.global_step
        metrics["probe/tokens"] = float(self.batches.offset(step) * self.cfg.data.seq_len)
        metrics["probe/seconds"] = seconds
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        self.history.append({"step": float(step), **metrics})
        shown = ", ".join(f"{t.name} accuracy {metrics[f'probe/{t.name}/accuracy']:.3f} macro-F1 "
                          f"{metrics[f'probe/{t.name}/macro_f1']:.3f}" for t in tasks)
        print(f"\nprobe at step {step:,}: {shown} ({seconds:.1f} s)", flush=True)
        return metrics


def probing_callbacks(cfg: ExperimentConfig) -> list[pl.Callback]:
    """[Probing] when eval.tasks names tasks (their files read now: one line for a bad one), else []."""
    return [Probing(cfg)] if cfg.eval is not None and cfg.eval.tasks else []


def probe_points(metrics_csv: Path) -> dict[str, list[tuple[float, float]]]:
    """{task: [(tokens trained, validation accuracy)]} from a run's CSV log, in token order; {} without probes."""
    points: dict[str, list[tuple[float, float]]] = {}
    with open(metrics_csv, newline="") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key.startswith("probe/") and key.endswith("/accuracy") and value and row.get("probe/tokens"):
                    points.setdefault(key[len("probe/"):-len("/accuracy")], []).append(
                        (float(row["probe/tokens"]), float(value)))
    return {task: sorted(p) for task, p in sorted(points.items())}


def probe_panel(ax: Any, points: dict[str, list[tuple[float, float]]]) -> None:
    """The loss plot's second panel (train.plot_losses): each task's probe accuracy against tokens trained."""
    for task, p in points.items():
        ax.plot(*zip(*p, strict=True), "o-", label=task)
    ax.set_xlabel("tokens trained")
    ax.set_ylabel("probe accuracy (validation)")
    ax.legend()
    ax.grid(alpha=0.3)
