"""The training sections of an experiment's config: model, masking, optimizer and schedule, batch, trainer,
checkpoints, logging and the model card. `config.py` holds the data sections (corpus, tokenizer, data), the
`ExperimentConfig` that joins them, and the checks across sections; it re-exports these classes, so callers
import every section from `data_prep.config`. No torch here either (see `config.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .typed_config import ConfigError, option


@dataclass
class ModelConfig:
    hidden_size: int = option(768, "Width of the encoder (base: 768, large: 1024).")
    num_layers: int = option(12, "Transformer layers (base: 12, large: 24).")
    num_heads: int = option(12, "Attention heads; must divide hidden_size.")
    intermediate_size: int = option(3072, "Feed-forward width (4x hidden in the paper).")
    dropout: float = option(0.1, "Dropout on embeddings, attention output and feed-forward output.")
    attention_dropout: float = option(0.1, "Dropout on attention probabilities.")
    init_from: str | None = option(
        None,
        "A Hugging Face RoBERTa directory to continue pretraining from: its weights and tokenizer replace the "
        "initialisation and the tokenizer step; its sizes must equal the ones above.",
    )

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model.num_heads={self.num_heads} does not divide model.hidden_size={self.hidden_size}"
            )
        for key in ("dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(f"model.{key}={getattr(self, key)} must be in [0, 1)")


@dataclass
class MaskingConfig:
    probability: float = option(0.15, "Share of the non-special tokens of each sequence chosen for prediction.")
    mask_fraction: float = option(0.8, "Of the chosen tokens: replaced by <mask>.")
    random_fraction: float = option(0.1, "Of the chosen tokens: replaced by a random non-special token; the rest stay.")
    dynamic: bool = option(True, "True: a new mask every epoch (RoBERTa). False: BERT's static masking.")
    static_copies: int = option(10, "Static masking: fixed mask patterns per sequence, served in turn (BERT: 10).")
    start_probability: float | None = option(
        None, "Masking-rate schedule: the rate at step 0, moving linearly to `probability` over anneal_steps "
        "(Wettig et al. 2023: 0.3 -> 0.15); null: `probability` throughout. Validation always masks at `probability`.")
    anneal_steps: int = option(0, "Optimizer steps over which the rate moves from start_probability to probability.")

    def __post_init__(self) -> None:
        if not 0.0 < self.probability < 1.0:
            raise ConfigError(f"masking.probability={self.probability} must be in (0, 1)")
        if self.start_probability is not None and not 0.0 < self.start_probability < 1.0:
            raise ConfigError(f"masking.start_probability={self.start_probability} must be in (0, 1), or null")
        if self.anneal_steps < 0 or (self.start_probability is not None and self.anneal_steps < 1):
            raise ConfigError(f"masking.anneal_steps={self.anneal_steps} must be at least 1 with "
                              "masking.start_probability set (and never negative)")
        if self.mask_fraction < 0 or self.random_fraction < 0 or self.mask_fraction + self.random_fraction > 1:
            raise ConfigError(
                f"masking.mask_fraction={self.mask_fraction} + masking.random_fraction={self.random_fraction} "
                "must be non-negative and sum to at most 1"
            )
        if self.static_copies < 1:
            raise ConfigError(f"masking.static_copies={self.static_copies} must be at least 1")


SCHEDULES = ("linear", "cosine", "wsd", "inverse_sqrt")
DECAY_SHAPES = ("linear", "1-sqrt", "cosine")


@dataclass
class OptimConfig:
    peak_lr: float = option(6.0e-4, "Learning rate at the end of warmup (base: 6e-4, large: 4e-4).")
    betas: list[float] = option([0.9, 0.98], "Adam betas (RoBERTa: 0.9, 0.98; BERT: 0.9, 0.999).")
    eps: float = option(1.0e-6, "Adam epsilon (RoBERTa: 1e-6).")
    weight_decay: float = option(0.01, "Decoupled weight decay, not applied to biases and LayerNorm.")
    warmup_steps: int = option(24000, "Linear warmup steps from 0 to peak_lr (every schedule).")
    schedule: str = option(
        "linear", "After warmup: linear (to 0 at trainer.max_steps; RoBERTa), cosine (to 0 at max_steps), wsd "
        "(warmup-stable-decay: peak until the last decay_steps, then decay_shape to 0), inverse_sqrt (peak x "
        "sqrt(timescale / (step - warmup + timescale)), no end).")
    decay_steps: int = option(
        0, "wsd: steps of the final decay; 0: decay_fraction x max_steps. To decay a stable-phase checkpoint of "
        "step S over D steps: `make resume ARGS=\"--trainer.max_steps=S+D --optim.decay_steps=D\"`.")
    decay_fraction: float = option(0.2, "wsd: the share of max_steps spent decaying, when decay_steps is 0.")
    decay_shape: str = option("linear", "wsd: the decay's shape, linear, 1-sqrt or cosine (as transformers' "
                              "get_wsd_schedule).")
    min_lr_ratio: float = option(0.0, "linear, cosine, wsd: the rate ends at this share of peak_lr instead of 0.")
    timescale: int = option(0, "inverse_sqrt: steps after warmup at which the rate is peak / sqrt(2); 0: warmup_steps.")
    grad_clip: float = option(0.0, "Gradient-norm clipping; 0: off, as in the paper.")
    max_rollbacks: int = option(
        3, "A non-finite or spiking loss rolls the run back to its last checkpoint and skips the data of the bad "
        "steps, at most this many times; then the run stops. 0: stop at the first bad step.")
    spike_factor: float = option(
        2.0, "A step whose loss exceeds this multiple of the mean of the last spike_window good steps is a spike "
        "(rolled back like a NaN); 0: only non-finite losses count.")
    spike_window: int = option(50, "Good steps the spike test averages over; no spike is called before that many.")
    rollback_lr_factor: float = option(
        1.0, "The learning rate (the whole schedule) is multiplied by this at each rollback, e.g. 0.5; 1: unchanged.")

    def __post_init__(self) -> None:
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas={self.betas} must be two numbers in [0, 1)")
        if self.peak_lr <= 0 or self.eps <= 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("optim.peak_lr and optim.eps must be positive, weight_decay and grad_clip >= 0")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps={self.warmup_steps} must be >= 0")
        if self.max_rollbacks < 0 or self.spike_factor < 0 or self.spike_window < 1:
            raise ConfigError(f"optim.max_rollbacks={self.max_rollbacks} and optim.spike_factor={self.spike_factor} "
                              f"must be >= 0, optim.spike_window={self.spike_window} at least 1")
        if self.spike_factor and self.spike_factor <= 1:
            raise ConfigError(f"optim.spike_factor={self.spike_factor} must be above 1 (a multiple of the recent mean "
                              "loss), or 0 to turn spike detection off")
        if not 0 < self.rollback_lr_factor <= 1:
            raise ConfigError(f"optim.rollback_lr_factor={self.rollback_lr_factor} must be in (0, 1]")
        for key, allowed in (("schedule", SCHEDULES), ("decay_shape", DECAY_SHAPES)):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"optim.{key}={getattr(self, key)!r} must be one of {', '.join(allowed)}")
        if self.decay_steps < 0 or not 0.0 <= self.decay_fraction <= 1.0 or not 0.0 <= self.min_lr_ratio < 1.0:
            raise ConfigError(f"optim.decay_steps={self.decay_steps} must be >= 0, optim.decay_fraction="
                              f"{self.decay_fraction} in [0, 1], optim.min_lr_ratio={self.min_lr_ratio} in [0, 1)")
        if self.timescale < 0:
            raise ConfigError(f"optim.timescale={self.timescale} must be >= 0 (0: warmup_steps)")


@dataclass
class BatchConfig:
    global_size: int = option(8192, "Sequences per optimizer step, over all devices and accumulation (RoBERTa: 8K).")
    micro_size: int = option(32, "Sequences per forward pass per device; accumulation is derived.")
    num_workers: int = option(2, "DataLoader worker processes per device that mask and collate ahead of the step.")
    by_tokens: bool = option(
        False, "Size each micro-batch by tokens, not sequences: consecutive blocks of the epoch's order while their "
        "tokens stay within micro_size x data.seq_len, so short blocks (doc_sentences on short documents) come in "
        "larger batches with about the tokens of a full one, as RoBERTa does for DOC-SENTENCES. global_size / "
        "micro_size stays the number of micro-batches per step.",
    )

    start_size: int = option(
        0, "Batch-size warmup: the global batch at step 0, growing linearly with the tokens trained to global_size "
        "over warmup_tokens, in whole sequences per micro-batch (a multiple of global_size / micro_size); 0: off.")
    warmup_tokens: int = option(0, "Batch-size warmup: tokens (sequences x data.seq_len) over which the batch grows.")

    def __post_init__(self) -> None:
        n = self.global_size // max(1, self.micro_size)
        if self.start_size and (self.start_size % n or not 0 < self.start_size <= self.global_size
                                or self.warmup_tokens < 1):
            raise ConfigError(f"batch.start_size={self.start_size} must be a multiple of the {n} micro-batches per "
                              f"step (global_size / micro_size), at most global_size={self.global_size}, with "
                              f"batch.warmup_tokens={self.warmup_tokens} >= 1; or 0 (off)")
        if self.start_size and self.by_tokens:
            raise ConfigError("batch.start_size (batch-size warmup) with batch.by_tokens is not supported: "
                              "set one of them off")
        if self.num_workers < 0:
            raise ConfigError(f"batch.num_workers={self.num_workers} must be >= 0")
        if self.micro_size < 1 or self.global_size < 1:
            raise ConfigError("batch.global_size and batch.micro_size must be positive")
        if self.global_size % self.micro_size:
            raise ConfigError(
                f"batch.global_size={self.global_size} is not a multiple of batch.micro_size={self.micro_size}"
            )


@dataclass
class TrainerConfig:
    max_steps: int = option(500_000, "Optimizer steps; the learning rate reaches zero here.")
    max_time: str | float | None = option(
        None, "A wall-clock budget instead of max_steps, e.g. \"00:30:00\" (or DD:HH:MM:SS): after "
        "calibration_steps the run measures its step time and fixes max_steps to fill the budget (training plus "
        "the validation it will run); the decision is logged and kept in every checkpoint, so a resume keeps it.")
    calibration_steps: int = option(10, "max_time: steps timed before max_steps is fixed (the first is not timed).")
    precision: str = option("32-true", "Lightning precision: 32-true, bf16-mixed, 16-mixed, bf16-true.")
    accelerator: str = option("auto", "Lightning accelerator: auto, cpu, gpu.")
    devices: int | str = option("auto", "Devices per node: an int, or auto.")
    num_nodes: int = option(1, "Nodes (multi-node through torchrun or SLURM).")
    strategy: str = option("auto", "Lightning strategy: auto, ddp, fsdp, ...")
    val_check_interval: int = option(2000, "Validate every this many optimizer steps.")
    limit_val_batches: int = option(50, "Validation micro-batches per validation run; 0: all.")
    log_every_n_steps: int = option(10, "Log training metrics every this many optimizer steps.")
    compile: bool = option(False, "torch.compile the training objective (model, sparse head, loss), with static "
                           "shapes: batches padded to a multiple of 64 tokens, padded attention (masking.py).")
    unpad: bool = option(True, "Run padded batches on their real tokens only (varlen attention); same results.")
    last_layer_subset: bool = option(True, "Run the last encoder layer on the MLM targets only (its keys and values "
                                     "on every token): the same function, ~0.7/L of the encoder's work saved (1.1x at "
                                     "small and base on a CPU); the collator lays target slots out per row for it.")
    retain_host_memory: bool = option(True, "On a CPU, keep freed memory in the process (glibc mallopt: no mmap, no "
                                      "trim) so each step reuses its large tensors' pages instead of faulting them in "
                                      "afresh: 1.6x at the small model, for ~20% more peak RSS (host_memory.py).")
    peak_flops: float = option(0.0, "Peak FLOP/s of one device, the denominator of train/mfu; 0: the GPU's "
                               "datasheet peak for the precision, else measured once on this machine (cached).")

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise ConfigError(f"trainer.max_steps={self.max_steps} must be at least 1")
        if isinstance(self.devices, str) and self.devices != "auto":
            raise ConfigError(f"trainer.devices={self.devices!r} must be an integer or 'auto'")
        if self.peak_flops < 0:
            raise ConfigError(f"trainer.peak_flops={self.peak_flops} must be >= 0 (0: known or measured)")
        if self.max_time is not None:
            parse_duration(self.max_time, "trainer.max_time")
        if self.calibration_steps < 2:
            raise ConfigError(f"trainer.calibration_steps={self.calibration_steps} must be at least 2")


def parse_duration(value: str | int | float, key: str) -> float:
    """Seconds of "HH:MM:SS", "DD:HH:MM:SS" or a number of seconds (Lightning's max_time forms); one line naming
    `key` when it is none of them."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        parts = str(value).strip().split(":")
        try:
            numbers = [float(p) for p in parts]
        except ValueError:
            numbers = []
        if not 1 <= len(numbers) <= 4 or any(n < 0 for n in numbers):
            raise ConfigError(f"{key}={value!r} is not a duration: write HH:MM:SS, DD:HH:MM:SS or seconds")
        seconds = sum(n * unit for n, unit in zip(reversed(numbers), (1, 60, 3600, 86400), strict=False))
    if seconds <= 0:
        raise ConfigError(f"{key}={value!r} must be a positive duration")
    return seconds


@dataclass
class CheckpointConfig:
    every_n_steps: int = option(1000, "Save a checkpoint every this many optimizer steps (and at the end).")
    keep_last: int = option(3, "Keep this many newest step checkpoints.")
    export_hf: bool = option(False, "Also export a Hugging Face directory beside each checkpoint.")


@dataclass
class LoggerConfig:
    wandb: dict[str, Any] | None = option(
        None, "wandb.init arguments, e.g. {project: roberta, mode: offline}; null: no wandb. CSV is always written."
    )
    tensorboard: bool = option(False, "Also write TensorBoard event files to run_dir/logs/tensorboard "
                               "(`tensorboard --logdir run_dir/logs`); offline, as many clusters want.")


@dataclass
class CardConfig:
    language: list[str] = option([], "Languages of the training text, ISO 639-1 codes such as [en]: the `language` "
                                 "of the exported model card's metadata; empty: not stated.")
    license: str | None = option(None, "The exported model's license as a Hub license id (apache-2.0, mit, "
                                 "cc-by-sa-4.0, other): the model card's `license`; null: not stated.")
