"""Pack the token stream into blocks: RoBERTa's FULL-SENTENCES and DOC-SENTENCES, BERT's SEGMENT-PAIR and
SENTENCE-PAIR (RoBERTa paper, arXiv 1907.11692, section 4.2).

The token stream of the corpus (encode.py): each document's sentences (its lines) encoded back to back, without
special tokens, sentence j > 0 as "\\n" + line; it arrives in `Encoded` batches, in corpus order.

Block layouts (n = seq_len; the room for sentence tokens is n - 2):
    full_sentences  `<s> s1 s2 ... </s>`: sentences taken contiguously; crossing into the next document adds one
                    `</s>` between the documents: `<s> ... last of d1 </s> first of d2 ... </s>`. A sentence
                    longer than the room left starts a new block; one longer than a whole block fills as many
                    blocks as it needs and its remainder starts the next block.
    doc_sentences   the same, but a document boundary always ends the block (blocks near a document end are
                    short; batch them by tokens).
    segment_pair    BERT: `<s> A </s></s> B </s>`, A and B spans of whole sentences, together at most n - 4
                    tokens; B is the true continuation (NSP label 0) or, half of the time, a span from another
                    document (label 1), as in BERT's `create_pretraining_data.py` (unused sentences go back).
                    BERT's shorter targets are `data.short_seq_prob`. Other documents are drawn from a bounded
                    reservoir of recent documents, so packing streams (holding one document at a time); overlong
                    pairs are truncated, as in BERT.
    sentence_pair   the same with single sentences as A and B.

What holds (`PackStats`): full_sentences and doc_sentences are lossless, every stream token in exactly one block.
The pair packings place every stream token at most once in its own document's pairs and drop what truncation
cuts; a random B repeats sentences of another document, which are also in that document's own pairs.

NSP labels follow Hugging Face's `BertForPreTraining`: 0 = B follows A, 1 = B is random.

Packing is a single pass over sentence lengths plus one vectorised `np.insert` per batch. `Packer` is the
sentence packings (`_SentencePacking`) and the pair packings (`_PairPacking`), one class each, over one state.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from itertools import chain

import numpy as np

from .config import Packing
from .encode import Encoded

PAIR_PACKINGS = ("segment_pair", "sentence_pair")
IS_NEXT, NOT_NEXT = 0, 1  # Hugging Face's next_sentence_label convention


@dataclass
class Blocks:
    """Complete blocks, back to back: `tokens` (special tokens included), `lengths` per block; pair modes add
    `nsp` (uint8 labels) and `b_start` (the position of B's first token in its block)."""

    tokens: np.ndarray
    lengths: np.ndarray  # (B,) int64
    nsp: np.ndarray | None = None  # (B,) uint8
    b_start: np.ndarray | None = None  # (B,) int32


@dataclass
class PackStats:
    """What packing did with the stream. FULL-SENTENCES and DOC-SENTENCES place every stream token once (packed =
    stream, nothing copied). The pair packings place each of the stream's tokens at most once, in a pair of its
    own document (A, or the true-continuation B), and drop what BERT's pair truncation cuts (stream - packed);
    a random B (NSP label 1) is a copy of sentences of another document, counted as copied, not packed."""

    stream_tokens: int = 0  # tokens of the corpus stream seen
    packed_tokens: int = 0  # of those, placed in blocks in their own document's place
    copied_tokens: int = 0  # pair packings: tokens of random B segments, copies of another document's sentences
    num_blocks: int = 0
    block_tokens: int = 0  # tokens in blocks, special tokens included

    @property
    def dropped_tokens(self) -> int:
        """Stream tokens in no block: BERT's pair truncation only (0 for the sentence packings)."""
        return self.stream_tokens - self.packed_tokens

    def padding_fraction(self, seq_len: int) -> float:
        return 1.0 - self.block_tokens / (self.num_blocks * seq_len) if self.num_blocks else 0.0


class _SentencePacking:
    """FULL-SENTENCES and DOC-SENTENCES (`Packer`): the open block's sentence tokens are carried to the next
    batch, so a block may take sentences of several batches."""

    seq_len: int
    packing: Packing
    bos: int
    eos: int
    dtype: np.dtype
    _tail: np.ndarray  # the open block's sentence tokens
    _tail_seps: list[int]  # where inside them a </s> goes

    def _add_sentences(self, enc: Encoded) -> Blocks:
        cap = self.seq_len - 2  # <s> and </s>
        cross = self.packing == "full_sentences"
        flat = np.concatenate([self._tail, enc.tokens]) if len(self._tail) else enc.tokens
        pos = len(self._tail)  # where the next sentence starts in `flat`
        fill = pos + len(self._tail_seps)  # room used in the open block (its </s> separators included)
        cuts = [0]  # block boundaries in `flat`
        seps = list(self._tail_seps)  # positions in `flat` that get a </s> before them
        for n, first in zip(enc.lengths.tolist(), enc.first.tolist(), strict=True):
            if first and fill:  # a new document while a block is open
                if cross and fill + 1 + n <= cap:
                    seps.append(pos)
                    fill += 1 + n
                    pos += n
                    continue
                cuts.append(pos)
                fill = 0
            if fill + n <= cap:
                fill += n
                pos += n
                continue
            if fill:  # does not fit in the room left: a new block
                cuts.append(pos)
            while n > cap:  # longer than a block: whole blocks of it, the remainder opens the next
                pos += cap
                n -= cap
                cuts.append(pos)
            fill = n
            pos += n
        end = cuts[-1]
        done = [s for s in seps if s < end]
        self._tail = flat[end:].copy()  # a copy, so the batch's array can be freed
        self._tail_seps = [s - end for s in seps if s >= end]
        return self._sentence_blocks(flat[:end], cuts, done)

    def _sentence_blocks(self, flat: np.ndarray, cuts: list[int], seps: list[int]) -> Blocks:
        bounds = np.asarray(cuts, dtype=np.int64)
        k = len(bounds) - 1
        sep = np.asarray(seps, dtype=np.int64)
        # np.insert keeps the given order among equal indices: a block's </s> goes before the next block's <s>
        where = np.concatenate([bounds[1:], sep, bounds[:-1]])
        what = np.concatenate([np.full(k + len(sep), self.eos), np.full(k, self.bos)]).astype(self.dtype)
        tokens = np.insert(flat, where, what)
        lengths = np.diff(bounds) + 2 + np.bincount(np.searchsorted(bounds, sep, "right") - 1, minlength=k)[:k]
        self._count(len(flat), lengths)
        return Blocks(tokens, lengths)


class _PairPacking:
    """SEGMENT-PAIR and SENTENCE-PAIR (BERT, for the NSP ablation; `Packer`): a document is collected whole, cut
    into pairs, then kept in a bounded reservoir of recent documents that random B segments are drawn from."""

    seq_len: int
    packing: Packing
    bos: int
    eos: int
    dtype: np.dtype
    short_seq_prob: float
    stats: PackStats
    _doc: list[np.ndarray]
    _reservoir: deque[list[np.ndarray]]
    _reservoir_size: int
    _reservoir_docs: int
    _reservoir_tokens: int
    _rng: np.random.Generator

    def _add_pairs(self, enc: Encoded) -> Blocks:
        sentences = np.split(enc.tokens, np.cumsum(enc.lengths)[:-1]) if len(enc.lengths) else []
        blocks: list[tuple[np.ndarray, np.ndarray, int]] = []
        for sentence, first in zip(sentences, enc.first.tolist(), strict=True):
            if first and self._doc:
                blocks.extend(self._pairs_of_document())
                self._doc = []
            self._doc.append(sentence)
        return self._pair_blocks(blocks)

    def _pairs_of_document(self) -> list[tuple[np.ndarray, np.ndarray, int]]:
        """BERT's `create_instances_from_document`, then the document joins the reservoir of negatives."""
        doc, rng, cap = self._doc, self._rng, self.seq_len - 4  # <s> A </s></s> B </s>
        out = []
        if self.packing == "sentence_pair":
            i = 0
            while i < len(doc):
                if i + 1 < len(doc) and (rng.random() < 0.5 or not self._reservoir):
                    out.append((doc[i], doc[i + 1], IS_NEXT))
                    i += 2
                else:
                    out.append(self._negative(doc[i], 1))
                    i += 1
        else:
            # BERT draws one target length per document: mostly the full block, with short_seq_prob a random one
            # (no draw at all when it is 0, so such shards are the same as before the option existed)
            target = cap
            if self.short_seq_prob and rng.random() < self.short_seq_prob:
                target = int(rng.integers(2, cap + 1))
            chunk: list[np.ndarray] = []
            size, i = 0, 0
            while i < len(doc):
                chunk.append(doc[i])
                size += len(doc[i])
                if i == len(doc) - 1 or size >= target:
                    a_end = int(rng.integers(1, len(chunk))) if len(chunk) > 1 else 1
                    a = np.concatenate(chunk[:a_end])
                    if len(chunk) == 1 or (rng.random() < 0.5 and self._reservoir):
                        out.append(self._negative(a, max(target - len(a), 1)))
                        i -= len(chunk) - a_end  # BERT puts the unused sentences back
                    else:
                        out.append((a, np.concatenate(chunk[a_end:]), IS_NEXT))
                    chunk, size = [], 0
                i += 1
        self._remember(doc)
        return [self._truncate(a, b, label) for a, b, label in out]

    def _negative(self, a: np.ndarray, want: int) -> tuple[np.ndarray, np.ndarray, int]:
        """A with sentences of a recent other document (at least `want` tokens, if it has them) as B."""
        if not self._reservoir:  # the stream's first document: no other one yet, so A's own halves
            half = (len(a) + 1) // 2
            return a[:half], a[half:], IS_NEXT
        other = self._reservoir[int(self._rng.integers(len(self._reservoir)))]
        j = int(self._rng.integers(len(other)))
        taken, size = [], 0
        while j < len(other) and size < want:
            taken.append(other[j])
            size += len(other[j])
            j += 1
        return a, np.concatenate(taken), NOT_NEXT

    def _remember(self, doc: list[np.ndarray]) -> None:
        self._reservoir.append([s.copy() for s in doc])  # copies: do not keep whole batches alive
        self._reservoir_size += sum(map(len, doc))
        while len(self._reservoir) > self._reservoir_docs or (
            len(self._reservoir) > 1 and self._reservoir_size > self._reservoir_tokens
        ):
            self._reservoir_size -= sum(map(len, self._reservoir.popleft()))

    def _truncate(self, a: np.ndarray, b: np.ndarray, label: int) -> tuple[np.ndarray, np.ndarray, int]:
        """BERT's `truncate_seq_pair`: shorten the longer segment until the pair fits, each from a random end."""
        cap = self.seq_len - 4
        na, nb = len(a), len(b)
        if na + nb > cap:
            short = min(na, nb)
            keep_short = short if short <= cap // 2 else cap // 2
            keep_long = cap - keep_short
            na, nb = (keep_long, keep_short) if na >= nb else (keep_short, keep_long)
            a = a[len(a) - na :] if self._rng.random() < 0.5 else a[:na]
            b = b[len(b) - nb :] if self._rng.random() < 0.5 else b[:nb]
        return a, b, label

    def _pair_blocks(self, pairs: list[tuple[np.ndarray, np.ndarray, int]]) -> Blocks:
        bos, eos = np.array([self.bos], self.dtype), np.array([self.eos], self.dtype)
        parts = []
        for a, b, _ in pairs:
            parts += [bos, a, eos, eos, b, eos]
        tokens = np.concatenate(parts) if parts else np.zeros(0, self.dtype)
        len_a = np.array([len(a) for a, _, _ in pairs], np.int64)
        len_b = np.array([len(b) for _, b, _ in pairs], np.int64)
        lengths = len_a + len_b + 4
        copied = int(sum(n for n, (_, _, label) in zip(len_b.tolist(), pairs, strict=True) if label == NOT_NEXT))
        self._count(int(len_a.sum() + len_b.sum()) - copied, lengths)  # A and a true B are the stream's own tokens
        self.stats.copied_tokens += copied
        return Blocks(tokens.astype(self.dtype, copy=False), lengths,
                      nsp=np.array([label for _, _, label in pairs], np.uint8), b_start=(len_a + 3).astype(np.int32))


class Packer(_SentencePacking, _PairPacking):
    """Streaming packer: `add` each `Encoded` batch in corpus order and get back the blocks it completed;
    `finish` returns the last, partly filled block. The result does not depend on how the stream is batched."""

    def __init__(self, seq_len: int, packing: Packing, bos: int, eos: int, dtype: np.dtype, seed: int = 0,
                 reservoir_docs: int = 1000, reservoir_tokens: int = 1 << 21, short_seq_prob: float = 0.0):
        assert seq_len >= 8, f"seq_len={seq_len} leaves no room for text"
        self.seq_len, self.packing, self.bos, self.eos = seq_len, packing, bos, eos
        self.short_seq_prob = short_seq_prob
        self.dtype = np.dtype(dtype)
        self.stats = PackStats()
        # full/doc sentences: the open block's sentence tokens and where inside them a </s> goes
        self._tail = np.zeros(0, self.dtype)
        self._tail_seps: list[int] = []
        # pair modes: the document being collected, recent other documents, the RNG
        self._doc: list[np.ndarray] = []
        self._reservoir: deque[list[np.ndarray]] = deque()
        self._reservoir_size = 0
        self._reservoir_docs, self._reservoir_tokens = reservoir_docs, reservoir_tokens
        self._rng = np.random.default_rng(seed)

    def add(self, enc: Encoded) -> Blocks:
        self.stats.stream_tokens += len(enc.tokens)
        if self.packing in PAIR_PACKINGS:
            return self._add_pairs(enc)
        return self._add_sentences(enc)

    def finish(self) -> Blocks:
        if self.packing in PAIR_PACKINGS:
            blocks = self._pairs_of_document() if self._doc else []
            self._doc = []
            return self._pair_blocks(blocks)
        if not len(self._tail):
            return self._sentence_blocks(np.zeros(0, self.dtype), [0], [])
        flat, seps = self._tail, self._tail_seps
        self._tail, self._tail_seps = np.zeros(0, self.dtype), []
        return self._sentence_blocks(flat, [0, len(flat)], seps)

    def _count(self, packed: int, lengths: np.ndarray) -> None:
        self.stats.packed_tokens += packed
        self.stats.num_blocks += len(lengths)
        self.stats.block_tokens += int(lengths.sum())
        assert not len(lengths) or lengths.max() <= self.seq_len, f"a block longer than {self.seq_len}"


def pack_documents(docs: list[list[list[int]]], seq_len: int, packing: Packing, bos: int = 0, eos: int = 2,
                   seed: int = 0, short_seq_prob: float = 0.0) -> Blocks:
    """Pack pre-tokenized documents (lists of sentences of ids) in one go: for tests and small experiments."""
    lines = [s for d in docs for s in d]
    enc = Encoded(np.fromiter(chain.from_iterable(lines), np.uint32),
                  np.array([len(s) for s in lines], np.int64),
                  np.array([j == 0 for d in docs for j in range(len(d))], bool))
    packer = Packer(seq_len, packing, bos, eos, np.uint32, seed, short_seq_prob=short_seq_prob)
    first, last = packer.add(enc), packer.finish()
    nsp = None if first.nsp is None else np.concatenate([first.nsp, last.nsp])
    b_start = None if first.b_start is None else np.concatenate([first.b_start, last.b_start])
    return Blocks(np.concatenate([first.tokens, last.tokens]), np.concatenate([first.lengths, last.lengths]),
                  nsp, b_start)


def split_blocks(blocks: Blocks) -> list[list[int]]:
    """The blocks as lists of ids (tests, debugging)."""
    ends = np.cumsum(blocks.lengths)
    return [blocks.tokens[e - n : e].tolist() for n, e in zip(blocks.lengths.tolist(), ends.tolist(), strict=True)]
