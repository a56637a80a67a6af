"""The experiment's corpus: train and valid documents (lists of sentences) of its sources, streamed.

A *document* is a list of non-empty lines; each line is one *sentence* (the unit FULL-SENTENCES packing keeps
whole). Sources are resolved by specs.py (files, directories, globs, `hf:` datasets, `builtin:python-docs`) and
read by readers.py (one reader per format, decoding never fatal and always counted); this module decides which
document goes to which split, and how often (`sources.py`'s weights).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal, NamedTuple

from .config import CorpusConfig, ExperimentConfig
from .readers import CorpusError, CorpusStats, read_source
from .specs import fingerprint, resolve_sources

Split = Literal["train", "valid"]


# ---------------------------------------------------------------------------------------------------------------
# The split-aware corpus


def _mix64(x: int) -> int:
    """splitmix64 finalizer: a counter-based hash, so the split of document i depends on (seed, i) only."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def held_out(seed: int, doc_index: int, fraction: float) -> bool:
    return _mix64(_mix64(seed) ^ doc_index) < fraction * 2.0**64


def kept(seed: int, source: str, doc_index: int, fraction: float) -> bool:
    """Whether document `doc_index` of the source `source` (its path spec) is in a weight's fractional pass: a
    pure function of (seed, source, index), so every slice and every rerun keeps the same documents."""
    key = int.from_bytes(hashlib.sha256(source.encode()).digest()[:8], "little")
    return _mix64(_mix64(seed ^ key) ^ doc_index) < fraction * 2.0**64


class Doc(NamedTuple):
    """A document with where it came from: `source` indexes corpus.train (corpus.valid for an explicit
    validation set), `bytes` is what was read for it (the separator before it included)."""

    source: int
    bytes: int
    lines: list[str]


class Corpus:
    """Train and valid documents of an experiment's corpus section.

    With no `valid` sources, document i of `train` goes to valid when hash(seed, i) < valid_fraction: a
    seeded, streaming, document-level split that never holds the corpus in memory. i counts the documents of
    all train sources in order, once each, whatever their weights.

    Weights apply to the train split only (`sources.py`): source k is read ceil(weight) times in a row; pass p
    keeps its documents j that are not held out and, in the last pass of a fractional weight, those with
    `kept(seed, path, j, weight - p)`. Copies of a document are a whole pass apart, never in one block, and
    with every weight 1 the stream is exactly the unweighted one.
    """

    def __init__(self, cfg: CorpusConfig, seed: int = 0, exclude: Iterable[str | Path] = ()):
        self.cfg = cfg
        self.seed = seed
        self.sources = cfg.sources
        exclude = list(exclude)
        self.source_files = [resolve_sources([s.path], "corpus.train", exclude) for s in self.sources]
        self.train_sources = [f for files in self.source_files for f in files]
        self.valid_files = [resolve_sources([v.path], "corpus.valid", exclude) for v in cfg.valid_entries]
        self.valid_sources = [f for files in self.valid_files for f in files]

    @classmethod
    def of_experiment(cls, cfg: ExperimentConfig) -> Corpus:
        """The experiment's corpus, with the prep seed; its globs and directories never match what the run
        writes (run_dir, and data.cache_dir where remote shards are kept)."""
        outputs = [cfg.run_path] + ([cfg.data.cache_dir] if cfg.data.cache_dir else [])
        return cls(cfg.corpus, cfg.prep_seed, exclude=outputs)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(fingerprint(self.train_sources).encode())
        h.update(fingerprint(self.valid_sources).encode())
        h.update(json.dumps([self.seed, self.cfg.valid_fraction, self.cfg.text_field, self.cfg.max_line_bytes]).encode())
        if any(s.weight != 1 for s in self.sources):  # only then, so unweighted corpora keep their address
            h.update(json.dumps([[s.path, s.weight] for s in self.sources]).encode())
        return h.hexdigest()

    def documents(self, split: Split, stats: CorpusStats | None = None) -> Iterator[list[str]]:
        for doc in self.records(split, stats):
            yield doc.lines

    def records(self, split: Split, stats: CorpusStats | None = None) -> Iterator[Doc]:
        """The split's documents as `Doc`s, in corpus order (train: weighted)."""
        stats = stats if stats is not None else CorpusStats()
        if split == "valid" and self.valid_sources:
            docs = (Doc(k, n, doc) for k, files in enumerate(self.valid_files) for n, doc in self._read(files, stats))
            yield from self._count(docs, stats, "corpus.valid")
            return
        seeded = not self.valid_sources and self.cfg.valid_fraction > 0
        if split == "valid" and not seeded:
            return
        yield from self._count(self._weighted(split == "valid", seeded, stats), stats,
                               "corpus.train" if split == "train" else None)

    def _weighted(self, want_valid: bool, seeded: bool, stats: CorpusStats) -> Iterator[Doc]:
        base = 0  # documents of the sources before this one: the global index of its document 0
        for k, (source, files) in enumerate(zip(self.sources, self.source_files, strict=True)):
            passes = 1 if want_valid else max(1, math.ceil(source.weight))
            count = 0
            for p in range(passes):
                share = 1.0 if want_valid else min(1.0, source.weight - p)
                if share <= 0 and not seeded:
                    break  # nothing to keep, and no global index to count
                for j, (n, doc) in enumerate(self._read(files, stats)):
                    count += p == 0
                    if seeded and held_out(self.seed, base + j, self.cfg.valid_fraction) != want_valid:
                        continue
                    if share < 1.0 and not kept(self.seed, source.path, j, share):
                        continue
                    yield Doc(k, n, doc)
            base += count

    def sample(self, max_bytes: int, shares: list[float], stats: CorpusStats) -> Iterator[Doc]:
        """Whole train documents of at most `max_bytes` in all (the tokenizer's sample): source k's budget is the
        bytes left times shares[k] / (the shares of k and the sources after it), so what a small source leaves
        goes to the next ones; each source is read from its start and left at the first document that does not
        fit its budget, so no more is read than the sample needs.

        Held-out documents are skipped by their global index while it is known, i.e. while every earlier source
        was read to its end; after a source was left early, a per-source draw at the same rate stands in for
        it (an explicit corpus.valid makes the separation exact)."""
        seeded = not self.valid_sources and self.cfg.valid_fraction > 0
        left, base = max_bytes, 0
        for k, files in enumerate(self.source_files):
            rest = sum(shares[k:])
            budget = left * shares[k] / rest if rest > 0 else 0
            taken, count, whole = 0, 0, True
            for j, (n, doc) in enumerate(self._read(files, stats) if budget > 0 else ()):
                count += 1
                if seeded:
                    index, seed = (base + j, self.seed) if base is not None else (j, _mix64(self.seed ^ k))
                    if held_out(seed, index, self.cfg.valid_fraction):
                        continue
                if taken + n > budget:
                    whole = False
                    break
                taken += n
                yield Doc(k, n, doc)
            left -= taken
            base = base + count if base is not None and whole and budget > 0 else None

    def _read(self, files: list[str], stats: CorpusStats) -> Iterator[tuple[int, list[str]]]:
        """(bytes read for it, document) of each document of `files`."""
        for source in files:
            before = stats.bytes
            for doc in read_source(source, self.cfg.text_field, self.cfg.max_line_bytes, stats):
                yield stats.bytes - before, doc
                before = stats.bytes

    @staticmethod
    def _count(docs: Iterator[Doc], stats: CorpusStats, key: str | None) -> Iterator[Doc]:
        n = 0
        for doc in docs:
            n += 1
            stats.documents += 1
            stats.sentences += len(doc.lines)
            yield doc
        if n == 0 and key is not None:
            raise CorpusError(f"{key}: the corpus holds no text (empty files, or only blank lines and NUL bytes)")
