"""One experiment, one YAML file: typed, documented config dataclasses, loading and validation (the generic
parsing of mappings and dotted overrides is `typed_config.py`).

The config lives in `data_prep` (not `pretrain`) because both halves of the pipeline read it and `data_prep`
must never import `pretrain`. It imports no torch, so it stays cheap to load and serializes to YAML and into
checkpoints as plain data.

Every field carries its documentation in `field(metadata={"help": ...})`; `--help` and docs/configuration.md
(`make docs`, config_doc.py) are made from the same text, so they cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import os
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from .eval_config import EvalConfig  # noqa: F401 - callers import it here
from .sources import Source, normalise_sources
from .training_config import (  # noqa: F401 - parse_duration and the sections: callers import them here
    MAX_SEED,
    BatchConfig,
    CardConfig,
    CheckpointConfig,
    LoggerConfig,
    MaskingConfig,
    ModelConfig,
    OptimConfig,
    TrainerConfig,
    parse_duration,
)
from .typed_config import (  # noqa: F401 - ConfigError, from_mapping, parse_override: callers import them here
    ConfigError,
    apply_overrides,
    from_mapping,
    option,
    parse_override,
    range_text,
    read_yaml_mapping,
    type_name,
)

Packing = Literal["full_sentences", "doc_sentences", "segment_pair", "sentence_pair"]
Encoder = Literal["auto", "tiktoken", "tokenizers"]


@dataclass
class CorpusConfig:
    train: list[str | Source] = option(
        ["builtin:python-docs"],
        "Training text: files, globs, directories (.txt with blank-line-separated documents, .jsonl, .parquet, "
        "each optionally .gz), hf:NAME[/CONFIG][:SPLIT] for a `datasets` dataset, streamed (a local "
        "dataset-repository folder or a save_to_disk directory works too; an owner-qualified hub name is "
        "hf:owner/name/config), or builtin:python-docs, the embedded default corpus; an entry may be a mapping "
        "{path: ..., weight: 2.0, name: books}: the weight is passes over that source (0.5: a seeded half of its "
        "documents).",
    )
    valid: list[str | Source] = option(
        [], "Validation text, same forms as train; empty: a seeded document-level split of train. An entry may be a "
        "mapping {path: ..., name: news}: with a name, that entry gets its own val/loss/<name> (a weight is refused: validation text is read once).")
    valid_fraction: float = option(0.005, "Share of train documents held out for validation when `valid` is empty.")
    text_field: str = option("text", "The text column of .jsonl, .parquet and `datasets` sources.")
    max_line_bytes: int = option(
        1_000_000, "Longer lines are cut into pieces of at most this many bytes, so memory stays bounded.",
        ge=1024, le=2**30, why="a piece is held in memory whole",
    )

    def __post_init__(self) -> None:
        if not self.train:
            raise ConfigError("corpus.train is empty: name at least one file, glob, directory or hf: dataset")
        normalise_sources(self.train)
        normalise_sources(self.valid, "corpus.valid", weighted=False)
        if not 0.0 <= self.valid_fraction < 1.0:
            raise ConfigError(f"corpus.valid_fraction={self.valid_fraction} must be in [0, 1)")

    @property
    def sources(self) -> list[Source]:
        """`train` normalised: one `Source` (path, weight, name) per entry (`sources.py`)."""
        return normalise_sources(self.train)

    @property
    def valid_entries(self) -> list[Source]:
        """`valid` normalised: one `Source` (path, name; weight 1) per entry."""
        return normalise_sources(self.valid, "corpus.valid", weighted=False)


@dataclass
class TokenizerConfig:
    # 256 byte symbols + 5 specials is the smallest byte-level vocabulary that can encode anything.
    vocab_size: int = option(50265, "Vocabulary size including the 5 special tokens (RoBERTa: 50265).", ge=261,
                             le=2**22, why="256 bytes + 5 specials at least; the embedding is vocab_size x "
                             "hidden_size, and the largest real vocabularies are about 1M")
    min_frequency: int = option(2, "A merge must occur at least this often in the training text.", ge=1, le=2**32)
    extend_from: str | None = option(
        None,
        "With model.init_from: a tokenizer directory (e.g. one trained on the domain corpus) whose new tokens are "
        "appended to init_from's vocabulary; old ids are kept, each new embedding row starts as the mean of its "
        "pieces' rows.",
    )
    max_train_bytes: int = option(
        0, "Train on a sample of at most this many bytes of whole train documents, drawn from the sources in "
        "proportion to weight x size (weight alone when a size is not known up front: .gz, .parquet, hf:), each "
        "read from its start and left at the first document that does not fit; 0: all the text (the same "
        "tokenizer as before the key existed).",
        ge=0, le=2**50, why="bytes; 0: all the text")


@dataclass
class DataConfig:
    seq_len: int = option(512, "Tokens per block, <s> and </s> included (RoBERTa: 512).", ge=8, le=2**16,
                          why="the position embeddings and the attention grow with it")
    packing: Packing = option(
        "full_sentences",
        "full_sentences (RoBERTa) | doc_sentences | segment_pair (BERT, NSP) | sentence_pair (NSP).",
    )
    num_proc: int = option(0, "Worker processes for tokenizing, at most the CPUs this process may use; 0: all of "
                           "them.", ge=0)
    encoder: Encoder = option(
        "auto", "What encodes text into ids; the shards are the same bytes either way. auto: tiktoken's BPE core (2-3x "
        "faster) when the tokenizer is RoBERTa's byte-level BPE with merges in id order and a sample of the corpus "
        "gives the same ids both ways, else tokenizers (one line says why); tiktoken: the same, an error instead of "
        "the fallback; tokenizers: always `tokenizers`. meta.json's split records say which ran.")
    shard_index: int = option(0, "Which slice of the corpus this run prepares: documents i with i % num_shards == "
                          "shard_index (one machine per slice; the slices are read together, unmerged).")
    num_shards: int = option(1, "Slices the corpus is prepared in, e.g. one per machine, read together, never "
                             "merged; 1: all at once.", ge=1,
                             le=2**16)
    short_seq_len: int = option(
        0,
        "BERT's length schedule: the first short_fraction of trainer.max_steps train on blocks of this many "
        "tokens (BERT: 128), the rest on seq_len blocks, from shards prepared at both lengths (`make data` "
        "prepares both; the short shards get their own hashed directory, which the long shards' meta.json points "
        "to); validation uses the long blocks; a resume before or after the switch is exact; train/seq_len logs "
        "the length. 0: off (RoBERTa).",
    )
    short_fraction: float = option(
        0.9, "Share of trainer.max_steps trained at short_seq_len when it is set (BERT: 0.9, then 10% at 512); "
        "the switch is at round(short_fraction x max_steps), and the global batch stays global_size sequences in "
        "both phases, as in BERT."
    )
    short_seq_prob: float = option(
        0.0, "segment_pair only: the share of documents whose pairs aim at a random length in [2, seq_len - 4] "
        "instead of filling the block, so the model also sees short inputs (BERT's short_seq_prob: 0.1, as in "
        "configs/bert-*.yaml).",
    )
    shards_url: str | None = option(
        None, "Train on the shards at this URL instead of preparing them here: a directory that `python -m "
        "data_prep upload URL` wrote (s3://bucket/path, gs://..., hf://datasets/owner/name/path, file:///path: "
        "any fsspec URL). Each node downloads it once into cache_dir, checks sizes and sha256, and reads it "
        "memory-mapped; seq_len and packing must be the shards'; not with short_seq_len. null: the shards "
        "`make data` makes.")
    cache_dir: str | None = option(
        None, "Where a node keeps the shards of shards_url (a subdirectory per URL, named by its hash); put it on "
        "a local disk. null: run_dir/data/remote.")
    storage_options: dict[str, Any] = option(
        {}, "fsspec options of shards_url's file system, e.g. {endpoint_url: 'http://127.0.0.1:9000'} for an "
        "S3-compatible server (MinIO, Ceph; s3fs; also anon: true, client_kwargs). Credential-like values (key, secret, token, "
        "...) are redacted in every log, checkpoint and tracker config; still, they are best kept in the environment "
        "(AWS_ACCESS_KEY_ID, GOOGLE_APPLICATION_CREDENTIALS, HF_TOKEN) or ~/.aws.")
    fetch_threads: int = option(8, "Files of shards_url downloaded at once (each checked by size and sha256 and "
                                "renamed into place on its own).",
                                ge=1, le=64, why="each holds a connection and a file open")
    shards_sha256: str | None = option(
        None, "The sha256 of shards_url's meta.json (`sha256sum meta.json`, printed by `python -m data_prep "
        "upload`): pins the manifest, and through its files table every file, to what you trust; a different "
        "meta.json is refused before anything is downloaded. null: trust what the URL serves.")

    def __post_init__(self) -> None:
        if self.shards_sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", self.shards_sha256):
            raise ConfigError(f"data.shards_sha256={self.shards_sha256!r} must be a sha256: 64 hex digits "
                              "(`sha256sum meta.json`), or null")
        if self.shards_url and self.short_seq_len:
            raise ConfigError("data.shards_url with data.short_seq_len is not supported: BERT's length schedule "
                              "reads two data directories; prepare the shards on each node (`make data`)")
        if self.short_seq_len and not 8 <= self.short_seq_len < self.seq_len:
            raise ConfigError(
                f"data.short_seq_len={self.short_seq_len} must be 0 (off) or in [8, data.seq_len={self.seq_len})"
            )
        if not 0.0 < self.short_fraction < 1.0:
            raise ConfigError(f"data.short_fraction={self.short_fraction} must be in (0, 1)")
        if not 0.0 <= self.short_seq_prob <= 1.0:
            raise ConfigError(f"data.short_seq_prob={self.short_seq_prob} must be in [0, 1]")
        if self.short_seq_prob and self.packing != "segment_pair":
            raise ConfigError(f"data.short_seq_prob={self.short_seq_prob} applies to data.packing=segment_pair only "
                              f"(got {self.packing}); set it to 0")
        if self.num_shards < 1 or not 0 <= self.shard_index < self.num_shards:
            raise ConfigError(
                f"data.shard_index={self.shard_index} must be in [0, data.num_shards={self.num_shards}) "
                "and data.num_shards at least 1"
            )


def check_schedule(cfg: ExperimentConfig) -> None:
    """The checks that need optim and trainer (and data) together: warmup and decay fit in the run, and a
    time budget only with schedules whose warmup is the same whatever max_steps turns out to be."""
    o, t = cfg.optim, cfg.trainer
    if t.max_time is not None:
        if cfg.data is not None and cfg.data.short_seq_len:
            raise ConfigError("trainer.max_time with data.short_seq_len is not supported: BERT's length schedule "
                              "switches at a share of max_steps, which the budget decides later")
        if o.schedule != "inverse_sqrt" and o.warmup_steps < t.calibration_steps:
            raise ConfigError(f"trainer.max_time needs optim.warmup_steps={o.warmup_steps} >= "
                              f"trainer.calibration_steps={t.calibration_steps}: the {o.schedule} rate after warmup "
                              "depends on max_steps, which is fixed after the calibration steps")
        return
    if o.warmup_steps > t.max_steps:
        raise ConfigError(f"optim.warmup_steps={o.warmup_steps} is more than trainer.max_steps="
                          f"{t.max_steps}: the rate would never reach its peak nor zero; lower it")
    if o.schedule == "wsd" and o.decay_steps and o.warmup_steps + o.decay_steps > t.max_steps:
        raise ConfigError(f"optim.warmup_steps={o.warmup_steps} + optim.decay_steps={o.decay_steps} is more than "
                          f"trainer.max_steps={t.max_steps}")


MAX_PARAMETERS = 10**11
"""The largest model a config may describe: 100B parameters, 1.6 TB of fp32 weights and Adam state (RoBERTa-large:
355M). Each size has its own range; this catches sizes that are each possible but together absurd."""


def check_size(cfg: ExperimentConfig) -> None:
    """The model's parameter count from the config's sizes, refused above MAX_PARAMETERS before anything is
    allocated (a hidden_size with a zero too many is 100x the weights)."""
    m, h = cfg.model, cfg.model.hidden_size
    per_layer = 4 * h * h + 2 * h * m.intermediate_size
    n = (cfg.tokenizer.vocab_size + cfg.data.seq_len + 2) * h + m.num_layers * per_layer
    if n > MAX_PARAMETERS:
        raise ConfigError(f"the model would have {n / 1e9:,.0f}B parameters (model.hidden_size={h}, model.num_layers="
                          f"{m.num_layers}, model.intermediate_size={m.intermediate_size}, tokenizer.vocab_size="
                          f"{cfg.tokenizer.vocab_size}), more than {MAX_PARAMETERS / 1e9:.0f}B: check them for a typo")


@dataclass
class ExperimentConfig:
    run_dir: str = option("runs/tiny", "Everything this experiment writes goes under here.")
    seed: int = option(0, "Fixes data split and order, masking and initialisation.", ge=0, le=MAX_SEED,
                       why="Lightning's seed_everything takes 0 to 2**32 - 1")
    data_seed: int | None = option(None, "Fixes only the corpus split, tokenizer and shards (pair sampling); null: seed. "
                                     "Runs that differ in seed but share data_seed share tokenizer and shards "
                                     "(the ablation runner's seeds).", ge=0, le=MAX_SEED,
                                   why="as seed")
    corpus: CorpusConfig = option(None, "Where the text comes from.")
    tokenizer: TokenizerConfig = option(None, "Byte-level BPE training.")
    data: DataConfig = option(None, "Tokenizing and packing into shards.")
    model: ModelConfig = option(None, "The RoBERTa encoder.")
    masking: MaskingConfig = option(None, "Dynamic (or static) MLM masking.")
    optim: OptimConfig = option(None, "AdamW and the learning-rate schedule.")
    batch: BatchConfig = option(None, "Global and micro batch sizes.")
    trainer: TrainerConfig = option(None, "Handed to pytorch_lightning.Trainer.")
    checkpoint: CheckpointConfig = option(None, "Checkpoint frequency and retention.")
    logger: LoggerConfig = option(None, "Metrics logging.")
    card: CardConfig = option(None, "Metadata of the exported model card (README.md of run_dir/hf).")
    eval: EvalConfig = option(None, "Linear probes on labelled tasks while training (docs/evaluation.md).")

    @property
    def prep_seed(self) -> int:
        """The seed of everything before training: corpus split, tokenizer, packing."""
        return self.seed if self.data_seed is None else self.data_seed

    def __post_init__(self) -> None:
        if self.optim is not None and self.trainer is not None:
            check_schedule(self)
        if self.model is not None and self.tokenizer is not None and self.data is not None:
            check_size(self)
        if self.batch is not None and self.data is not None and self.batch.by_tokens and self.data.short_seq_len:
            raise ConfigError("batch.by_tokens with data.short_seq_len is not supported: BERT's length schedule "
                              "counts sequences (set batch.by_tokens=false)")
        if self.tokenizer is not None and self.tokenizer.extend_from and not (self.model and self.model.init_from):
            raise ConfigError(
                "tokenizer.extend_from needs model.init_from: new tokens are appended to a pretrained model's "
                "vocabulary (set model.init_from, or drop tokenizer.extend_from)"
            )

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask under a scheduler, else the machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_machine(cfg: ExperimentConfig) -> None:
    """The checks against this machine, which a config read back from a checkpoint on another one must not meet."""
    cpus = usable_cpus()
    if cfg.data is not None and cfg.data.num_proc > cpus:
        raise ConfigError(f"data.num_proc={cfg.data.num_proc} is more than the {cpus} CPUs this process may use: "
                          "each is a tokenizer process with its own memory; lower it, or 0 for one per CPU")
    if cfg.eval is not None:
        cfg.eval.check_files()  # the probe tasks' files, before any work


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML experiment file (or only defaults when `path` is None) and apply dotted overrides. Every key is
    checked here, against its type, its range and this machine, so that a bad config fails before any work."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        data = read_yaml_mapping(path, "config", "a mapping of sections")
    data = apply_overrides(data, overrides or [])
    try:
        cfg = from_mapping(ExperimentConfig, data, "")
        check_machine(cfg)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None
    return cfg


def config_from_dict(data: dict[str, Any]) -> ExperimentConfig:
    """Rebuild a config saved with `to_dict` (checkpoints, logs)."""
    return from_mapping(ExperimentConfig, data, "")


def dump_config(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def describe_config() -> str:
    """Every key with its type, default and documentation, for --help (config_doc.py makes the docs' tables)."""
    lines = []

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                lines.append(f"{prefix}{f.name}:  # {f.metadata['help']}")
                walk(tp, prefix + f.name + ".")
                continue
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            bounds = f", {r}" if (r := range_text(f)) else ""
            lines.append(f"  {prefix}{f.name} ({type_name(tp)}, default {default!r}{bounds}): {f.metadata['help']}")

    walk(ExperimentConfig, "")
    return "\n".join(lines)
