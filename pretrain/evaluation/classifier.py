"""The model fine-tuned: the stock `transformers.RobertaForSequenceClassification` on a pretrained (or
re-initialised) RoBERTa directory, and the LightningModule that trains it and keeps its best validation.

The stock model holds the weights and is what is saved; with `finetune.unpad` (the default) its encoder is run
through this project's (`shared_encoder`: model/encoder.py's layers over the very same tensors), so a padded batch runs on
its real tokens only and the last layer at <s> only, which is all the classification head reads. Logits and
gradients equal the stock forward's within 1e-5 (tests/test_finetune_unpad.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytorch_lightning as pl
import torch

from data_prep.config import ExperimentConfig

from ..hf.convert import hf_name_map
from ..model.config import RobertaConfig
from ..model.encoder import RobertaForMLM
from ..model.unpadded import Unpadded
from ..training.module import adamw
from ..training.schedules import LRSchedule
from .metrics import compute
from .task import FinetuneConfig, FinetuneError, TaskConfig


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
            from ..hf.export import export

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


def shared_encoder(model: torch.nn.Module) -> RobertaForMLM | None:
    """model/encoder.py's embeddings and layers over the stock classifier's own parameters (the same tensors: an update
    to one is an update to the other, and moving the classifier moves them), without an LM head; None, with the
    stock forward to run, when its config asks for something model/encoder.py does not compute."""
    c = model.config
    if (c.hidden_act != "gelu" or getattr(c, "position_embedding_type", "absolute") not in (None, "absolute")
            or c.is_decoder or not hasattr(model, "roberta")):
        return None
    cfg = RobertaConfig.from_hf_config(c.to_dict())
    with torch.device("meta"):  # no memory: every tensor is replaced by the classifier's below
        encoder = RobertaForMLM(cfg)
    encoder.lm_head = None
    for ours, theirs in hf_name_map(cfg.num_layers):
        if not ours.startswith("lm_head"):
            owner, _, leaf = ours.rpartition(".")
            setattr(encoder.get_submodule(owner), leaf, model.get_parameter(theirs))
    assert not any(p.is_meta for p in encoder.parameters()), "a tensor of the encoder was not shared"
    return encoder


class ClassifierModule(pl.LightningModule):
    """Loss from the stock head (cross-entropy, or MSE for regression); validation metrics on the whole split,
    and the weights of the best validation kept in memory."""

    def __init__(self, model: torch.nn.Module, ft: FinetuneConfig, task: TaskConfig, total_steps: int, log=print):
        super().__init__()
        self.model, self.ft, self.task, self.total_steps, self._print = model, ft, task, total_steps, log
        self.encoder = shared_encoder(model) if ft.unpad else None  # the same parameters as model.roberta
        if ft.unpad and self.encoder is None:
            log("finetune.unpad: this config is not one model/encoder.py computes; the stock forward runs")
        self.main = task.metrics[0]
        self.best: dict[str, Any] | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.history: list[dict[str, Any]] = []

    def forward(self, batch: dict[str, Any]) -> Any:
        """(loss, logits), as the stock model's output."""
        if self.encoder is None:
            return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              labels=batch["labels"])
        input_ids, labels = batch["input_ids"], batch["labels"]
        B, T = input_ids.shape
        unpadded = Unpadded.from_batch(batch)
        mask = batch["attention_mask"] if unpadded is not None else None  # unpadded or full: no mask to apply
        first = torch.arange(B, device=input_ids.device) * T  # each row's <s>, all the head reads
        hidden = self.encoder.encode_targets(input_ids, mask, first, unpadded)  # (B, C)
        logits = self.model.classifier(hidden[:, None])  # (B, num_labels)
        if self.task.problem == "regression":
            loss = torch.nn.functional.mse_loss(logits.squeeze(-1), labels.to(logits.dtype))
        else:
            loss = torch.nn.functional.cross_entropy(logits, labels)
        return SimpleNamespace(loss=loss, logits=logits)

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
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, LRSchedule("linear", warmup, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
