"""Train RoBERTa's byte-level BPE tokenizer from the streaming corpus reader (`make tokenizer`).

The merges are learnt on the train split only, as the shards will encode it; the report (quality.json) measures
the result on the validation split and records the fingerprint of the corpus and settings, so an up-to-date
tokenizer is reused. What a tokenizer is, and how it is written, is tokenizer.py; with `model.init_from` nothing
is trained (tokenizer_hf.py).
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import pre_tokenizers, trainers

from .config import ConfigError, ExperimentConfig
from .corpus import Corpus
from .readers import CorpusStats
from .sources import short_label
from .tokenizer import (
    FORMAT_VERSION,
    MASK,
    SPECIALS,
    build_untrained,
    document_texts,
    evaluate,
    finalize,
    install,
    tokenizer_dir,
    up_to_date,
)
from .tokenizer_hf import tokenizer_from_hf


def settings(cfg: ExperimentConfig) -> dict[str, Any]:
    t = cfg.tokenizer
    return {"vocab_size": t.vocab_size, "min_frequency": t.min_frequency,
            "tokenizers": tokenizers.__version__, "format": FORMAT_VERSION,
            # only when set, so that tokenizers trained on all the text keep their fingerprint
            **({"max_train_bytes": t.max_train_bytes} if t.max_train_bytes else {})}


def training_documents(corpus: Corpus, max_bytes: int, stats: CorpusStats,
                       read: list[dict[str, Any]]) -> Iterator[list[str]]:
    """The documents the tokenizer learns from: the weighted train split, or with `max_bytes` a sample of it
    (`Corpus.sample`) whose sources share the bytes in proportion to weight x size, or to weight alone when a
    source's size is not known up front (.gz, .parquet, hf:). `read` gets one {name, path, weight, documents,
    bytes} per source and a "basis" entry naming the rule."""
    sizes = [known_size(files) for files in corpus.source_files]
    by_size = None not in sizes
    read.extend({"name": s.label, "path": s.path, "weight": s.weight, "documents": 0, "bytes": 0}
                for s in corpus.sources)
    if max_bytes:
        shares = [s.weight * (size if by_size else 1) for s, size in zip(corpus.sources, sizes, strict=True)]
        docs = corpus.sample(max_bytes, shares, stats)
    else:
        docs = corpus.records("train", stats)
    for doc in docs:
        read[doc.source]["documents"] += 1
        read[doc.source]["bytes"] += doc.bytes
        yield doc.lines
    if max_bytes and not any(r["documents"] for r in read):
        raise ConfigError(f"tokenizer.max_train_bytes={max_bytes} is smaller than the first document of every "
                          "source (whole documents only): raise it, or set 0 for all the text")



def _batches(docs: Iterator[list[str]], stats: CorpusStats, bar: Any, size: int = 1 << 20) -> Iterator[list[str]]:
    """Document texts (`document_texts`) in batches of about `size` characters. So the merges are learnt on
    the text the model will see, newlines and indentation included, and the Rust trainer gets few, large items:
    one item per line made it about 15% slower than `tokenizers` reading the file itself
    (bench/bench_tokenizer.py). The progress bar follows bytes read."""
    batch: list[str] = []
    chars = seen = 0
    for text in document_texts(docs, size):
        batch.append(text)
        chars += len(text)
        if chars >= size:
            yield batch
            batch, chars = [], 0
            bar.update(stats.bytes - seen)
            seen = stats.bytes
    if batch:
        yield batch
    bar.update(stats.bytes - seen)


def train_tokenizer(cfg: ExperimentConfig, force: bool = False, log=print) -> Path:
    """Train (or reuse) the experiment's tokenizer; returns its directory. With `model.init_from`, take the
    pretrained model's tokenizer instead (`tokenizer_from_hf`)."""
    from tqdm import tqdm

    if cfg.model.init_from:
        return tokenizer_from_hf(cfg, force, log)
    out = tokenizer_dir(cfg)
    corpus = Corpus.of_experiment(cfg)
    fingerprint = {"corpus": corpus.fingerprint(), **settings(cfg)}
    if not force and up_to_date(out, "fingerprint", fingerprint):
        log(f"tokenizer: {out} is up to date for this corpus and these settings "
            "(delete it or pass --force to rebuild)")
        return out

    # 1) train on the train split only, streaming, so the validation numbers below are honest
    start = time.perf_counter()
    tok = build_untrained()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.tokenizer.vocab_size - 1,  # <mask> is added after training, as the last id
        min_frequency=cfg.tokenizer.min_frequency,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    stats = CorpusStats()
    cap = cfg.tokenizer.max_train_bytes
    total = known_size(corpus.train_sources)
    total = min(total, cap) if total is not None and cap else cap or total
    read: list[dict[str, Any]] = []
    with tqdm(total=total, unit="B", unit_scale=True, desc="tokenizer: reading train", mininterval=1.0,
              disable=None) as bar:
        docs = training_documents(corpus, cap, stats, read)
        tok.train_from_iterator(_batches(docs, stats, bar), trainer=trainer)
    finalize(tok)
    train_seconds = time.perf_counter() - start

    # 2) measure on the validation split
    quality = evaluate(tok, corpus.documents("valid"))
    report = {
        "vocab_size": tok.get_vocab_size(),
        **quality,
        "train_seconds": round(train_seconds, 2),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "train_documents": sum(r["documents"] for r in read),
        "train_bytes": sum(r["bytes"] for r in read),
        "bytes_read": stats.bytes,
        "max_train_bytes": cap,
        "sources": read,
        "replaced_bytes": stats.replaced_bytes,
        "nul_bytes": stats.nul_bytes,
        "fingerprint": fingerprint,
    }
    if tok.get_vocab_size() < cfg.tokenizer.vocab_size:
        log(f"tokenizer: the corpus supports only {tok.get_vocab_size()} tokens of the requested "
            f"{cfg.tokenizer.vocab_size} at min_frequency={cfg.tokenizer.min_frequency}; <mask> is id "
            f"{tok.token_to_id(MASK)}")

    # 3) write into a fresh directory and swap it in, so a crash never leaves a half-written tokenizer
    install(tok, report, out, cfg.data.seq_len)
    log(format_report(report, out))
    return out



def format_report(report: dict[str, Any], directory: Path) -> str:
    exact = report["exact_roundtrip"]
    return (
        f"tokenizer: wrote {directory}\n"
        f"  vocab size        {report['vocab_size']}\n"
        f"  bytes per token   {report['bytes_per_token']} (validation text, {report['valid_bytes']:,} bytes)\n"
        f"  tokens per word   {report['tokens_per_word']}\n"
        f"  exact round trip  {'n/a (no validation text)' if exact is None else f'{exact:.4%}'}\n"
        f"  training time     {report['train_seconds']} s on {report['train_bytes']:,} bytes"
        + (f" (a sample: tokenizer.max_train_bytes={report['max_train_bytes']:,})" if report.get("max_train_bytes")
           else "") + "\n"
        f"  peak memory       {report['peak_rss_mb']} MB (process RSS)"
        + "".join(f"\n  read from {short_label(r['name']):24} {r['documents']:>10,} documents {r['bytes']:>14,} bytes"
                  f" (weight {r['weight']:g})" for r in report.get("sources", []) if len(report["sources"]) > 1)
    )


def known_size(sources: list[str]) -> int | None:
    total = 0
    for s in sources:
        if s.startswith(("hf:", "builtin:")) or s.endswith(".gz") or s.endswith(".parquet"):
            return None  # compressed or remote: the byte count of the text is not known up front
        total += Path(s).stat().st_size
    return total


def _peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 / 1024 if sys.platform == "darwin" else rss / 1024
