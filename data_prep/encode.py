"""Tokenize documents into the token stream of the corpus, sentence by sentence, in worker processes.

The token stream of the corpus
    A document is a list of lines (`corpus.py`); each line is one *sentence*, the unit packing keeps whole.
    Sentence 0 of a document is encoded as the line, sentence j > 0 as "\\n" + line, without special tokens and
    with special-token text in the corpus (a literal "<mask>") encoded as ordinary text. So the tokens of a
    document's sentences, back to back, decode to "\\n".join(lines) exactly (byte-level BPE is lossless) and the
    model sees line structure (code, lists, tables) for the price of about one token per line - the price
    fairseq pays for its per-line `</s>`. The *token stream of the corpus* is the concatenation of the
    sentences' tokens, document after document. FULL-SENTENCES blocks with their special tokens removed are
    exactly this stream, cut into pieces: nothing dropped, nothing repeated, no remainder thrown away.

Encoding runs in `num_proc` worker processes over batches of whole sentences (measured on 2 cores: a process
pool is about 20% faster than `encode_batch`'s own thread pool, since the ids leave the tokenizer as Python
lists); packing is a single pass over sentence lengths plus one vectorised `np.insert` per batch.

A document's sentences in a batch are encoded in one call, as the text they make together, and cut back into
sentences at the tokens that start with a newline (`SentenceEncoder`): one call per document instead of one per
line, the same tokens. Why the same, for RoBERTa's (GPT-2's) byte-level BPE: its pre-tokenizer splits text with
the regex `'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+`, BPE then works inside
each piece, and every piece is either whitespace only or non-whitespace after at most one leading space. When each
sentence but the document's last ends in a non-whitespace character, no piece can run from one sentence into
the "\n" that starts the next, and the regex decides each piece (lookahead included) from characters inside its
sentence; so the whole text's pieces are the sentences' pieces, back to back, and the "\n" of every sentence
j > 0 starts a piece (and a token). A text where a sentence ends in whitespace (`\\s\\n`: trailing spaces, a
blank line, "\r"; `str.isspace` holds every character the tokenizer's regex calls whitespace, a test checks),
or holds a "\n" of its own, is encoded sentence by sentence as before; so is everything with a tokenizer whose
pipeline is not exactly this one (`splittable`). `tests/test_encode_fast.py` compares both ways on nasty text.

What turns texts into ids is a `TextsEncoder`: `tokenizers`' `encode_batch_fast` by default, or tiktoken's BPE
core (encode_tiktoken.py), which gives the same ids 2-3x faster; `data.encoder` and a self-check choose
(`EncoderChoice`: the workers start with tiktoken while the self-check runs in the parent, and nothing they
encoded is used before it has passed; if it fails, they are told to use `tokenizers` and encode those batches
again). The worker processes start before the encoder is chosen (`Encoders`), so their start-up (imports) runs
while the parent loads the tokenizer and chooses.

Apart from pack.py, which cuts this stream into blocks; `Encoded` is what passes between the two.
"""

from __future__ import annotations

import functools
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers

from .workers import WorkerError, WorkerPool


@dataclass
class Encoded:
    """A batch of sentences, encoded: `tokens` back to back, `lengths` per sentence, `first` marks the first
    sentence of a document (a document may continue from the previous batch: then its batch starts False)."""

    tokens: np.ndarray  # (T,) uint16 or uint32
    lengths: np.ndarray  # (S,) int64
    first: np.ndarray  # (S,) bool


TextsEncoder = Callable[[list[str]], list]
"""Texts -> each text's ids (a list of ints or an array), without special tokens and with their text as text."""


def tokenizers_texts(tok: Tokenizer) -> TextsEncoder:
    """The `TextsEncoder` of `tokenizers` itself: `encode_batch_fast` (its thread pool over the texts)."""
    return lambda texts: [e.ids for e in tok.encode_batch_fast(texts, add_special_tokens=False)]


def load_encoder(tokenizer_json: str | Path) -> Tokenizer:
    tok = Tokenizer.from_file(str(tokenizer_json))
    tok.encode_special_tokens = True  # "<mask>" in the corpus is text, never the special token
    return tok


def tokenizers_texts_of(tokenizer_json: str) -> TextsEncoder:
    """`tokenizers_texts` of the tokenizer saved at `tokenizer_json` (what a worker is sent: a path, not a tokenizer)."""
    return tokenizers_texts(load_encoder(tokenizer_json))


def encode_sentences(tok: Tokenizer, lines: list[str], first: list[bool], dtype: np.dtype) -> Encoded:
    """Encode a batch of sentences (see the module docstring); for one-off calls, `SentenceEncoder` for many."""
    return SentenceEncoder.of(tok, dtype)(lines, first)


def encode_sentences_one_by_one(tok: Tokenizer, lines: list[str], first: list[bool], dtype: np.dtype) -> Encoded:
    """The definition: each sentence encoded on its own, as the line or "\\n" + line (the reference of the tests)."""
    return _one_by_one(tokenizers_texts(tok), lines, first, np.dtype(dtype))


def _one_by_one(encode_texts: TextsEncoder, lines: list[str], first: list[bool], dtype: np.dtype) -> Encoded:
    texts = [line if f else "\n" + line for line, f in zip(lines, first, strict=True)]
    ids = encode_texts(texts)
    lengths = np.fromiter(map(len, ids), np.int64, len(ids))
    tokens = np.fromiter(chain.from_iterable(ids), dtype, int(lengths.sum()))
    return Encoded(tokens, lengths, np.asarray(first, dtype=bool))


def splittable(tok: Tokenizer) -> bool:
    """Whether the tokenizer is RoBERTa's byte-level BPE pipeline, whose encoding of a document's text can be cut
    into its sentences' encodings (module docstring): no normalizer, the GPT-2 regex without a prefix space, BPE
    without dropout, no truncation or padding, and special-token text taken as text with no other added token
    (an added token could match across a newline)."""
    pre = tok.pre_tokenizer
    return (tok.normalizer is None and isinstance(pre, pre_tokenizers.ByteLevel) and not pre.add_prefix_space
            and pre.use_regex and isinstance(tok.model, models.BPE) and tok.model.dropout is None
            and tok.truncation is None and tok.padding is None and tok.encode_special_tokens
            and all(t.special for t in tok.get_added_tokens_decoder().values()))


def line_starts(tok: Tokenizer) -> np.ndarray | None:
    """For a `splittable` tokenizer, which ids are tokens that start with a newline byte (the cuts between a
    document's sentences); None for any other."""
    if not splittable(tok):
        return None
    newline = tok.pre_tokenizer.pre_tokenize_str("\n")[0][0]  # "\n" in the byte-level alphabet
    vocab = tok.get_vocab(with_added_tokens=True)
    starts = np.zeros(max(vocab.values()) + 1, bool)
    starts[[i for t, i in vocab.items() if t.startswith(newline)]] = True
    return starts


class SentenceEncoder:
    """`encode_sentences` with what it needs prepared once: `encode_texts` turns texts into ids, and
    `starts_line` says which ids are tokens that start with a newline (`line_starts`; None: each sentence is
    encoded on its own). `SentenceEncoder.of(tok, dtype, texts)` makes one for a tokenizer, with `texts(tok)`
    (`tokenizers_texts`, or encode_tiktoken.tiktoken_texts for a tokenizer it gives the same ids)."""

    def __init__(self, encode_texts: TextsEncoder, dtype: np.dtype, starts_line: np.ndarray | None):
        self.encode_texts, self.dtype, self.starts_line = encode_texts, np.dtype(dtype), starts_line

    @classmethod
    def of(cls, tok: Tokenizer, dtype: np.dtype, texts: Callable[[Tokenizer], TextsEncoder] = tokenizers_texts,
           ) -> SentenceEncoder:
        return cls(texts(tok), dtype, line_starts(tok))

    def __call__(self, lines: list[str], first: list[bool]) -> Encoded:
        if self.starts_line is None or not lines:
            return _one_by_one(self.encode_texts, lines, first, self.dtype)
        # 1) runs of sentences of one document: its text, or (not provably cuttable) its sentences one by one
        heads = [i for i, f in enumerate(first) if f]
        bounds = ([] if heads[:1] == [0] else [0]) + heads + [len(lines)]
        texts: list[str] = []
        runs: list[tuple[int, int, bool]] = []  # (sentences with a leading "\n", without, as one text)
        for a, b in zip(bounds[:-1], bounds[1:], strict=False):
            head = int(bool(first[a]))  # the run starts its document: its first sentence has no "\n"
            text = "\n".join(lines[a:b]) if head else "\n" + "\n".join(lines[a:b])
            # no line holds a "\n" of its own, and none but the run's last is empty or ends in whitespace (a
            # per-line test: a regex search for \s\n over the text cost 6% of a worker's time with tiktoken)
            whole = text.count("\n") == b - a - head and not any(not s or s[-1].isspace() for s in lines[a : b - 1])
            texts += [text] if whole else [line if first[i] else "\n" + line for i, line in enumerate(lines[a:b], a)]
            runs.append((b - a - head, head, whole))
        # 2) one call for the batch, 3) cut each run's tokens before its sentences' newlines
        encodings = iter(self.encode_texts(texts))
        tokens, lengths = [], []
        for newlines, head, whole in runs:
            if whole:
                ids = np.asarray(next(encodings), self.dtype)
                cuts = np.flatnonzero(self.starts_line[ids])
                assert len(cuts) == newlines, f"{len(cuts)} tokens start a line where {newlines} lines start"
                cuts = np.concatenate([[0], cuts, [len(ids)]]) if head else np.append(cuts, len(ids))
                tokens.append(ids)
                lengths.append(np.diff(cuts))
            else:
                for _ in range(newlines + head):
                    tokens.append(np.asarray(next(encodings), self.dtype))
                    lengths.append(np.array([len(tokens[-1])]))
        return Encoded(np.concatenate(tokens) if tokens else np.zeros(0, self.dtype),
                       np.concatenate(lengths).astype(np.int64) if lengths else np.zeros(0, np.int64),
                       np.asarray(first, dtype=bool))


def sentence_batches(docs: Iterable[list[str]], size: int) -> Iterator[tuple[list[str], list[bool]]]:
    """(lines, first-of-document flags) in batches of about `size` sentences; a long document is cut between
    sentences, so a batch never holds more than `size` lines."""
    lines: list[str] = []
    first: list[bool] = []
    for doc in docs:
        for start in range(0, len(doc), size):
            part = doc[start : start + size]
            lines.extend(part)
            first.append(start == 0)
            first.extend([False] * (len(part) - 1))
            if len(lines) >= size:
                yield lines, first
                lines, first = [], []
    if lines:
        yield lines, first


@dataclass(eq=False)
class EncoderSpec:
    """How to make a `SentenceEncoder`, picklable for the workers: the encoder's `name` ("tokenizers" or
    "tiktoken"), `texts`, a function of no arguments that makes its `TextsEncoder` in the process that calls it
    (loading the tokenizer, or building tiktoken's table), the token `dtype` and `starts_line` (`line_starts`)."""

    name: str
    texts: Callable[[], TextsEncoder]
    dtype: str
    starts_line: np.ndarray | None

    def build(self) -> SentenceEncoder:
        return SentenceEncoder(self.texts(), np.dtype(self.dtype), self.starts_line)


def tokenizers_spec(tok: Tokenizer, dtype: np.dtype, tokenizer_json: str | Path | None = None) -> EncoderSpec:
    """The `EncoderSpec` of `tokenizers` for `tok`, saved at `tokenizer_json` (workers load it from there; without
    it, the spec serves this process only)."""
    texts = (functools.partial(tokenizers_texts_of, str(tokenizer_json)) if tokenizer_json is not None
             else functools.partial(tokenizers_texts, tok))
    return EncoderSpec("tokenizers", texts, np.dtype(dtype).str, line_starts(tok))


class EncoderChoice:
    """The encoder a split is written with. The work starts with `first`; `check`, when given, runs beside it in
    a thread and returns the spec that stands (`first` itself, or its fallback) or raises; `final()` waits for it.
    Nothing encoded with `first` may be used before `final()` has returned it (`Encoders.stream` keeps to this)."""

    def __init__(self, first: EncoderSpec, check: Callable[[], EncoderSpec] | None = None):
        self.first = first
        self._verdict: Future | None = None
        if check is not None:
            executor = ThreadPoolExecutor(1, thread_name_prefix="encoder-self-check")
            self._verdict = executor.submit(check)
            executor.shutdown(wait=False)

    def final(self) -> EncoderSpec:
        return self.first if self._verdict is None else self._verdict.result()


def _init_worker(spec: EncoderSpec) -> Callable[[tuple[list[str], list[bool]]], Encoded]:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # parallelism comes from the processes
    encode = spec.build()
    return lambda batch: encode(*batch)


class Encoders:
    """Where a split's sentences are encoded: `num_proc` worker processes, or this process (num_proc <= 1). The
    workers start here, before the encoder is chosen; `start(choice)` gives them the encoder, `stream(docs)`
    encodes documents in order (call it once per group of documents; each call's results are all read before it
    returns). Use as a context manager; `peak_rss_bytes` is the largest worker's peak once it is left."""

    def __init__(self, num_proc: int):
        # our own pool (workers.py), not `multiprocessing.Pool` nor `ProcessPoolExecutor`: a Pool replaces a worker
        # that dies (killed for memory, or failing as it starts) and its task never completes, and an executor can
        # wait for ever on a result that a dying worker had half sent; here a dead worker ends the run at once
        self.pool = WorkerPool(num_proc, preload=("data_prep.encode_tiktoken", "tiktoken")) if num_proc > 1 else None
        self.choice: EncoderChoice | None = None
        self._encode: SentenceEncoder | None = None  # this process's, or None
        self._settled = False  # whether the choice's final spec is known and what the workers run
        self.peak_rss_bytes = 0

    def start(self, choice: EncoderChoice) -> None:
        self.choice = choice
        if self.pool is not None:
            self.pool.initialize(_init_worker, (choice.first,))

    def final(self) -> EncoderSpec:
        assert self.choice is not None, "start() first"
        return self.choice.final()

    def stream(self, docs: Iterable[list[str]], batch_sentences: int = 4096) -> Iterator[Encoded]:
        """Encoded batches of `docs`, in order; with workers, at most two batches each in flight, so memory stays
        flat however long the stream (`Pool.imap` would read ahead without bound)."""
        assert self.choice is not None, "start() first"
        batches = sentence_batches(docs, batch_sentences)
        if self.pool is None:
            if self._encode is None:  # nothing runs beside the self-check here: wait for it
                self._encode = self.choice.final().build()
            for lines, first in batches:
                yield self._encode(lines, first)
            return
        pool, pending = self.pool, deque()  # the batches in flight, oldest first
        try:
            for batch in batches:
                pool.submit(batch)
                pending.append(batch)
                if len(pending) >= 2 * pool.num_proc:
                    yield self._result(pending)
            while pending:
                yield self._result(pending)
        except WorkerError as e:
            raise WorkerError(
                f"data: a tokenizer worker process died (pid {e.pid}, exit code {e.exitcode}). It was killed (out of "
                "memory: lower data.num_proc) "
                "or failed as it started: a script that calls data preparation must do "
                "so under `if __name__ == \"__main__\":`, since the workers import it again") from None

    def _result(self, pending: deque) -> Encoded:
        assert self.pool is not None and self.choice is not None
        if not self._settled:  # before the first result is used: the self-check's verdict
            final = self.choice.final()
            if final is not self.choice.first:  # its fallback: what the workers encoded so far is thrown away
                for _ in range(self.pool.in_flight):
                    self.pool.result()
                self.pool.initialize(_init_worker, (final,))
                for batch in pending:
                    self.pool.submit(batch)
            self._settled = True
        pending.popleft()
        return self.pool.result()

    def finish(self) -> None:
        """Let the workers finish and end (every stream read to its end), and note their peak memory. Again, or
        after `__exit__`: nothing more."""
        if self.pool is not None:
            self.pool.close(finish=True)
            self.peak_rss_bytes = self.pool.peak_rss_bytes

    def __enter__(self) -> Encoders:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self.pool is not None:
            self.pool.close(finish=exc_type is None)  # by an exception: nothing they do now is wanted


def encode_stream(tokenizer_json: str | Path, docs: Iterable[list[str]], dtype: np.dtype, num_proc: int = 1,
                  batch_sentences: int = 4096) -> Iterator[Encoded]:
    """Encoded batches of `docs`, in order, with `tokenizers` (`Encoders` with no choice to make)."""
    tok = load_encoder(tokenizer_json)
    with Encoders(num_proc) as encoders:
        encoders.start(EncoderChoice(tokenizers_spec(tok, dtype, tokenizer_json)))
        yield from encoders.stream(docs, batch_sentences)
