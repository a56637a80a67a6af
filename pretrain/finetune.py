"""Downstream evaluation: fine-tune a pretrained RoBERTa for text classification (or regression) over several
seeds, beside the same architecture trained from random initialisation, and report the task's validation metrics.

    python -m pretrain finetune --config EXPERIMENT.yaml --task configs/tasks/NAME.yaml [--finetune.seeds=5]

The model is the experiment's export, run_dir/hf (exported from the newest checkpoint first when it is missing),
or any Hugging Face RoBERTa directory (`finetune.model`); the classifier is the stock
`transformers.RobertaForSequenceClassification` on top of it, so what is saved is a model anyone can load.
The recipe is RoBERTa's for GLUE (Liu et al. 2019, Appendix C, Table 10): AdamW with betas (0.9, 0.98), eps 1e-6,
weight decay 0.1, linear warmup over the first 6% of the steps then linear decay to zero, at most 10 epochs,
early stopping on the validation metric, and the median over five seeds.

Layout under run_dir/finetune/NAME/:
    seed-K/            the best validation checkpoint of seed K: save_pretrained + tokenizer, metrics.json, logs/
    scratch-seed-K/    the same from random initialisation (finetune.from_scratch)
    report.json        both variants, per seed and summarised (median, min, max); report.md, the printed table
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytorch_lightning as pl
import torch
import yaml

from data_prep.config import ConfigError, ExperimentConfig, apply_overrides, from_mapping, option

from .metrics import CLASSIFICATION, REGRESSION, compute
from .module import adamw, lr_lambda


class FinetuneError(ValueError):
    """A problem with the task's data or the model to fine-tune: one line naming the file, field or directory."""


# ---------------------------------------------------------------------------------------------------------------
# 1) The task file: a `task:` section (the data) and a `finetune:` section (the hyperparameters)


@dataclass
class TaskConfig:
    name: str = option("", "Names the output directory, run_dir/finetune/NAME; empty: the task file's name.")
    train: str = option("", "Training examples: a .jsonl, .csv or .parquet file, or hf:NAME[/CONFIG][:SPLIT] for a "
                        "`datasets` dataset (hf:glue/sst2:train; an owner-qualified name is hf:owner/name/config).")
    valid: str = option("", "Validation examples, same forms (hf:glue/mnli:validation_matched); metrics are reported "
                        "on these.")
    text_field: str = option("text", "The field holding the text (the first text of pair tasks).")
    pair_field: str | None = option(None, "The field holding the second text of pair tasks (MNLI's hypothesis); "
                                      "null: single-text task.")
    label_field: str = option("label", "The field holding the label: a string or an integer (classification), a "
                                   "number (regression).")
    problem: Literal["classification", "regression"] = option(
        "classification", "classification: the label set is read from the training data (or `labels`) and saved "
                          "as the model's id2label | regression: one output trained with MSE (STS-B).")
    labels: list[str] = option([], "Classification: the label set in id order; empty: the distinct training labels, "
                               "sorted (numerically when they are integers).")
    metrics: list[str] = option(["accuracy"], "Reported metrics; the first drives early stopping and model selection. "
                                          "Classification: accuracy, f1 (binary, of label id 1), macro_f1, "
                                          "matthews. Regression: pearson, spearman.")

    def __post_init__(self) -> None:
        for key in ("train", "valid"):
            if not getattr(self, key):
                raise ConfigError(f"task.{key} is required: a .jsonl, .csv or .parquet file, or hf:NAME[/CONFIG]:SPLIT")
        allowed = CLASSIFICATION if self.problem == "classification" else REGRESSION
        unknown = [m for m in self.metrics if m not in allowed]
        if unknown or not self.metrics:
            raise ConfigError(f"task.metrics={self.metrics}: {self.problem} metrics are {', '.join(allowed)} "
                              "(at least one)")
        if self.problem == "regression" and self.labels:
            raise ConfigError("task.labels is for classification; a regression task has no label set")


@dataclass
class FinetuneConfig:
    model: str | None = option(None, "A Hugging Face RoBERTa directory to fine-tune; null: the experiment's export, "
                                 "run_dir/hf (exported from the newest checkpoint first when missing).")
    from_scratch: bool = option(False, "Train the same architecture (the model's config.json) from random "
                                   "initialisation: the baseline that shows what pretraining bought.")
    seeds: int = option(1, "Runs, with seeds seed, seed+1, ...; the report gives the median and spread (RoBERTa: "
                       "the median of 5).")
    seed: int = option(0, "The first seed: it fixes the classifier's initialisation, dropout and the data order.")
    max_length: int = option(512, "Tokens per example (both texts of a pair), truncated; at most the model's "
                              "positions. Batches are padded to their longest example only.")
    epochs: int = option(10, "Training epochs at most (RoBERTa: 10).")
    batch_size: int = option(32, "Examples per optimizer step (RoBERTa: 16 or 32).")
    peak_lr: float = option(2.0e-5, "Learning rate at the end of warmup (RoBERTa: 1e-5, 2e-5 or 3e-5 for base/large).")
    warmup_ratio: float = option(0.06, "Share of the steps spent in linear warmup; then linear decay to zero "
                                   "(RoBERTa: 0.06).")
    weight_decay: float = option(0.1, "Decoupled weight decay, not on biases and LayerNorm (RoBERTa: 0.1).")
    betas: list[float] = option([0.9, 0.98], "Adam betas (RoBERTa: 0.9, 0.98).")
    eps: float = option(1.0e-6, "Adam epsilon (RoBERTa: 1e-6).")
    evals_per_epoch: int = option(1, "Validations per epoch; the best one's model is kept.")
    patience: int = option(3, "Stop after this many validations without a better first metric; 0: never stop early.")
    max_train_examples: int = option(0, "Train on a seeded random subset of this many examples; 0: all of them.")
    accelerator: str = option("auto", "Lightning accelerator: auto, cpu, gpu.")
    precision: str = option("32-true", "Lightning precision: 32-true, bf16-mixed, 16-mixed.")

    def __post_init__(self) -> None:
        for key in ("seeds", "max_length", "epochs", "batch_size", "evals_per_epoch"):
            if getattr(self, key) < 1:
                raise ConfigError(f"finetune.{key}={getattr(self, key)} must be at least 1")
        if self.patience < 0 or self.max_train_examples < 0:
            raise ConfigError("finetune.patience and finetune.max_train_examples must be >= 0")
        if self.peak_lr <= 0 or self.eps <= 0 or self.weight_decay < 0 or not 0 <= self.warmup_ratio < 1:
            raise ConfigError("finetune.peak_lr and finetune.eps must be positive, weight_decay >= 0, "
                              "warmup_ratio in [0, 1)")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"finetune.betas={self.betas} must be two numbers in [0, 1)")


@dataclass
class TaskFile:
    task: TaskConfig = option(None, "The labelled data and its metrics.")
    finetune: FinetuneConfig = option(None, "Fine-tuning hyperparameters.")


def load_task(path: str | Path, overrides: list[str] | None = None) -> TaskFile:
    """Read a task YAML and apply dotted overrides (`--finetune.seeds=5`, `--task.valid=...`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"task file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise ConfigError(f"{path}{f':{mark.line + 1}' if mark else ''}: not valid YAML "
                          f"({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping with task: and finetune: sections")
    try:
        tf = from_mapping(TaskFile, apply_overrides(data, overrides or []), "")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    tf.task.name = tf.task.name or path.stem
    return tf


# ---------------------------------------------------------------------------------------------------------------
# 2) Labelled data: local files or a `datasets` split; labels to ids


@dataclass
class Examples:
    source: str
    texts: list[str]
    pairs: list[str] | None
    labels: list[Any]  # raw: strings for classification, floats for regression
    class_names: list[str] | None = None  # a `datasets` ClassLabel's names


def _hf_split(source: str, default_split: str) -> tuple[str, str | None, str]:
    """hf:NAME[/CONFIG][:SPLIT] -> (name, config, split); hf:owner/name/config for owner-qualified names."""
    spec, _, split = source.removeprefix("hf:").partition(":")
    parts = spec.split("/")
    if len(parts) == 3:
        return f"{parts[0]}/{parts[1]}", parts[2], split or default_split
    return parts[0], parts[1] if len(parts) == 2 else None, split or default_split


def _missing(key: str, field: str, source: str, columns: list[str]) -> FinetuneError:
    return FinetuneError(f"{key}={field!r}: {source} has no such field (its fields: {', '.join(columns) or 'none'})")


def read_examples(source: str, task: TaskConfig, which: str) -> Examples:
    """The text(s) and raw label of every example of `source`; one clear line for a missing file or field."""
    fields = {"task.text_field": task.text_field, "task.label_field": task.label_field}
    if task.pair_field:
        fields["task.pair_field"] = task.pair_field
    class_names = None
    if source.startswith("hf:"):
        import datasets

        name, config, split = _hf_split(source, "train" if which == "train" else "validation")
        try:
            ds = datasets.load_dataset(name, config, split=split)
        except Exception as e:  # noqa: BLE001 - offline, unknown name or split: datasets raises many types
            raise FinetuneError(f"task.{which}={source}: cannot load dataset {name!r} config {config!r} split "
                                f"{split!r} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        for key, field in fields.items():
            if field not in ds.column_names:
                raise _missing(key, field, source, ds.column_names)
        feature = ds.features[task.label_field]
        class_names = list(feature.names) if hasattr(feature, "names") else None
        columns = {f: list(ds[f]) for f in fields.values()}
    else:
        columns = _read_local(Path(source), list(fields.values()), fields, which)
    labels = columns[task.label_field]
    if not labels:
        raise FinetuneError(f"task.{which}={source}: no examples")
    for i, label in enumerate(labels):
        if label is None or (class_names is not None and label < 0):  # GLUE's test splits carry -1
            raise FinetuneError(f"task.{which}={source}: example {i + 1} has no label in field {task.label_field!r}")
    if class_names is not None:
        labels = [class_names[i] for i in labels]
    return Examples(source, [str(t) for t in columns[task.text_field]],
                    [str(t) for t in columns[task.pair_field]] if task.pair_field else None, labels, class_names)


def _read_local(path: Path, names: list[str], fields: dict[str, str], which: str) -> dict[str, list[Any]]:
    if not path.is_file():
        raise FinetuneError(f"task.{which}={path}: file does not exist")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        columns = pq.read_schema(path).names
        for key, field in fields.items():
            if field not in columns:
                raise _missing(key, field, str(path), columns)
        return pq.read_table(path, columns=list(dict.fromkeys(names))).to_pydict()
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns = list(reader.fieldnames or [])
            for key, field in fields.items():
                if field not in columns:
                    raise _missing(key, field, str(path), columns)
            rows = list(reader)
        return {n: [r[n] if r[n] != "" else None for r in rows] for n in names}
    if suffix in (".jsonl", ".json"):
        out: dict[str, list[Any]] = {n: [] for n in names}
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise FinetuneError(f"{path}:{line_no}: not valid JSON ({e})") from None
                for key, field in fields.items():
                    if field not in row:
                        if line_no == 1:
                            raise _missing(key, field, str(path), list(row))
                        raise FinetuneError(f"{path}:{line_no}: no field {field!r} ({key})")
                for n in names:
                    out[n].append(row[n])
        return out
    raise FinetuneError(f"task.{which}={path}: unknown format {suffix!r} (use .jsonl, .csv or .parquet, "
                        "or hf:NAME[/CONFIG]:SPLIT)")


def _label_key(label: Any) -> tuple[int, float, str]:
    """Integers (also as strings, as CSV gives them) sort numerically, before other strings."""
    s = str(label)
    try:
        return (0, float(int(s)), s)
    except ValueError:
        return (1, 0.0, s)


def label_set(task: TaskConfig, train: Examples, valid: Examples) -> list[str]:
    """The classes in id order, checked against both splits."""
    seen = {str(v) for v in train.labels}
    if task.labels:
        names = list(task.labels)
    elif train.class_names is not None:
        names = list(train.class_names)
    else:
        names = sorted(seen, key=_label_key)
    if len(seen) < 2:
        raise FinetuneError(f"task.train={train.source}: field {task.label_field!r} has one label only "
                            f"({next(iter(seen))!r}); classification needs at least two")
    for split in (train, valid):
        extra = sorted({str(v) for v in split.labels} - set(names), key=_label_key)
        if extra:
            where = "task.labels" if task.labels else f"the training data ({train.source})"
            raise FinetuneError(f"{split.source}: label {extra[0]!r} of field {task.label_field!r} is not in "
                                f"{where}" + (f" ({len(extra)} such labels)" if len(extra) > 1 else ""))
    return names


def targets(task: TaskConfig, ex: Examples, names: list[str]) -> np.ndarray:
    if task.problem == "regression":
        try:
            return np.asarray([float(v) for v in ex.labels], dtype=np.float32)
        except (TypeError, ValueError):
            bad = next(v for v in ex.labels if not _is_number(v))
            raise FinetuneError(f"{ex.source}: label {bad!r} of field {task.label_field!r} is not a number "
                                "(task.problem is regression)") from None
    index = {n: i for i, n in enumerate(names)}
    return np.asarray([index[str(v)] for v in ex.labels], dtype=np.int64)


def _is_number(v: Any) -> bool:
    try:
        float(v)
    except (TypeError, ValueError):
        return False
    return True


class Encoded(torch.utils.data.Dataset):
    """Token ids of each example (unpadded) and its target; batches are padded to their longest example."""

    def __init__(self, ids: list[list[int]], y: np.ndarray, pad_id: int):
        self.ids, self.y, self.pad_id = ids, y, pad_id

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> int:
        return i

    def collate(self, index: list[int]) -> dict[str, torch.Tensor]:
        T = max(len(self.ids[i]) for i in index)
        input_ids = torch.full((len(index), T), self.pad_id, dtype=torch.long)  # (B, T)
        for row, i in enumerate(index):
            input_ids[row, : len(self.ids[i])] = torch.tensor(self.ids[i])
        return {"input_ids": input_ids, "attention_mask": input_ids.ne(self.pad_id).long(),
                "labels": torch.from_numpy(self.y[index]), "index": torch.tensor(index)}


def encode(tokenizer: Any, ex: Examples, max_length: int) -> list[list[int]]:
    # pairs: <s> A </s></s> B </s>, the longer text cut first
    enc = tokenizer(ex.texts, ex.pairs, truncation=True, max_length=max_length)
    return enc["input_ids"]


# ---------------------------------------------------------------------------------------------------------------
# 3) The model: the stock RobertaForSequenceClassification on the pretrained (or re-initialised) encoder


def check_model_dir(path: str | Path, need_weights: bool = True) -> dict[str, Any]:
    """config.json of a Hugging Face RoBERTa directory, or one FinetuneError naming every problem."""
    d, where = Path(path), f"finetune.model={path}"
    if not d.is_dir():
        raise FinetuneError(f"{where}: not a directory (expected a Hugging Face RoBERTa directory such as "
                            "run_dir/hf from `make export`)")
    problems, hf = [], {}
    if not (d / "config.json").is_file():
        problems.append("config.json is missing (not a Hugging Face model directory)")
    else:
        try:
            hf = json.loads((d / "config.json").read_text())
        except ValueError as e:
            problems.append(f"config.json is not valid JSON ({e})")
        if not isinstance(hf, dict):
            hf = {}
        if hf.get("model_type") != "roberta":
            problems.append(f"config.json has model_type {hf.get('model_type')!r}, not 'roberta' "
                            "(this harness fine-tunes RobertaForSequenceClassification)")
    if need_weights and not any((d / w).is_file() for w in ("model.safetensors", "model.safetensors.index.json",
                                                             "pytorch_model.bin")):
        problems.append("no weights (model.safetensors or pytorch_model.bin)")
    if not ((d / "tokenizer.json").is_file() or ((d / "vocab.json").is_file() and (d / "merges.txt").is_file())):
        problems.append("no tokenizer (tokenizer.json, or vocab.json and merges.txt)")
    if problems:
        raise FinetuneError(f"{where}: {'; '.join(problems)}")
    return hf


def resolve_model(cfg: ExperimentConfig, ft: FinetuneConfig, log=print) -> Path:
    """finetune.model, else run_dir/hf, exported from the run's newest checkpoint first when it is missing."""
    if ft.model:
        path = Path(ft.model)
    else:
        path = cfg.run_path / "hf"
        if not (path / "config.json").is_file():
            if not any((cfg.run_path / "checkpoints").glob("*.ckpt")):
                raise FinetuneError(f"{path} does not exist and {cfg.run_path / 'checkpoints'} has no checkpoint: "
                                    "pretrain first (`make pretrain CONFIG=...`) or pass --finetune.model=DIR")
            from .export import export

            log(f"finetune: {path} is missing; exporting the newest checkpoint first")
            export(cfg, log=log)
        else:
            ckpts = list((cfg.run_path / "checkpoints").glob("*.ckpt"))
            weights = path / "model.safetensors"
            if ckpts and weights.is_file() and max(c.stat().st_mtime for c in ckpts) > weights.stat().st_mtime:
                log(f"finetune: warning: {path} is older than the newest checkpoint in {cfg.run_path / 'checkpoints'}; "
                    "fine-tuning the older export (`make export` refreshes it)")
    check_model_dir(path, need_weights=not ft.from_scratch)
    return path


def build_model(model_dir: Path, task: TaskConfig, names: list[str], from_scratch: bool) -> torch.nn.Module:
    """`RobertaForSequenceClassification` on `model_dir`'s encoder (its head new), or the same architecture
    re-initialised from `model_dir`'s config.json. Call after seeding: the new weights come from torch's RNG."""
    import transformers

    kwargs: dict[str, Any] = {"problem_type": "regression", "num_labels": 1} if task.problem == "regression" else {
        "problem_type": "single_label_classification", "num_labels": len(names),
        "id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}
    if from_scratch:
        config = transformers.AutoConfig.from_pretrained(model_dir, **kwargs)
        return transformers.RobertaForSequenceClassification(config)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # "newly initialized: classifier.*" is the point, not a warning
    try:
        return transformers.RobertaForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32,
                                                                             **kwargs)
    finally:
        transformers.logging.set_verbosity(verbosity)


class ClassifierModule(pl.LightningModule):
    """Loss from the stock head (cross-entropy, or MSE for regression); validation metrics on the whole split,
    and the weights of the best validation kept in memory."""

    def __init__(self, model: torch.nn.Module, ft: FinetuneConfig, task: TaskConfig, total_steps: int, log=print):
        super().__init__()
        self.model, self.ft, self.task, self.total_steps, self._print = model, ft, task, total_steps, log
        self.main = task.metrics[0]
        self.best: dict[str, Any] | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.history: list[dict[str, Any]] = []

    def forward(self, batch: dict[str, torch.Tensor]) -> Any:
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          labels=batch["labels"])

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self(batch).loss
        self.log("train/loss", loss, batch_size=len(batch["labels"]), prog_bar=True)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._outputs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self(batch).logits.float()  # (B, num_labels)
        pred = logits.argmax(-1) if self.task.problem == "classification" else logits.squeeze(-1)
        self._outputs.append((pred.cpu(), batch["labels"].cpu()))

    def on_validation_epoch_end(self) -> None:
        pred = torch.cat([p for p, _ in self._outputs]).numpy()
        gold = torch.cat([g for _, g in self._outputs]).numpy()
        metrics = compute(self.task.metrics, pred, gold)
        self.log_dict({f"val/{k}": v for k, v in metrics.items()})
        score = metrics[self.main]
        better = self.best is None or score > self.best["metrics"][self.main]
        epoch = self.global_step / max(1, self.trainer.num_training_batches)
        record = {"step": self.global_step, "epoch": round(epoch, 2), "metrics": metrics}
        self.history.append(record)
        if better:
            self.best = record
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        self._print(f"  step {self.global_step:5d} (epoch {epoch:4.2f})  "
                    + "  ".join(f"{k} {v:.4f}" for k, v in metrics.items()) + ("  *" if better else ""))

    def configure_optimizers(self) -> dict[str, Any]:
        ft = self.ft
        optimizer = adamw(self.model, ft.peak_lr, ft.betas, ft.eps, ft.weight_decay, ft.precision)
        warmup, total = round(ft.warmup_ratio * self.total_steps), self.total_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(s, warmup, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


# ---------------------------------------------------------------------------------------------------------------
# 4) Runs, seeds and the report


def task_dir(cfg: ExperimentConfig, task: TaskConfig) -> Path:
    return cfg.run_path / "finetune" / task.name


def seed_dir(cfg: ExperimentConfig, task: TaskConfig, seed: int, from_scratch: bool) -> Path:
    return task_dir(cfg, task) / f"{'scratch-' if from_scratch else ''}seed-{seed}"


def finetune(cfg: ExperimentConfig, tf: TaskFile, log=print, **trainer_overrides: Any) -> dict[str, Any]:
    """Fine-tune over finetune.seeds seeds, save each seed's best model, write and print the report."""
    import transformers

    task, ft = tf.task, tf.finetune
    transformers.utils.logging.disable_progress_bar()
    # 1) the model directory and the data, all checked before any training
    model_dir = resolve_model(cfg, ft, log)
    train, valid = read_examples(task.train, task, "train"), read_examples(task.valid, task, "valid")
    names = label_set(task, train, valid) if task.problem == "classification" else []
    y_train, y_valid = targets(task, train, names), targets(task, valid, names)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    hf_config = json.loads((model_dir / "config.json").read_text())
    positions = hf_config.get("max_position_embeddings", 514) - hf_config.get("pad_token_id", 1) - 1
    max_length = min(ft.max_length, positions)
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

    report = _update_report(cfg, tf, variant, model_dir, runs, names, len(ids_train), len(ids_valid), max_length)
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
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
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
    stop = [EarlyStopping(monitor=f"val/{task.metrics[0]}", mode="max", patience=ft.patience,
                          check_on_train_epoch_end=False)] if ft.patience else []
    kwargs: dict[str, Any] = dict(
        max_epochs=ft.epochs, accelerator=ft.accelerator, devices=1, precision=ft.precision,
        logger=CSVLogger(save_dir=str(out), name="logs", version=""), callbacks=stop, enable_checkpointing=False,
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
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        out.rename(final)
        shutil.rmtree(old)
    else:
        out.rename(final)
    log(f"seed {seed}: best {task.metrics[0]} {module.best['metrics'][task.metrics[0]]:.4f} at step "
        f"{module.best['step']}; {trainer.global_step} steps in {seconds:.0f} s; saved {final}")
    return result


def summarise(values: list[float]) -> dict[str, float]:
    v = np.asarray(values, dtype=np.float64)
    return {"median": float(np.median(v)), "min": float(v.min()), "max": float(v.max()), "mean": float(v.mean()),
            "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0}


def _update_report(cfg: ExperimentConfig, tf: TaskFile, variant: str, model_dir: Path, runs: list[dict[str, Any]],
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
