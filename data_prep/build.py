"""One split of one slice, built: its documents stream from the corpus through `data.num_proc` encoding workers
(encode.py) and a packer per group (pack.py) into a `ShardWriter` (shards.py), with what was read, encoded and
packed counted per source for the split's record.

Apart from prepare.py, which decides what to build (the hashed directory, the tokenizer, which splits and slices
are missing, meta.json); this is the streaming pipeline itself, which bench/bench_data.py also times on its own.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import resource
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from .cli import naming
from .config import ExperimentConfig, usable_cpus
from .corpus import Corpus, Doc
from .encode import Encoders, load_encoder
from .encode_tiktoken import choose_encoder, sample_bytes
from .manifest import SPLITS
from .pack import PAIR_PACKINGS, Packer, PackStats
from .readers import CorpusStats
from .shards import ShardWriter
from .tokenizer_training import known_size


def valid_by_source(cfg: ExperimentConfig) -> bool:
    """Whether the valid split is packed source by source, for a validation loss per source (`val/loss/<name>`):
    when an explicit corpus.valid entry is named, or, with validation held out of the train sources, when a
    train source is named. Each source's validation documents then fill blocks of their own (one partly filled
    block per source more), and the split's record says how many blocks each has."""
    c = cfg.corpus
    if c.valid:
        return any(v.name for v in c.valid_entries)
    return c.valid_fraction > 0 and any(s.name for s in c.sources)



def num_workers(num_proc: int) -> int:
    """`data.num_proc` worker processes; 0: one per CPU this process may use."""
    return num_proc or usable_cpus()



def build_split(cfg: ExperimentConfig, corpus: Corpus, split: str, tokenizer_json: Path, out: Path,
                name: str, dtype: Any, ids: dict[str, int], log: Callable[[str], None] = print,
                tok: Tokenizer | None = None) -> dict[str, Any]:
    """Tokenize, pack and write one split of this slice; returns its record (also written as `{name}.json`).
    `tok`: the tokenizer of `tokenizer_json` when the caller has loaded it (else it is loaded here)."""
    from tqdm import tqdm

    d = cfg.data
    stats = CorpusStats()
    counts = {"documents": 0, "sentences": 0}
    explicit_valid = split == "valid" and bool(corpus.valid_sources)
    tally = SourceTally(len(corpus.valid_files) if explicit_valid else len(corpus.sources))
    docs = _slice(corpus.records(split, stats), d.shard_index, d.num_shards, counts, tally)  # type: ignore[arg-type]
    by_source = split == "valid" and valid_by_source(cfg)
    source_blocks = [0] * len(tally.counts)  # one per corpus.valid entry, or per train source
    packers: list[Packer] = []
    start = time.perf_counter()
    # the workers start first: their start-up runs while this process loads the tokenizer and chooses the encoder
    # a failed write of a shard file names no file (ENOSPC, EFBIG): name the split's files
    with Encoders(num_workers(d.num_proc)) as encoders, naming(out / f"{name}.*"), \
            ShardWriter(out, name, dtype, pairs=d.packing in PAIR_PACKINGS) as writer, tqdm(
            total=_read_size(corpus, split), unit="B", unit_scale=True, desc=f"data: {split}", mininterval=1.0,
            disable=None) as bar:
        # the split's first documents, the sample the self-check encodes both ways (encode_tiktoken.choose_encoder),
        # then put back
        sample = list(_first_bytes(docs, sample_bytes(_read_size(corpus, split))))
        if tok is None:
            tok = load_encoder(tokenizer_json)
        tok.encode_special_tokens = True  # "<mask>" in the corpus is text (encode.load_encoder)
        encoders.start(choose_encoder(tok, d.encoder, [doc.lines for doc in sample], dtype, log, tokenizer_json))
        docs = itertools.chain(sample, docs)
        # one group, or one per source (documents arrive source by source): a packer per group
        groups = itertools.groupby(docs, key=lambda doc: doc.source) if by_source else [(None, docs)]
        for k, group in groups:
            seed = hash_seed(cfg.prep_seed, d.shard_index, SPLITS.index(split), *([] if k is None else [k]))
            packer = Packer(d.seq_len, d.packing, ids["bos"], ids["eos"], dtype, seed=seed,
                            short_seq_prob=d.short_seq_prob)
            packers.append(packer)
            before = writer.num_blocks
            for enc in encoders.stream(doc.lines for doc in group):
                tally.tokens_of(enc.lengths)
                blocks = packer.add(enc)
                writer.write(blocks.tokens, blocks.lengths, blocks.nsp, blocks.b_start)
                bar.update(stats.bytes - bar.n)
            blocks = packer.finish()
            writer.write(blocks.tokens, blocks.lengths, blocks.nsp, blocks.b_start)
            bar.update(stats.bytes - bar.n)
            if k is not None:
                assert not source_blocks[k], f"{split}: the documents of source {k} did not arrive together"
                source_blocks[k] = writer.num_blocks - before
        encoder = encoders.final().name
        encoders.finish()  # the workers end and report their peak memory
        s = PackStats(**{f.name: sum(getattr(p.stats, f.name) for p in packers) for f in dataclasses.fields(PackStats)})
        if d.packing not in PAIR_PACKINGS:
            assert s.dropped_tokens == 0 and not s.copied_tokens, f"{split}: packing lost or copied tokens ({s})"
        assert s.dropped_tokens >= 0, f"{split}: more tokens placed than the stream has ({s})"
        assert sum(c["tokens"] for c in tally.counts) == s.stream_tokens, f"{split}: sources' tokens do not add up"
        seconds = time.perf_counter() - start
        return writer.commit({
            **counts,
            "encoder": encoder,
            "replaced_bytes": stats.replaced_bytes,
            "nul_bytes": stats.nul_bytes,
            "bytes_read": stats.bytes,
            "stream_tokens": s.stream_tokens,
            "packed_tokens": s.packed_tokens,
            "copied_tokens": s.copied_tokens,
            "padding_fraction": round(s.padding_fraction(d.seq_len), 6),
            "seconds": round(seconds, 2),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "worker_peak_rss_mb": round(encoders.peak_rss_bytes / 2**20, 1),  # 0: encoded in this process
            "sources": tally.counts,
            **({"source_blocks": source_blocks} if by_source else {}),
        })


class SourceTally:
    """Documents, bytes and stream tokens per source of one split. Documents are noted as they go to the
    encoder and their tokens as the encoded batches come back, in the same order, so a queue of (source,
    sentences left) of the documents in flight says whose tokens a batch holds (a document may span batches)."""

    def __init__(self, num_sources: int):
        self.counts = [{"documents": 0, "bytes": 0, "tokens": 0} for _ in range(num_sources)]
        self._in_flight: deque[list[int]] = deque()

    def document(self, doc: Doc) -> None:
        c = self.counts[doc.source]
        c["documents"] += 1
        c["bytes"] += doc.bytes
        self._in_flight.append([doc.source, len(doc.lines)])

    def tokens_of(self, lengths: np.ndarray) -> None:
        ends = np.concatenate([[0], np.cumsum(lengths)]).tolist()
        pos = 0
        while pos < len(lengths):
            entry = self._in_flight[0]
            take = min(entry[1], len(lengths) - pos)
            self.counts[entry[0]]["tokens"] += ends[pos + take] - ends[pos]
            pos += take
            entry[1] -= take
            if not entry[1]:
                self._in_flight.popleft()


def _slice(docs: Iterable[Doc], index: int, n: int, counts: dict[str, int], tally: SourceTally) -> Iterator[Doc]:
    for i, doc in enumerate(docs):
        if i % n == index:
            counts["documents"] += 1
            counts["sentences"] += len(doc.lines)
            tally.document(doc)
            yield doc


def _first_bytes(docs: Iterator[Doc], size: int) -> Iterator[Doc]:
    """Documents from `docs` until they hold `size` bytes (the rest stay in `docs`)."""
    total = 0
    while total < size and (doc := next(docs, None)) is not None:
        total += doc.bytes
        yield doc


def _read_size(corpus: Corpus, split: str) -> int | None:
    """Bytes a split's pass over the corpus reads (train: a weighted source is read once per pass), for the
    progress bar; None when a source's size is not known up front."""
    if split == "valid" and corpus.valid_sources:
        return known_size(corpus.valid_sources)
    sizes = [known_size(files) for files in corpus.source_files]
    if None in sizes:
        return None
    if split == "valid":
        return sum(sizes)  # type: ignore[arg-type]
    return sum(size * max(1, math.ceil(s.weight)) for size, s in zip(sizes, corpus.sources, strict=True))  # type: ignore[operator]


def hash_seed(*values: int) -> int:
    return int.from_bytes(hashlib.sha256(json.dumps(values).encode()).digest()[:8], "little")


def peak_rss_mb() -> float:
    """This process's peak resident set (its tokenizer workers report their own: workers.peak_rss_bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 / 1024 if sys.platform == "darwin" else rss / 1024
