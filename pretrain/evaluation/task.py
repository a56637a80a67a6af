"""A fine-tuning task: its YAML file (a `task:` section for the data, a `finetune:` section for the
hyperparameters) and its labelled data, read from local files or a `datasets` split, labels turned into ids and
texts into token ids. Every problem is one FinetuneError or ConfigError naming the file, field or key.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from data_prep.config import ConfigError, ExperimentConfig, apply_overrides, from_mapping, option
from data_prep.typed_config import read_yaml_mapping

from ..hf.outputs import check_name
from ..model.unpadded import Unpadded
from .metrics import CLASSIFICATION, REGRESSION


class FinetuneError(ValueError):
    """A problem with the task's data or the model to fine-tune: one line naming the file, field or directory."""


# ---------------------------------------------------------------------------------------------------------------
# The task file: a `task:` section (the data) and a `finetune:` section (the hyperparameters)


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
    unpad: bool = option(True, "Run the stock classifier's encoder through this project's (model/encoder.py, the same "
                         "tensors): padded batches on their real tokens only, the last layer at <s> only; same "
                         "logits within 1e-5. false: the stock forward.")

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
    data = read_yaml_mapping(path, "task", "a mapping with task: and finetune: sections")
    try:
        tf = from_mapping(TaskFile, apply_overrides(data, overrides or []), "")
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    tf.task.name = tf.task.name or path.stem
    if problem := check_name(tf.task.name, "task.name"):
        raise ConfigError(f"{path}: {problem}: set task.name to one")  # it becomes run_dir/finetune/NAME
    return tf


def task_dir(cfg: ExperimentConfig, task: TaskConfig) -> Path:
    """run_dir/finetune/NAME: the task's seeds and report."""
    return cfg.run_path / "finetune" / task.name


# ---------------------------------------------------------------------------------------------------------------
# Labelled data: local files or a `datasets` split; labels to ids


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

    def collate(self, index: list[int]) -> dict[str, Any]:
        T = max(len(self.ids[i]) for i in index)
        input_ids = torch.full((len(index), T), self.pad_id, dtype=torch.long)  # (B, T)
        for row, i in enumerate(index):
            input_ids[row, : len(self.ids[i])] = torch.tensor(self.ids[i])
        batch = {"input_ids": input_ids, "attention_mask": input_ids.ne(self.pad_id).long(),
                 "labels": torch.from_numpy(self.y[index]), "index": torch.tensor(index)}
        unpadded = Unpadded.from_mask(batch["attention_mask"])  # here on the host: no sync in the step
        if unpadded is not None:  # where a padded batch's real tokens are (model.Unpadded)
            batch |= unpadded.as_batch()
        return batch


def encode(tokenizer: Any, ex: Examples, max_length: int) -> list[list[int]]:
    # pairs: <s> A </s></s> B </s>, the longer text cut first
    enc = tokenizer(ex.texts, ex.pairs, truncation=True, max_length=max_length)
    return enc["input_ids"]
