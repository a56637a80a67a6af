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
core (encode_tiktoken.py), which gives the same ids 2-3x faster; `data.encoder` and a self-check choose.

Apart from pack.py, which cuts this stream into blocks; `Encoded` is what passes between the two.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

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


def encode_sentences(tok: Tokenizer, lines: list[str], first: list[bool], dtype: np.dtype) -> Encoded:
    """Encode a batch of sentences (see the module docstring); for one-off calls, `SentenceEncoder` for many."""
    return SentenceEncoder(tok, dtype)(lines, first)


def encode_sentences_one_by_one(tok: Tokenizer, lines: list[str], first: list[bool], dtype: np.dtype) -> Encoded:
    """The definition: each sentence encoded on its own, as the line or "\\n" + line (the reference of the tests)."""
    texts = [line if f else "\n" + line for line, f in zip(lines, first, strict=True)]
    ids = [e.ids for e in tok.encode_batch_fast(texts, add_special_tokens=False)]
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


class SentenceEncoder:
    """`encode_sentences` with what it needs prepared once: for a `splittable` tokenizer, which ids are tokens
    that start with a newline byte (the cuts between sentences). `texts` makes the function that encodes texts
    (`tokenizers_texts`, or encode_tiktoken.tiktoken_texts for a tokenizer it gives the same ids)."""

    def __init__(self, tok: Tokenizer, dtype: np.dtype,
                 texts: Callable[[Tokenizer], TextsEncoder] = tokenizers_texts):
        self.tok, self.dtype = tok, np.dtype(dtype)
        self.encode_texts = texts(tok)
        self.starts_line: np.ndarray | None = None
        if splittable(tok):
            newline = tok.pre_tokenizer.pre_tokenize_str("\n")[0][0]  # "\n" in the byte-level alphabet
            vocab = tok.get_vocab(with_added_tokens=True)
            self.starts_line = np.zeros(max(vocab.values()) + 1, bool)
            self.starts_line[[i for t, i in vocab.items() if t.startswith(newline)]] = True

    def __call__(self, lines: list[str], first: list[bool]) -> Encoded:
        if self.starts_line is None or not lines:
            return encode_sentences_one_by_one(self.tok, lines, first, self.dtype)
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


def _init_worker(tokenizer_json: str, dtype: str, texts: Callable[[Tokenizer], TextsEncoder],
                 ) -> Callable[[tuple[list[str], list[bool]]], Encoded]:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # parallelism comes from the processes
    encode = SentenceEncoder(load_encoder(tokenizer_json), np.dtype(dtype), texts)
    return lambda batch: encode(*batch)


def encode_stream(
    tokenizer_json: str | Path, docs: Iterable[list[str]], dtype: np.dtype, num_proc: int = 1,
    batch_sentences: int = 4096, worker_peaks: list[int] | None = None,
    texts: Callable[[Tokenizer], TextsEncoder] = tokenizers_texts,
) -> Iterator[Encoded]:
    """Encoded batches of `docs`, in order, with the text encoder `texts` makes (a module-level function: the
    workers are handed it by name). num_proc > 1 uses that many worker processes with at most two
    batches each in flight, so memory stays flat however long the stream (`Pool.imap` would read ahead
    without bound); num_proc = 1 encodes here, with the tokenizer's own threads. With `worker_peaks`, the
    largest worker's peak resident set (bytes) is appended to it once the stream is done."""
    batches = sentence_batches(docs, batch_sentences)
    if num_proc <= 1:
        encode = SentenceEncoder(load_encoder(tokenizer_json), dtype, texts)
        for lines, first in batches:
            yield encode(lines, first)
        return
    # Our own pool (workers.py), not `multiprocessing.Pool` nor `ProcessPoolExecutor`: a Pool replaces a worker
    # that dies (killed for memory, or failing as it starts) and its task never completes, and an executor can wait
    # for ever on a result that a dying worker had half sent; here a dead worker ends the run at once.
    with WorkerPool(num_proc, _init_worker, (str(tokenizer_json), np.dtype(dtype).str, texts)) as pool:
        in_flight = 0
        try:
            for batch in batches:
                pool.submit(batch)
                in_flight += 1
                if in_flight >= 2 * num_proc:
                    yield pool.result()
                    in_flight -= 1
            for _ in range(in_flight):
                yield pool.result()
        except WorkerError as e:
            raise WorkerError(
                f"data: a tokenizer worker process died (pid {e.pid}, exit code {e.exitcode}). It was killed (out of "
                "memory: lower data.num_proc) "
                "or failed as it started: a script that calls data preparation must do "
                "so under `if __name__ == \"__main__\":`, since the workers import it again") from None
    if worker_peaks is not None:  # the workers finished as the pool was left: their peaks are in
        worker_peaks.append(pool.peak_rss_bytes)
