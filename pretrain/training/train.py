"""Build the Lightning Trainer for an experiment and run it: fresh, or from the run's last checkpoint."""

from __future__ import annotations

import csv
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import yaml
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, Logger
from pytorch_lightning.utilities import rank_zero_only

from data_prep.config import ExperimentConfig, config_from_dict, parse_duration
from data_prep.redact import redact_argv, redact_config

from ..hf.export import HFExportCallback
from .budget import OPEN_ENDED, TimeBudget
from .checkpoint import (
    AtomicCheckpointIO,
    PreemptionCheckpoint,
    checkpoint_versions,
    probe,
    read_record,
    resumable_checkpoint,
)
from .data import ShardDataModule, batch_geometry
from .host_memory import RetainHostMemory
from .module import MLMModule
from .probing import probe_panel, probe_points, probing_callbacks
from .rollback import Diverged, RollbackGuard, RollbackState, TrainingDiverged, describe_skipped
from .sharding import ShardedStrategy
from .throughput import Throughput


class NothingToResume(FileNotFoundError):
    """`make resume` on a run without checkpoints."""


class TrainingIncomplete(RuntimeError):
    """Training stopped before max_steps for a reason other than a signal: never reported as done."""


def checkpoint_dir(cfg: ExperimentConfig) -> Path:
    return cfg.run_path / "checkpoints"


def last_checkpoint(cfg: ExperimentConfig, log=print, exclude: frozenset[tuple[int, int, int]] = frozenset(),
                    ) -> tuple[Path, int] | None:
    """(path, step) of the newest complete checkpoint of the run, or None; `exclude`: the versions of files not
    to consider (`checkpoint.checkpoint_versions`, e.g. an older run's)."""
    directory = checkpoint_dir(cfg)
    return resumable_checkpoint(directory, log, exclude) if directory.is_dir() else None


def training_data(cfg: ExperimentConfig, log=print) -> Path:
    """meta.json of the shards the run trains on: those at `data.shards_url`, fetched into this node's cache
    (data_prep/fetch.py), or else the ones `make data` prepares (or finds up to date) under run_dir. Every
    process calls it; each way holds a file lock, so one process per node (or run_dir) does the work."""
    if cfg.data.shards_url:
        from data_prep.fetch import fetch_shards

        return fetch_shards(cfg, log)  # its log lines name the URL without credentials (fetch.py)
    from data_prep.prepare import prepare_data

    return prepare_data(cfg, log=log)


def world_size(cfg: ExperimentConfig) -> int:
    """Devices x nodes, resolving `devices: auto` the way Lightning does."""
    t = cfg.trainer
    if isinstance(t.devices, int):
        devices = t.devices
    elif t.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        devices = torch.cuda.device_count()
    else:
        devices = 1
    return devices * t.num_nodes


def persisted_config(cfg: ExperimentConfig) -> str:
    """logs/config.yaml: the resolved config as YAML, its secrets redacted (data_prep/redact.py)."""
    return yaml.safe_dump(redact_config(cfg.to_dict()), sort_keys=False)


def make_loggers(cfg: ExperimentConfig, resume_step: int | None = None) -> list[Logger]:
    loggers: list[Logger] = [_csv_logger(cfg, resume_step)]
    if cfg.logger.wandb is not None:
        from pytorch_lightning.loggers import WandbLogger

        kwargs = {"mode": "offline", **cfg.logger.wandb}  # offline unless the user asks for online
        if kwargs["mode"] == "online" and not (os.environ.get("WANDB_API_KEY") or Path("~/.netrc").expanduser().exists()):
            kwargs["mode"] = "offline"  # never block on a login prompt
        wandb = WandbLogger(save_dir=str(cfg.run_path / "logs"), config=redact_config(cfg.to_dict()), **kwargs)
        # wandb.init now (rank 0), while sys.argv, which wandb keeps in its run files, holds no secret
        saved, sys.argv = sys.argv, sys.argv[:1] + redact_argv(sys.argv[1:])
        try:
            wandb.experiment  # noqa: B018 - the property starts the run
        finally:
            sys.argv = saved
        loggers.append(wandb)
    if cfg.logger.tensorboard:
        from pytorch_lightning.loggers import TensorBoardLogger

        # run_dir/logs/tensorboard; on resume, purge_step hides the earlier events from the checkpoint's step
        # on, which are about to be logged again (as the CSV logger keeps only the rows before it)
        loggers.append(TensorBoardLogger(save_dir=str(cfg.run_path / "logs"), name="tensorboard", version="",
                                         default_hp_metric=False, purge_step=resume_step))
    return loggers


def _csv_logger(cfg: ExperimentConfig, resume_step: int | None) -> CSVLogger:
    """`logs/metrics.csv`, keeping on resume the rows logged before the checkpoint's step (Lightning's CSV
    logger would delete the file, and rows after that step are about to be logged again)."""
    path = cfg.run_path / "logs" / "metrics.csv"
    kept: list[dict[str, str]] = []
    if resume_step is not None and path.is_file():
        with open(path, newline="") as f:
            kept = [row for row in csv.DictReader(f) if row.get("step") and int(row["step"]) < resume_step]
    logger = CSVLogger(save_dir=str(cfg.run_path), name="logs", version="")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*exists and is not empty")  # handled here
        writer = logger.experiment  # creating it removes the old file
    for row in kept:
        writer.log_metrics({k: float(v) for k, v in row.items() if v not in ("", None) and k != "step"},
                           int(row["step"]))
    return logger


class StepCheckpoint(ModelCheckpoint):
    """Lightning's step checkpoints, plus one at the final step when max_steps is not a multiple of
    every_n_steps (Lightning saves at epoch ends only when no step interval is set).

    The final one is saved at the end of the last optimizer step, like every other step checkpoint, and not at
    `on_train_end`: by then Lightning has marked the (single) epoch finished, so such a checkpoint could not be
    resumed with a larger max_steps, and after a preemption stop it would overwrite the exact `last.ckpt`."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # Only at the end of an optimizer step. Lightning's own test (global_step % every_n_steps, not yet saved at
        # this step) also fires on the first micro-batch after a resume at a checkpoint step, since it does not
        # restore the step it last saved at: that file, saved mid-step, would resume out of step.
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        final = trainer.max_steps > 0 and trainer.global_step == trainer.max_steps
        if (final and trainer.global_step != self._last_global_step_saved
                and not self._should_skip_saving_checkpoint(trainer)):
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Nothing: Lightning 2.6 saves `last` here when this callback has not saved it yet (a preemption stop before
        the first step checkpoint), which wrote an end-of-epoch copy of the preempted step beside the exact
        `last.ckpt`. The final step and a preemption save themselves (above; PreemptionCheckpoint)."""

    def _save_last_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, Any]) -> None:
        # `last.ckpt` is always the run_dir's newest checkpoint. Lightning's version counter writes `last-v1.ckpt`
        # when a `last.ckpt` it did not write itself is there (PreemptionCheckpoint's, or an earlier run's), and
        # `last.ckpt` then stayed behind for good; the file is replaced atomically (AtomicCheckpointIO).
        self.last_model_path = self.format_checkpoint_name(monitor_candidates, self.CHECKPOINT_NAME_LAST)
        super()._save_last_checkpoint(trainer, monitor_candidates)


def progress_bar() -> pl.Callback:
    """Lightning's progress bar (rich when installed), showing the loss the module read at its last logging step.
    The stock way, `self.log(..., prog_bar=True)`, has Lightning read the value on the host after every batch."""
    from pytorch_lightning.callbacks import RichProgressBar, TQDMProgressBar
    from pytorch_lightning.callbacks.progress.rich_progress import _RICH_AVAILABLE

    class StepLossBar(RichProgressBar if _RICH_AVAILABLE else TQDMProgressBar):
        def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
            metrics = super().get_metrics(trainer, pl_module)
            if getattr(pl_module, "shown_loss", None) is not None:
                metrics["loss"] = f"{pl_module.shown_loss:.3f}"
            return metrics

        def set_total_steps(self, trainer: pl.Trainer) -> None:
            """The bar's length once a time budget has fixed max_steps (budget.py); Lightning counts batches."""
            total = trainer.max_steps * trainer.accumulate_grad_batches
            if getattr(self, "train_progress_bar_id", None) is not None and self.progress is not None:
                self.progress.update(self.train_progress_bar_id, total=total)
            elif getattr(self, "_train_progress_bar", None) is not None:
                self.train_progress_bar.total = total

    return StepLossBar()


class _NoAdverts(logging.Filter):
    """Drops Lightning's "Tip: try installing litlogger" line, printed by every Trainer: a run's console holds
    what its user needs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in str(record.msg)


def make_strategy(cfg: ExperimentConfig) -> str | pl.strategies.Strategy:
    """`trainer.strategy` for Lightning; `fsdp` becomes FSDP2 with sharded, atomically written checkpoints (sharding.py)."""
    return ShardedStrategy() if cfg.trainer.strategy == "fsdp" else cfg.trainer.strategy


def make_trainer(cfg: ExperimentConfig, callbacks: list[pl.Callback] | None = None, resume_step: int | None = None,
                 **overrides: Any) -> pl.Trainer:
    t = cfg.trainer
    accumulation = batch_geometry(cfg.batch.global_size, cfg.batch.micro_size, world_size(cfg))
    saving = [] if overrides.get("enable_checkpointing") is False else [StepCheckpoint(
        dirpath=checkpoint_dir(cfg), filename="step-{step:07d}", auto_insert_metric_name=False,
        every_n_train_steps=cfg.checkpoint.every_n_steps, save_last=True,
        save_top_k=cfg.checkpoint.keep_last, monitor="step", mode="max",
    ), PreemptionCheckpoint(checkpoint_dir(cfg) / "last.ckpt")]
    exporting = [HFExportCallback(cfg)] if saving and cfg.checkpoint.export_hf else []  # run_dir/hf per save
    # before every checkpoint callback (Lightning runs ModelCheckpoints last): no save after a bad step
    guard = [RollbackGuard(cfg.checkpoint.every_n_steps, t.log_every_n_steps)]
    bar = [progress_bar()] if overrides.get("enable_progress_bar", True) else []
    memory = [RetainHostMemory()] if t.retain_host_memory else []
    throughput = [Throughput(cfg.data.seq_len, cfg.masking.probability, t.precision, t.peak_flops, t.log_every_n_steps,
                             t.last_layer_subset)]
    # a time budget decides before any checkpoint callback saves at the same step, so that a checkpoint of the
    # decision step carries the decision and an earlier one the budget's progress (budget.py)
    callbacks = list(callbacks or [])
    budget = [c for c in callbacks if isinstance(c, TimeBudget)]
    callbacks = [c for c in callbacks if not isinstance(c, TimeBudget)]
    kwargs: dict[str, Any] = dict(
        # One Lightning epoch is the whole run: the sampler's stream already spans the data epochs (samplers.py).
        max_steps=t.max_steps, max_epochs=1, precision=t.precision, accelerator=t.accelerator, devices=t.devices,
        num_nodes=t.num_nodes, strategy=make_strategy(cfg), accumulate_grad_batches=accumulation,
        # Lightning counts validation intervals in micro-batches; the config counts optimizer steps.
        val_check_interval=t.val_check_interval * accumulation, check_val_every_n_epoch=None,
        log_every_n_steps=t.log_every_n_steps, gradient_clip_val=cfg.optim.grad_clip or None,
        use_distributed_sampler=False,  # our samplers split the data by rank themselves (see samplers.py)
        num_sanity_val_steps=0, default_root_dir=str(cfg.run_path), logger=make_loggers(cfg, resume_step),
        callbacks=[*memory, *guard, *budget, *throughput, *saving, *exporting, *bar, *callbacks],
        plugins=[AtomicCheckpointIO()], enable_model_summary=False,  # Throughput prints the model's line
    )
    kwargs.update(overrides)
    lightning_log = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    if not any(isinstance(f, _NoAdverts) for f in lightning_log.filters):
        lightning_log.addFilter(_NoAdverts())
    return pl.Trainer(**kwargs)


def fit(cfg: ExperimentConfig, meta_path: Path, resume: bool | None = None, callbacks: list[pl.Callback] | None = None,
        ckpt: str | Path | None = None, **trainer_overrides: Any) -> pl.Trainer:
    """Train. resume=None: continue from last.ckpt when there is one; True: require it; False: start fresh.
    `ckpt`: continue from this checkpoint instead, of this run or another (e.g. a stable-phase checkpoint of a
    wsd run, continued into its decay in a new run_dir).

    A bad step (non-finite or spiking loss, rollback.py) rolls the run back with the bad steps' data skipped, up
    to `optim.max_rollbacks` times: to the newest checkpoint this run wrote, else the one it started from (`ckpt`
    or the resumed one), else its initial weights; never to a file an older run left in run_dir. A run that
    ends before max_steps without a signal raises `TrainingIncomplete`, never returns as if done."""
    callbacks = [*(callbacks or []), *probing_callbacks(cfg)]  # eval.tasks' probes, their files read now
    found = last_checkpoint(cfg) if resume is not False else None
    if ckpt is not None:
        step, problem = probe(Path(ckpt))
        if problem is not None:
            raise NothingToResume(f"checkpoint {ckpt} cannot be resumed: {problem}")
        found = (Path(ckpt), step)
    if resume and found is None:
        raise NothingToResume(f"{checkpoint_dir(cfg)}/last.ckpt does not exist: nothing to resume (run `make pretrain`)")
    cfg.run_path.mkdir(parents=True, exist_ok=True)
    (cfg.run_path / "logs").mkdir(exist_ok=True)
    (cfg.run_path / "logs" / "config.yaml").write_text(persisted_config(cfg))
    start = found
    older = checkpoint_versions(checkpoint_dir(cfg))  # what was there before this run wrote anything
    override: RollbackState | None = None
    while True:
        try:
            trainer = _fit_once(cfg, meta_path, found, override, callbacks, trainer_overrides)
            break
        except Diverged as d:
            state = d.rollbacks
            # checkpoints are only written after a check, so this run's newest is good
            found = last_checkpoint(cfg, exclude=older) or start
            if len(state.events) >= cfg.optim.max_rollbacks:
                where = f"{found[0]} (step {found[1]})" if found else "none (no checkpoint was written)"
                raise TrainingDiverged(
                    f"{d} after {len(state.events)} rollback(s) (optim.max_rollbacks={cfg.optim.max_rollbacks}): "
                    f"stopping. Last good checkpoint: {where}. Lower optim.peak_lr, raise optim.warmup_steps or "
                    "set optim.grad_clip (or optim.rollback_lr_factor)") from None
            override = state.after(d, found[1] if found else 0)
            _report_rollback(cfg, d, override)
    _check_complete(cfg, trainer)
    return trainer


def _fit_once(cfg: ExperimentConfig, meta_path: Path, found: tuple[Path, int] | None,
              rollbacks: RollbackState | None, callbacks: list[pl.Callback] | None,
              trainer_overrides: dict[str, Any]) -> pl.Trainer:
    pl.seed_everything(cfg.seed, workers=True, verbose=False)  # the initialisation; steps reseed (steps.py)
    ckpt, step = found if found else (None, None)
    cfg, budget = budgeted(cfg, ckpt)
    datamodule = ShardDataModule(cfg, meta_path)
    module = MLMModule(cfg.to_dict(), datamodule.meta)
    if rollbacks is not None:  # replaces the checkpoint's record when it is loaded
        module.rollbacks = module.rollback_override = rollbacks
    trainer = make_trainer(cfg, [*budget, *(callbacks or [])], resume_step=step, **trainer_overrides)
    with warnings.catch_warnings():
        # expected when resuming into the same run_dir; the checkpoint callback keeps what it should
        warnings.filterwarnings("ignore", message="Checkpoint directory .* exists and is not empty")
        warnings.filterwarnings("ignore", message=".*isinstance.treespec, LeafSpec.*")  # Lightning vs torch 2.13
        # Lightning cannot see it, but our sampler resumes mid-epoch exactly, by arithmetic (samplers.py)
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")
        # `resume --ckpt` from another run_dir: its best-k bookkeeping is of no use here, as Lightning says
        warnings.filterwarnings("ignore", message="The dirpath has changed from")
        # validation sums are reduced over ranks by hand before they are logged (module_validation.py): nothing to sync
        warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\('val/")
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt else None)
        except SystemExit:
            if not trainer.interrupted:
                raise
            # Ctrl-C: Lightning shuts down and exits with 1 and no word; say what is left, and exit as Ctrl-C does
            last = last_checkpoint(cfg)
            raise KeyboardInterrupt(f"`make resume` continues from {last[0]} (step {last[1]})" if last
                                    else "no checkpoint was written") from None
    return trainer


def budgeted(cfg: ExperimentConfig, ckpt: Path | None) -> tuple[ExperimentConfig, list[pl.Callback]]:
    """With `trainer.max_time`: the config with the max_steps its checkpoint's budget decided, or an open-ended
    one and the callback that decides it (budget.py). Without, the config as it is."""
    if cfg.trainer.max_time is None:
        return cfg, []
    decision = read_record(ckpt, "budget") if ckpt is not None else None
    cfg = config_from_dict(cfg.to_dict())  # a copy: the caller's config keeps its own max_steps
    cfg.trainer.max_steps = int(decision["max_steps"]) if decision else OPEN_ENDED
    if decision:
        return cfg, []
    return cfg, [TimeBudget(parse_duration(cfg.trainer.max_time, "trainer.max_time"), cfg.trainer.calibration_steps,
                            cfg.run_path)]


def _report_rollback(cfg: ExperimentConfig, d: Diverged, state: RollbackState) -> None:
    """One line on the console and one JSON line in logs/rollbacks.jsonl (rank 0)."""
    if getattr(rank_zero_only, "rank", 0) != 0:
        return
    event = state.events[-1]
    print(f"\nrollback {len(state.events)}/{cfg.optim.max_rollbacks}: {d}; resuming from step "
          f"{event['resumed_from']} with the data of steps {describe_skipped(event['skipped_data_steps'])} skipped"
          + (f", learning rate x{cfg.optim.rollback_lr_factor ** len(state.events):g}"
             if cfg.optim.rollback_lr_factor != 1 else ""), flush=True)
    with open(cfg.run_path / "logs" / "rollbacks.jsonl", "a") as f:
        f.write(json.dumps(event) + "\n")


def _check_complete(cfg: ExperimentConfig, trainer: pl.Trainer) -> None:
    """Raise `TrainingIncomplete` when the run stopped before its max_steps and no signal asked it to."""
    if trainer.global_step >= trainer.max_steps:
        return
    if any(isinstance(c, PreemptionCheckpoint) and c.stopped for c in trainer.callbacks):
        return
    why = ("Lightning stopped it (trainer.should_stop)" if trainer.should_stop
           else "Lightning ended its epoch (max_epochs=1): the data loader ran out")
    raise TrainingIncomplete(
        f"training stopped at step {trainer.global_step} of trainer.max_steps={trainer.max_steps}: {why}; "
        f"the newest checkpoint is in {checkpoint_dir(cfg)} (`make resume` continues from it)")


def plot_losses(metrics_csv: Path, out_png: Path) -> Path | None:
    """Training and validation loss against step, from Lightning's CSV log; probe accuracy beside it (probing.py)."""
    if not metrics_csv.is_file():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, valid = [], []
    probes = probe_points(metrics_csv)  # task -> [(tokens, accuracy)], when the run probed
    with open(metrics_csv) as f:
        for row in csv.DictReader(f):
            if row.get("train/loss"):
                train.append((int(row["step"]), float(row["train/loss"])))
            if row.get("val/loss"):
                valid.append((int(row["step"]), float(row["val/loss"])))
    fig, ((ax, *right),) = plt.subplots(1, 2 if probes else 1, figsize=(12 if probes else 7, 4), squeeze=False)
    if train:
        ax.plot(*zip(*train, strict=True), label="train MLM loss", alpha=0.7)
    if valid:
        ax.plot(*zip(*valid, strict=True), "o-", label="validation MLM loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats)")
    ax.legend()
    ax.grid(alpha=0.3)
    if right:
        probe_panel(right[0], probes)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
