"""Downstream evaluation: fine-tune a pretrained RoBERTa for text classification (or regression) over several
seeds, beside the same architecture trained from random initialisation, and report the task's validation metrics.

    python -m pretrain finetune --config EXPERIMENT.yaml --task configs/tasks/NAME.yaml [--finetune.seeds=5]

The model is the experiment's export, run_dir/hf (exported from the newest checkpoint first when it is missing),
or any Hugging Face RoBERTa directory (`finetune.model`); the classifier is the stock
`transformers.RobertaForSequenceClassification` on top of it, so what is saved is a model anyone can load.
The recipe is RoBERTa's for GLUE (Liu et al. 2019, Appendix C, Table 10): AdamW with betas (0.9, 0.98), eps 1e-6,
weight decay 0.1, linear warmup over the first 6% of the steps then linear decay to zero, at most 10 epochs,
early stopping on the validation metric, and the median over five seeds.

The task file and its data are `task.py`, the classifier and its LightningModule `classifier.py`, the report
`finetune_report.py`; this module runs the seeds.

Layout under run_dir/finetune/NAME/:
    seed-K/            the best validation checkpoint of seed K: save_pretrained + tokenizer, metrics.json, logs/
    scratch-seed-K/    the same from random initialisation (finetune.from_scratch)
    report.json        both variants, per seed and summarised (median, min, max); report.md, the printed table
NAME (`task.name`, or the task file's name) is a name, never a path. A seed directory carries the marker
`.roberta-pretrain` (hf/outputs.py) and is replaced by a rerun only when it has it (or holds exactly what an older
version wrote there); anything else is refused with one line before any work.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch

from data_prep.config import ExperimentConfig

from ..hf.convert import max_seq_len
from ..hf.outputs import OutputDirError, Writer, check_name, check_replaceable, mark, remove, replace
from ..training.host_memory import RetainHostMemory
from .classifier import ClassifierModule, build_model, check_model_dir, resolve_model
from .finetune_report import markdown, summarise, update_report
from .task import (
    Encoded,
    Examples,
    FinetuneConfig,
    FinetuneError,
    TaskConfig,
    TaskFile,
    encode,
    label_set,
    load_task,
    read_examples,
    targets,
    task_dir,
)

# The fine-tuning API, importable from here as before the task, classifier and report moved to their modules
__all__ = ["ClassifierModule", "Encoded", "Examples", "FinetuneConfig", "FinetuneError", "TaskConfig", "TaskFile",
           "build_model", "check_model_dir", "encode", "finetune", "label_set", "load_task", "markdown",
           "read_examples", "resolve_model", "seed_dir", "summarise", "targets", "task_dir"]


# ---------------------------------------------------------------------------------------------------------------
# Runs and seeds


_SEED_FILES = frozenset({"config.json", "model.safetensors", "metrics.json", "tokenizer.json", "tokenizer_config.json",
                         "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json",
                         "chat_template.jinja"})
SEED = Writer("a fine-tuning seed directory", "choose another task.name", files=_SEED_FILES,
              dirs={"logs": frozenset({"metrics.csv", "hparams.yaml"})},
              required=frozenset({"config.json", "metrics.json"}))
"""A finished seed: save_pretrained, the tokenizer, metrics.json and the CSV logs (all an older version wrote)."""
PARTIAL = Writer(SEED.what, SEED.fix, files=_SEED_FILES, dirs=SEED.dirs)
"""An unfinished one, seed-K.partial: any part of the same."""


def seed_dir(cfg: ExperimentConfig, task: TaskConfig, seed: int, from_scratch: bool) -> Path:
    return task_dir(cfg, task) / f"{'scratch-' if from_scratch else ''}seed-{seed}"


def check_outputs(cfg: ExperimentConfig, tf: TaskFile) -> None:
    """FinetuneError (one line) when task.name is not a name, or a seed directory a run would replace holds
    something fine-tuning did not write."""
    problem = check_name(tf.task.name, "task.name")
    if problem:
        raise FinetuneError(f"{problem}: set task.name in the task file")
    for seed in range(tf.finetune.seed, tf.finetune.seed + tf.finetune.seeds):
        final = seed_dir(cfg, tf.task, seed, tf.finetune.from_scratch)
        try:
            check_replaceable(final, SEED)
            check_replaceable(final.with_name(final.name + ".partial"), PARTIAL)
        except OutputDirError as e:
            raise FinetuneError(str(e)) from None


def finetune(cfg: ExperimentConfig, tf: TaskFile, log=print, **trainer_overrides: Any) -> dict[str, Any]:
    """Fine-tune over finetune.seeds seeds, save each seed's best model, write and print the report."""
    import transformers

    task, ft = tf.task, tf.finetune
    transformers.utils.logging.disable_progress_bar()
    # 1) the output directories, the model directory and the data, all checked before any training
    check_outputs(cfg, tf)
    model_dir = resolve_model(cfg, ft, log)
    train, valid = read_examples(task.train, task, "train"), read_examples(task.valid, task, "valid")
    names = label_set(task, train, valid) if task.problem == "classification" else []
    y_train, y_valid = targets(task, train, names), targets(task, valid, names)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    hf_config = json.loads((model_dir / "config.json").read_text())
    max_length = min(ft.max_length, max_seq_len(hf_config))
    ids_train, ids_valid = encode(tokenizer, train, max_length), encode(tokenizer, valid, max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else hf_config.get("pad_token_id", 1)
    variant = "from_scratch" if ft.from_scratch else "pretrained"
    truncated = sum(len(i) >= max_length for i in ids_train) / len(ids_train)
    log(f"finetune: {task.name}, {variant} {model_dir}: {len(ids_train):,} train / {len(ids_valid):,} valid "
        f"examples, " + (f"{len(names)} labels" if names else "regression") + f", max_length {max_length} "
        f"({truncated:.0%} of train truncated), {ft.seeds} seed(s)")

    # what a finished seed must have been run with to be reused: the model, the encoded data and every setting
    settings = {"model": _model_fingerprint(model_dir),
                "data": _data_fingerprint(ids_train, y_train, ids_valid, y_valid),
                "task": dataclasses.asdict(task),
                "finetune": {k: v for k, v in dataclasses.asdict(ft).items() if k not in ("seed", "seeds")}}
    runs = []
    lightning_log = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    level = lightning_log.level
    lightning_log.setLevel(logging.WARNING)  # "GPU available: False" and a tip, once per seed, say nothing new
    try:
        for seed in range(ft.seed, ft.seed + ft.seeds):
            done = None if trainer_overrides else _finished_seed(seed_dir(cfg, task, seed, ft.from_scratch), settings)
            if done is not None:
                log(f"seed {seed}: reusing the finished run in {done['dir']} (same model, data and settings; "
                    f"best {task.metrics[0]} {done['metrics'][task.metrics[0]]:.4f})")
                runs.append(done)
                continue
            runs.append(_one_seed(cfg, tf, seed, model_dir, tokenizer, names, max_length,
                                  Encoded(ids_train, y_train, pad_id), Encoded(ids_valid, y_valid, pad_id),
                                  settings, log, **trainer_overrides))
    finally:
        lightning_log.setLevel(level)

    report = update_report(cfg, tf, variant, model_dir, runs, names, len(ids_train), len(ids_valid), max_length)
    table = markdown(report)
    (task_dir(cfg, task) / "report.md").write_text(table)
    log("\n" + table)
    return report


def _model_fingerprint(model_dir: Path) -> dict[str, Any]:
    from data_prep.prepare import sha256_file

    return {"dir": str(model_dir.resolve()),
            **{name: sha256_file(model_dir / name) for name in ("config.json", "model.safetensors")
               if (model_dir / name).is_file()}}


def _data_fingerprint(*parts: Any) -> str:
    """sha256 of the token ids and targets: the data files, the tokenizer, max_length and the label set at once."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, np.ndarray):
            h.update(str(part.dtype).encode() + np.ascontiguousarray(part).tobytes())
        else:  # a list of token-id lists
            lengths = np.fromiter((len(x) for x in part), dtype=np.int64, count=len(part))
            h.update(lengths.tobytes() + np.fromiter((t for x in part for t in x), dtype=np.int64).tobytes())
    return h.hexdigest()


def _finished_seed(out: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The seed's recorded result when it finished with exactly these settings and its model is there."""
    try:
        result = json.loads((out / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    if result.get("settings") != json.loads(json.dumps(settings)) or not (out / "config.json").is_file():
        return None
    return result


def _subset(data: Encoded, n: int, seed: int) -> Encoded:
    if not n or n >= len(data):
        return data
    keep = np.sort(np.random.default_rng(seed).choice(len(data), n, replace=False))
    return Encoded([data.ids[i] for i in keep], data.y[keep], data.pad_id)


def _one_seed(cfg: ExperimentConfig, tf: TaskFile, seed: int, model_dir: Path, tokenizer: Any, names: list[str],
              max_length: int, train: Encoded, valid: Encoded, settings: dict[str, Any], log,
              **trainer_overrides: Any) -> dict[str, Any]:
    from pytorch_lightning.callbacks import EarlyStopping
    from pytorch_lightning.loggers import CSVLogger

    task, ft = tf.task, tf.finetune
    final = seed_dir(cfg, task, seed, ft.from_scratch)
    out = final.with_name(final.name + ".partial")  # renamed over `final` only when complete
    remove(out, PARTIAL)
    out.mkdir(parents=True)
    mark(out, f"fine-tuning of {task.name}, seed {seed}")
    t0 = time.perf_counter()
    pl.seed_everything(seed, workers=True, verbose=False)
    train = _subset(train, ft.max_train_examples, seed)
    model = build_model(model_dir, task, names, ft.from_scratch).train()  # from_pretrained returns eval mode
    generator = torch.Generator().manual_seed(seed)
    train_loader = torch.utils.data.DataLoader(train, batch_size=ft.batch_size, shuffle=True, generator=generator,
                                               collate_fn=train.collate)
    # validation in length order: less padding, and the metrics do not depend on the order
    order = sorted(range(len(valid)), key=lambda i: len(valid.ids[i]))
    valid_loader = torch.utils.data.DataLoader(order, batch_size=max(ft.batch_size, 64), collate_fn=valid.collate)
    steps_per_epoch = len(train_loader)
    module = ClassifierModule(model, ft, task, total_steps=steps_per_epoch * ft.epochs, log=log)
    # the experiment's host-memory setting (training/host_memory.py): fine-tuning allocates the same tensors every step too
    memory = [RetainHostMemory()] if cfg.trainer.retain_host_memory else []
    stop = [EarlyStopping(monitor=f"val/{task.metrics[0]}", mode="max", patience=ft.patience,
                          check_on_train_epoch_end=False)] if ft.patience else []
    kwargs: dict[str, Any] = dict(
        max_epochs=ft.epochs, accelerator=ft.accelerator, devices=1, precision=ft.precision,
        logger=CSVLogger(save_dir=str(out), name="logs", version=""), callbacks=[*memory, *stop],
        enable_checkpointing=False,
        num_sanity_val_steps=0, val_check_interval=1.0 / ft.evals_per_epoch if ft.evals_per_epoch > 1 else None,
        log_every_n_steps=max(1, min(50, steps_per_epoch // 4)), enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(out),
    )
    kwargs.update(trainer_overrides)
    log(f"seed {seed}: {'random initialisation' if ft.from_scratch else 'pretrained encoder, new head'}, "
        f"{len(train):,} examples, {steps_per_epoch} steps per epoch, at most {ft.epochs} epochs")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")  # pre-tokenized: cheap
        warnings.filterwarnings("ignore", message=".*isinstance.treespec, LeafSpec.*")  # Lightning vs torch 2.13
        trainer = pl.Trainer(**kwargs)
        trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=valid_loader)
    assert module.best is not None and module.best_state is not None, "fine-tuning ran no validation"

    # the best validation's weights, as a stock transformers directory
    model.load_state_dict(module.best_state)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    seconds = time.perf_counter() - t0
    result = {"seed": seed, "metrics": module.best["metrics"], "best_step": module.best["step"],
              "best_epoch": module.best["epoch"], "steps": trainer.global_step,
              "stopped_early": trainer.global_step < steps_per_epoch * ft.epochs, "seconds": round(seconds, 1),
              "train_examples": len(train), "max_length": max_length, "dir": str(final), "history": module.history,
              "settings": settings}
    (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    # the finished seed replaces an earlier one only now: an interrupted run never leaves a half-written model
    replace(out, final, SEED)
    log(f"seed {seed}: best {task.metrics[0]} {module.best['metrics'][task.metrics[0]]:.4f} at step "
        f"{module.best['step']}; {trainer.global_step} steps in {seconds:.0f} s; saved {final}")
    return result
