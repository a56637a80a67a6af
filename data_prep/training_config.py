"""The training sections of an experiment's config: model, masking, optimizer and schedule, batch, trainer,
checkpoints, logging and the model card. `config.py` holds the data sections (corpus, tokenizer, data), the
`ExperimentConfig` that joins them, and the checks across sections; it re-exports these classes, so callers
import every section from `data_prep.config`. No torch here either (see `config.py`).

It lives in `data_prep` although only `pretrain` acts on it: `ExperimentConfig` joins every section, `make data`
reads the whole experiment file with it, and `data_prep` must never import `pretrain` (pretrain imports this).

Every number has a range (`option(..., ge=, le=)`, checked by `typed_config.from_mapping` before any work, or a
check in `__post_init__`): sizes and counts at least 1, upper bounds where a larger value would allocate absurdly
or means a typo, and Lightning's strings (precision, accelerator, strategy) checked here, not after the tokenizer
and shards are built.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .typed_config import ConfigError, option

MAX_STEPS = 10**11
"""The most optimizer steps any step count may say (RoBERTa: 500K): more is a typo, not a run. A year (the longest
max_time) at 0.32 ms a step, so the max_steps a time budget decides (budget.py) is never refused when a checkpoint's
config is read back."""
STEPS = "optimizer steps; RoBERTa trains 500K"

MAX_SEED = 2**32 - 1
"""Lightning's seed_everything (numpy's legacy seeding) takes seeds in [0, 2**32 - 1]."""

PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true", "transformer-engine",
              "transformer-engine-float16")
"""pytorch_lightning 2.6's precision strings (lightning_fabric.connector._PRECISION_INPUT_STR; a test compares)."""
PRECISION_ALIASES = {"32": "32-true", "64": "64-true", "16": "16-mixed", "bf16": "bf16-mixed"}
"""Lightning's short forms (_PRECISION_INPUT_STR_ALIAS, and the ints 16, 32, 64), read as Lightning reads them."""
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
"""Lightning's accelerator names (AcceleratorRegistry, plus auto and gpu)."""
STRATEGIES = (
    "auto", "ddp", "fsdp", "ddp_spawn", "deepspeed", "single_device",  # the common ones first: the error names them
    "ddp_find_unused_parameters_false", "ddp_find_unused_parameters_true", "ddp_fork",
    "ddp_fork_find_unused_parameters_false", "ddp_fork_find_unused_parameters_true", "ddp_notebook",
    "ddp_notebook_find_unused_parameters_false", "ddp_notebook_find_unused_parameters_true",
    "ddp_spawn_find_unused_parameters_false", "ddp_spawn_find_unused_parameters_true", "deepspeed_stage_1",
    "deepspeed_stage_2", "deepspeed_stage_2_offload", "deepspeed_stage_3", "deepspeed_stage_3_offload",
    "deepspeed_stage_3_offload_nvme", "fsdp_cpu_offload", "single_tpu", "single_xla", "xla", "xla_debug",
)
"""Lightning's strategy names (StrategyRegistry, plus auto; a test compares)."""


def lightning_precision(value: str | int, key: str) -> str:
    """`value` as the precision string Lightning would use (its aliases resolved), or one line naming `key`."""
    canonical = PRECISION_ALIASES.get(str(value), value) if isinstance(value, str | int) else value
    if canonical not in PRECISIONS or isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} is not a Lightning precision: use one of {', '.join(PRECISIONS)} "
                          f"(or {', '.join(PRECISION_ALIASES)})")
    return canonical


@dataclass
class ModelConfig:
    hidden_size: int = option(768, "Width of the encoder (base: 768, large: 1024).", ge=1, le=2**16,
                              why="large: 1024; the weights grow with its square")
    num_layers: int = option(12, "Transformer layers (base: 12, large: 24).", ge=1, le=1024)
    num_heads: int = option(12, "Attention heads; must divide hidden_size.", ge=1, le=2**16)
    intermediate_size: int = option(3072, "Feed-forward width (4x hidden in the paper).", ge=1, le=2**18,
                                    why="4 x hidden_size in the paper")
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
    static_copies: int = option(10, "Static masking: fixed mask patterns per sequence, served in turn (BERT: 10).",
                                ge=1, le=10**6)
    start_probability: float | None = option(
        None, "Masking-rate schedule: the rate at step 0, moving linearly to `probability` over anneal_steps "
        "(Wettig et al. 2023: 0.3 -> 0.15); null: `probability` throughout. Validation always masks at `probability`.")
    anneal_steps: int = option(0, "Optimizer steps over which the rate moves from start_probability to probability.",
                               ge=0, le=MAX_STEPS, why=STEPS)

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


SCHEDULES = ("linear", "cosine", "wsd", "inverse_sqrt")
DECAY_SHAPES = ("linear", "1-sqrt", "cosine")


@dataclass
class OptimConfig:
    peak_lr: float = option(6.0e-4, "Learning rate at the end of warmup (base: 6e-4, large: 4e-4).", le=1,
                            why="an Adam step moves each weight by about the rate")
    betas: list[float] = option([0.9, 0.98], "Adam betas (RoBERTa: 0.9, 0.98; BERT: 0.9, 0.999).")
    eps: float = option(1.0e-6, "Adam epsilon (RoBERTa: 1e-6).", le=1)
    weight_decay: float = option(0.01, "Decoupled weight decay, not applied to biases and LayerNorm.", ge=0, le=10)
    warmup_steps: int = option(24000, "Linear warmup steps from 0 to peak_lr (every schedule; wsd from "
                               "min_lr_ratio, as transformers; as transformers: lr 0 for the first update, the peak "
                               "at update warmup_steps + 1); more than trainer.max_steps is refused.",
                               ge=0, le=MAX_STEPS,
                               why=STEPS)
    schedule: str = option(
        "linear", "After warmup: linear (to 0 at trainer.max_steps; RoBERTa), cosine (to 0 at max_steps), wsd "
        "(warmup-stable-decay: peak until the last decay_steps, then decay_shape to min_lr_ratio), inverse_sqrt (peak "
        "x sqrt(timescale / (step - warmup + timescale)), no end).")
    decay_steps: int = option(
        0, "wsd: steps of the final decay; 0: decay_fraction x max_steps. To decay a stable-phase checkpoint of "
        "step S over D steps: `make resume ARGS=\"--trainer.max_steps=S+D --optim.decay_steps=D\"`.",
        ge=0, le=MAX_STEPS, why=STEPS)
    decay_fraction: float = option(0.2, "wsd: the share of max_steps spent decaying, when decay_steps is 0 "
                                  "(0: never decays).")
    decay_shape: str = option("linear", "wsd: the decay's shape, linear, 1-sqrt or cosine (as transformers' "
                              "get_wsd_schedule).")
    min_lr_ratio: float = option(0.0, "linear, cosine, wsd: the rate ends at this share of peak_lr instead of 0.")
    timescale: int = option(0, "inverse_sqrt: rate = peak x sqrt(timescale / (step - warmup + timescale)), so the "
                            "steps after warmup at which the rate is peak / sqrt(2); 0: warmup_steps, "
                            "or 10,000 without warmup (as transformers).",
                            ge=0, le=MAX_STEPS, why=STEPS)
    grad_clip: float = option(0.0, "Gradient-norm clipping; 0: off, as in the paper.", ge=0, le=1e6,
                              why="a norm that large never clips; 0 turns clipping off")
    max_rollbacks: int = option(
        3, "A non-finite or spiking loss rolls the run back to its last checkpoint and skips the data of the bad "
        "steps, at most this many times; then the run stops. 0: stop at the first bad step.", ge=0, le=1000)
    spike_factor: float = option(
        2.0, "A step whose loss exceeds this multiple of the mean of the last spike_window good steps is a spike "
        "(rolled back like a NaN); 0: only non-finite losses count.", ge=0, le=1e6,
        why="a multiple of the mean loss; 0 turns spike detection off")
    spike_window: int = option(50, "Good steps the spike test averages over; no spike is called before that many.",
                               ge=1, le=10**6)
    rollback_lr_factor: float = option(
        1.0, "The learning rate (the whole schedule) is multiplied by this at each rollback, e.g. 0.5; 1: unchanged.")

    def __post_init__(self) -> None:
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas={self.betas} must be two numbers in [0, 1)")
        if self.peak_lr <= 0 or self.eps <= 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("optim.peak_lr and optim.eps must be positive, weight_decay and grad_clip >= 0")
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
    global_size: int = option(8192, "Sequences per optimizer step, over all devices and accumulation (RoBERTa: 8K).",
                              ge=1, le=2**24, why="RoBERTa: 8K")
    micro_size: int = option(32, "Sequences per forward pass per device; accumulation is derived: global_size / "
                                "(micro_size x devices x nodes).", ge=1, le=2**24)
    num_workers: int = option(2, "DataLoader worker processes per device that mask and collate ahead of the step.",
                              ge=0, le=256, why="processes, each with its own memory")
    by_tokens: bool = option(
        False, "Size each micro-batch by tokens, not sequences: consecutive blocks of the epoch's order while their "
        "tokens stay within micro_size x data.seq_len, so short blocks (doc_sentences on short documents) come in "
        "larger batches with about the tokens of a full one, as RoBERTa does for DOC-SENTENCES. global_size / "
        "micro_size stays the number of micro-batches per step; resume stays exact; not with data.short_seq_len.",
    )

    start_size: int = option(
        0, "Batch-size warmup: the global batch at step 0, growing linearly with the tokens trained to global_size "
        "over warmup_tokens, in whole sequences per micro-batch (a multiple of global_size / micro_size); 0: off; not with "
        "by_tokens.",
        ge=0, le=2**24)
    warmup_tokens: int = option(0, "Batch-size warmup: tokens (sequences x data.seq_len) over which the batch grows.",
                                ge=0, le=2**50)

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
        if self.micro_size < 1 or self.global_size < 1:
            raise ConfigError("batch.global_size and batch.micro_size must be positive")
        if self.global_size % self.micro_size:
            raise ConfigError(
                f"batch.global_size={self.global_size} is not a multiple of batch.micro_size={self.micro_size}"
            )


@dataclass
class TrainerConfig:
    max_steps: int = option(500_000, "Optimizer steps; the learning rate reaches zero here.", ge=1, le=MAX_STEPS,
                            why=STEPS)
    max_time: str | float | None = option(
        None, "A wall-clock budget instead of max_steps: HH:MM:SS, DD:HH:MM:SS or seconds, e.g. 00:30:00 or "
        "1:00:00:00 (quotes optional: the config reader keeps base-60 numbers as written), at most 365 days: after "
        "calibration_steps the run measures its step time and fixes max_steps to fill the budget (training plus "
        "the validation it will run); the decision is logged and kept in every checkpoint, so a resume keeps it.")
    calibration_steps: int = option(10, "max_time: steps timed before max_steps is fixed (the first is not timed); they "
                                    "must lie inside optim.warmup_steps (except inverse_sqrt).",
                                    ge=2, le=10**6)
    precision: str | int = option(
        "32-true", "Lightning precision: 32-true, bf16-mixed, 16-mixed, bf16-true, 16-true, 64-true, "
        "transformer-engine(-float16); Lightning's aliases 32, 64, 16, bf16 are read as 32-true, 64-true, 16-mixed, "
        "bf16-mixed.")
    accelerator: str = option("auto", "Lightning accelerator: auto, cpu, gpu (cuda), mps, tpu.")
    devices: int | str = option("auto", "Devices per node: an int, or auto.", ge=1, le=1024,
                                why="devices per node; auto: all of them")
    num_nodes: int = option(1, "Nodes (multi-node through torchrun or SLURM).", ge=1, le=2**16)
    strategy: str = option("auto", "Lightning strategy: auto, ddp, fsdp, ... (a name in Lightning's StrategyRegistry); "
                           "fsdp: torch's FSDP2 (fully_shard) through Lightning's ModelParallelStrategy, each encoder "
                           "layer one unit, sharded checkpoints that resume on another device count (docs/multi-gpu.md).")
    fsdp_cpu_offload: bool = option(False, "strategy fsdp on GPUs: keep the parameter, gradient and optimizer shards in "
                                    "host memory (FSDP2's CPUOffloadPolicy; the optimizer step runs on the CPU), for "
                                    "models whose sharded state does not fit the GPUs.")
    activation_checkpointing: bool = option(False, "Recompute each encoder layer's activations in backward instead of "
                                            "keeping them (torch.utils.checkpoint per layer): less activation memory "
                                            "for about a third more compute; same results. Any strategy.")
    val_check_interval: int = option(2000, "Validate every this many optimizer steps.", ge=1, le=MAX_STEPS,
                                     why=STEPS)
    limit_val_batches: int = option(50, "Validation micro-batches per validation run; 0: all.", ge=0, le=10**9)
    log_every_n_steps: int = option(10, "Log training metrics every this many optimizer steps.", ge=1,
                                    le=MAX_STEPS, why=STEPS)
    compile: bool = option(False, "torch.compile the training objective (model, sparse head, loss), with static "
                           "shapes: batches padded to a multiple of 64 tokens, padded attention (masking.py).")
    unpad: bool = option(True, "Run padded batches (DOC-SENTENCES, pairs, batch.by_tokens) on their real tokens "
                           "only (varlen attention); same results.")
    last_layer_subset: bool = option(True, "Run the last encoder layer on the MLM targets only (its keys and values "
                                     "on every token): the same function, ~0.7/L of the encoder's work saved (1.1x at "
                                     "small and base on a CPU); the collator lays target slots out per row for it.")
    retain_host_memory: bool = option(True, "On a CPU, keep freed memory in the process (glibc mallopt: no mmap, no "
                                      "trim) so each step reuses its large tensors' pages instead of faulting them in "
                                      "afresh: 1.6x at the small model, for ~20% more peak RSS; restored after the "
                                      "run (host_memory.py).")
    peak_flops: float = option(0.0, "Peak FLOP/s of one device, the denominator of train/mfu; 0: the GPU's "
                               "datasheet peak for the precision, else the best matmul FLOP/s measured once on "
                               "this machine (cached in ~/.cache/roberta-pretrain/).",
                               ge=0, le=1e18, why="FLOP/s of one device: an H100 does about 1e15")

    def __post_init__(self) -> None:
        if isinstance(self.devices, str) and self.devices != "auto":
            raise ConfigError(f"trainer.devices={self.devices!r} must be an integer or 'auto'")
        if self.max_time is not None:
            parse_duration(self.max_time, "trainer.max_time")
        self.precision = lightning_precision(self.precision, "trainer.precision")
        if self.fsdp_cpu_offload and (self.strategy != "fsdp" or self.accelerator == "cpu"):
            raise ConfigError(f"trainer.fsdp_cpu_offload=true moves FSDP's shards from GPUs to host memory: it needs "
                              f"trainer.strategy=fsdp (it is {self.strategy!r}) on GPUs (trainer.accelerator is "
                              f"{self.accelerator!r})")
        if self.strategy == "fsdp" and self.precision not in FSDP_PRECISIONS:
            raise ConfigError(f"trainer.precision={self.precision!r} does not run with trainer.strategy=fsdp "
                              f"(Lightning's ModelParallelStrategy): use one of {', '.join(FSDP_PRECISIONS)}")
        for key, allowed in (("accelerator", ACCELERATORS), ("strategy", STRATEGIES)):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"trainer.{key}={getattr(self, key)!r} is not a Lightning {key}: use one of "
                                  f"{', '.join(allowed[:6])}{' or another of its registry' if len(allowed) > 6 else ''}")


FSDP_PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "16-true")
"""What Lightning's ModelParallelStrategy accepts (no fp16 loss scaling)."""

MAX_DURATION = 365 * 86400
"""The longest wall-clock budget: a year; more is a typo."""


def parse_duration(value: str | int | float, key: str) -> float:
    """Seconds of "HH:MM:SS", "DD:HH:MM:SS" or a number of seconds (Lightning's max_time forms); one line naming
    `key` when it is none of them. The config's YAML reader (typed_config.Loader) keeps an unquoted 1:00:00:00 as
    this string; YAML 1.1 elsewhere reads it as the base-60 number 216000, which would be 2.5 days of seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        parts = str(value).strip().split(":")
        try:
            numbers = [float(p) for p in parts]
        except ValueError:
            numbers = []
        if not 1 <= len(numbers) <= 4 or not all(0 <= n < math.inf for n in numbers):
            raise ConfigError(f"{key}={value!r} is not a duration: write HH:MM:SS, DD:HH:MM:SS or seconds")
        seconds = sum(n * unit for n, unit in zip(reversed(numbers), (1, 60, 3600, 86400), strict=False))
    if not 0 < seconds <= MAX_DURATION:  # NaN fails this too
        raise ConfigError(f"{key}={value!r} must be a positive duration of at most 365 days")
    return seconds


@dataclass
class CheckpointConfig:
    every_n_steps: int = option(1000, "Save a checkpoint every this many optimizer steps (and at the end).", ge=1,
                                le=MAX_STEPS, why=STEPS)
    keep_last: int = option(3, "Keep this many newest step checkpoints (last.ckpt is kept besides).", ge=0, le=10**6)
    export_hf: bool = option(False, "Also export a Hugging Face directory beside each checkpoint.")
    average_last: int = option(1, "`make export`: export the elementwise mean of the weights of the run's last this "
                               "many checkpoints of distinct steps (ending at CKPT when given; pretrain/hf/average.py) "
                               "instead of one; 1: no averaging. Keep as many (keep_last) while training.",
                               ge=1, le=1000, why="checkpoints averaged")


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
