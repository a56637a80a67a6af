"""The packer: exact blocks for hand-written inputs in each mode, streaming = one batch, and losslessness."""

from __future__ import annotations

import random

import numpy as np
import pytest

from data_prep.config import ConfigError, load_config
from data_prep.encode import Encoded, encode_stream, sentence_batches
from data_prep.pack import IS_NEXT, NOT_NEXT, Packer, pack_documents, split_blocks
from data_prep.tokenizer import load_tokenizer
from data_prep.tokenizer_training import train_tokenizer
from tests.conftest import make_documents, write_txt

BOS, EOS = 0, 2


def blocks_of(docs, seq_len, packing="full_sentences", seed=0):
    return split_blocks(pack_documents(docs, seq_len, packing, BOS, EOS, seed))


def random_docs(n: int, seed: int = 0, max_len: int = 9) -> list[list[list[int]]]:
    """Pre-tokenized documents whose ids (>= 10) never collide with the special ids."""
    rng = random.Random(seed)
    return [[[rng.randrange(10, 99) for _ in range(rng.randint(1, max_len))] for _ in range(rng.randint(1, 6))]
            for _ in range(n)]


def test_full_sentences_adds_one_separator_when_crossing_documents():
    # seq_len 8: room for 6 sentence tokens (and separators) between <s> and </s>
    docs = [[[10, 11]], [[20, 21, 22]], [[30]]]
    assert blocks_of(docs, 8) == [[BOS, 10, 11, EOS, 20, 21, 22, EOS], [BOS, 30, EOS]]


def test_a_sentence_that_does_not_fit_starts_a_new_block():
    docs = [[[10, 11], [12, 13, 14]], [[20], [21, 22]], [[30, 31, 32, 33]]]
    assert blocks_of(docs, 8) == [
        [BOS, 10, 11, 12, 13, 14, EOS],  # 20 would fit, but not its separator: 5 + 1 + 1 > 6
        [BOS, 20, 21, 22, EOS],
        [BOS, 30, 31, 32, 33, EOS],
    ]


def test_a_sentence_longer_than_a_block_is_split_and_its_remainder_is_continued():
    long = list(range(40, 54))  # 14 tokens: 6 + 6 + 2
    docs = [[[10, 11], long, [60]]]
    assert blocks_of(docs, 8) == [
        [BOS, 10, 11, EOS],
        [BOS, *long[:6], EOS],
        [BOS, *long[6:12], EOS],
        [BOS, *long[12:], 60, EOS],
    ]


def test_an_exact_fit_fills_the_block():
    assert blocks_of([[[10, 11, 12], [13, 14, 15]], [[20]]], 8) == [
        [BOS, 10, 11, 12, 13, 14, 15, EOS],
        [BOS, 20, EOS],
    ]


def test_doc_sentences_never_crosses_a_document():
    docs = [[[10, 11]], [[20, 21, 22]], [[30]], [[40, 41, 42], [43, 44, 45], [46]]]
    assert blocks_of(docs, 8, "doc_sentences") == [
        [BOS, 10, 11, EOS],
        [BOS, 20, 21, 22, EOS],
        [BOS, 30, EOS],
        [BOS, 40, 41, 42, 43, 44, 45, EOS],
        [BOS, 46, EOS],
    ]


@pytest.mark.parametrize("packing", ["full_sentences", "doc_sentences"])
def test_blocks_are_the_token_stream_with_specials_added(packing):
    docs = random_docs(200, max_len=40)  # some sentences longer than a block
    blocks = pack_documents(docs, 16, packing, BOS, EOS)
    stream = [t for d in docs for s in d for t in s]
    body = blocks.tokens[(blocks.tokens != BOS) & (blocks.tokens != EOS)]
    assert body.tolist() == stream  # nothing dropped, nothing repeated, no remainder lost
    for block in split_blocks(blocks):
        assert block[0] == BOS and block[-1] == EOS and len(block) <= 16
    # separators: one per document boundary inside a block (never a doubled or leading one)
    seps = sum(b[1:-1].count(EOS) for b in split_blocks(blocks))
    assert seps <= len(docs) - 1 and (packing == "full_sentences" or seps == 0)


def test_padding_is_counted():
    docs = random_docs(300, seed=1)
    packer = Packer(32, "full_sentences", BOS, EOS, np.uint32)
    out = pack_documents(docs, 32, "full_sentences", BOS, EOS)
    for enc in _encoded_batches(docs, 7):
        packer.add(enc)
    packer.finish()
    s = packer.stats
    assert s.num_blocks == len(out.lengths) and s.block_tokens == len(out.tokens)
    assert s.padding_fraction(32) == pytest.approx(1 - len(out.tokens) / (len(out.lengths) * 32))
    assert 0 < s.padding_fraction(32) < 0.15
    assert s.packed_tokens == s.stream_tokens == sum(len(x) for d in docs for x in d)


def _encoded_batches(docs, size: int, dtype=np.uint32) -> list[Encoded]:
    """The pre-tokenized documents in batches of `size` sentences (documents cut between batches)."""
    sentences = [(s, j == 0) for d in docs for j, s in enumerate(d)]
    out = []
    for i in range(0, len(sentences), size):
        part = sentences[i : i + size]
        out.append(Encoded(np.array([t for s, _ in part for t in s], dtype),
                           np.array([len(s) for s, _ in part], np.int64), np.array([f for _, f in part])))
    return out


@pytest.mark.parametrize("packing", ["full_sentences", "doc_sentences", "segment_pair", "sentence_pair"])
def test_streaming_in_batches_gives_the_same_blocks(packing):
    docs = random_docs(150, seed=2, max_len=30)
    whole = pack_documents(docs, 24, packing, BOS, EOS, seed=5)
    packer = Packer(24, packing, BOS, EOS, np.uint32, seed=5)
    parts = [packer.add(enc) for enc in _encoded_batches(docs, 5)] + [packer.finish()]
    assert np.concatenate([p.tokens for p in parts]).tolist() == whole.tokens.tolist()
    assert np.concatenate([p.lengths for p in parts]).tolist() == whole.lengths.tolist()
    if whole.nsp is not None:
        assert np.concatenate([p.nsp for p in parts]).tolist() == whole.nsp.tolist()


def _pairs(blocks):
    out = []
    for block, label, b in zip(split_blocks(blocks), blocks.nsp.tolist(), blocks.b_start.tolist(), strict=True):
        assert block[0] == BOS and block[b - 2 : b] == [EOS, EOS] and block[-1] == EOS
        out.append((block[1 : b - 2], block[b:-1], label))
    return out


def test_segment_pair_blocks_are_bert_inputs_with_balanced_labels():
    docs = random_docs(400, seed=3)
    blocks = pack_documents(docs, 32, "segment_pair", BOS, EOS, seed=0)
    assert blocks.lengths.max() <= 32
    pairs = _pairs(blocks)
    stream = [t for d in docs for s in d for t in s]
    joined = " " + " ".join(map(str, stream)) + " "
    for a, b, label in pairs:
        assert a and b and EOS not in a + b
        if label == IS_NEXT and len(a) + len(b) < 32 - 4:  # untruncated: B continues A in the same document
            assert " " + " ".join(map(str, a + b)) + " " in joined
    labels = blocks.nsp.astype(float)
    assert 0.35 < labels.mean() < 0.65, labels.mean()
    assert set(labels.tolist()) == {IS_NEXT, NOT_NEXT}


def test_sentence_pair_pairs_single_sentences():
    docs = random_docs(300, seed=4)
    sentences = {tuple(s) for d in docs for s in d}
    blocks = pack_documents(docs, 64, "sentence_pair", BOS, EOS, seed=1)
    pairs = _pairs(blocks)
    nexts = {(tuple(d[j]), tuple(d[j + 1])) for d in docs for j in range(len(d) - 1)}
    for a, b, label in pairs[1:]:  # the first pair of the stream may split a sentence (no other document yet)
        assert tuple(a) in sentences and tuple(b) in sentences
        if label == IS_NEXT:
            assert (tuple(a), tuple(b)) in nexts
    assert 0.35 < blocks.nsp.mean() < 0.65


def test_pairs_are_truncated_to_the_block():
    docs = [[list(range(10, 40)), list(range(40, 90))]]  # 30 + 50 tokens, seq_len 20: room for 16
    (a, b, label), = _pairs(pack_documents(docs, 20, "sentence_pair", BOS, EOS))
    assert len(a) + len(b) == 16 and len(a) == len(b) == 8 and label == IS_NEXT


def _packed(docs, seq_len, packing, seed=0):
    packer = Packer(seq_len, packing, BOS, EOS, np.uint32, seed)
    blocks = [packer.add(enc) for enc in _encoded_batches(docs, 4)] + [packer.finish()]
    return packer.stats, [p for b in blocks if b.nsp is not None and len(b.lengths) for p in _pairs(b)]


@pytest.mark.parametrize("packing, seq_len, expected", [
    # doc 1 is two sentences of 3 (a true pair: no other document yet); doc 2's one sentence of 4 gets a random
    # B, a sentence of doc 1 (3 tokens): 10 stream tokens placed, 3 copied, none dropped (was: -3 dropped)
    ("sentence_pair", 32, {"stream": 10, "packed": 10, "copied": 3, "dropped": 0}),
    # room 4: both pairs (3 + 3, 4 + 3) are cut to 2 + 2: 2 tokens of each document dropped, 2 of doc 1 copied
    ("sentence_pair", 8, {"stream": 10, "packed": 6, "copied": 2, "dropped": 4}),
])
def test_pair_packings_count_copied_and_dropped_tokens_apart(packing, seq_len, expected):
    docs = [[[10, 11, 12], [13, 14, 15]], [[20, 21, 22, 23]]]
    stats, pairs = _packed(docs, seq_len, packing)
    assert [label for _, _, label in pairs] == [IS_NEXT, NOT_NEXT]
    got = {"stream": stats.stream_tokens, "packed": stats.packed_tokens, "copied": stats.copied_tokens,
           "dropped": stats.dropped_tokens}
    assert got == expected


def test_segment_pair_counts_a_copied_b_segment_as_copied():
    # doc 1, one sentence of 3: split into halves (no other document yet); doc 2, one sentence of 4: a random B,
    # doc 1's sentence. seq_len 16 holds both pairs whole
    stats, pairs = _packed([[[10, 11, 12]], [[20, 21, 22, 23]]], 16, "segment_pair")
    assert pairs == [([10, 11], [12], IS_NEXT), ([20, 21, 22, 23], [10, 11, 12], NOT_NEXT)]
    assert (stats.stream_tokens, stats.packed_tokens, stats.copied_tokens, stats.dropped_tokens) == (7, 7, 3, 0)


@pytest.mark.parametrize("packing", ["segment_pair", "sentence_pair"])
def test_pair_packing_counts_match_the_blocks(packing):
    # every token id is unique, so a block says where each of its tokens comes from
    rng, docs, next_id = random.Random(7), [], 10
    for _ in range(200):
        doc = []
        for _ in range(rng.randint(1, 6)):
            n = rng.randint(1, 14)
            doc.append(list(range(next_id, next_id + n)))
            next_id += n
        docs.append(doc)
    doc_of = {t: i for i, d in enumerate(docs) for s in d for t in s}
    stats, pairs = _packed(docs, 24, packing, seed=3)
    own, copied = [], 0
    for a, b, label in pairs:
        home = doc_of[a[0]]
        assert {doc_of[t] for t in a} == {home}
        if label == NOT_NEXT:
            assert doc_of[b[0]] != home and len({doc_of[t] for t in b}) == 1
            copied += len(b)
        else:
            assert {doc_of[t] for t in b} == {home}
            own += b
        own += a
    assert len(own) == len(set(own)), "a stream token placed twice in its own document's pairs"
    assert stats.stream_tokens == next_id - 10
    assert (stats.packed_tokens, stats.copied_tokens) == (len(own), copied) and copied > 0
    assert stats.dropped_tokens == stats.stream_tokens - len(own) > 0  # truncation at seq_len 24 drops some


def test_sentence_batches_cut_long_documents_between_sentences():
    docs = [["a", "b", "c", "d", "e"], ["f"], ["g", "h"]]
    batches = list(sentence_batches(docs, 2))
    assert [b[0] for b in batches] == [["a", "b"], ["c", "d"], ["e", "f"], ["g", "h"]]
    assert [b[1] for b in batches] == [[True, False], [False, False], [False, True], [True, False]]


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pack")
    corpus = write_txt(tmp / "c.txt", make_documents(200, seed=7))
    cfg = load_config(None, [f"--run_dir={tmp / 'run'}", f"--corpus.train={corpus}", "--corpus.valid_fraction=0",
                             "--tokenizer.vocab_size=300"])
    return train_tokenizer(cfg, log=lambda _: None) / "tokenizer.json"


def test_decoded_blocks_give_back_the_text(tokenizer_json):
    """The documented token stream: line, then "\\n" + line for the rest of the document; specials are text."""
    docs = make_documents(60, seed=9) + [["A literal <mask> and </s> stay text.", "  indented line", "\tx"]]
    tok = load_tokenizer(tokenizer_json.parent)
    packer = Packer(32, "full_sentences", BOS, EOS, np.uint16)
    parts = []
    for enc in encode_stream(tokenizer_json, docs, np.uint16, num_proc=1, batch_sentences=17):
        parts.append(packer.add(enc).tokens)
    parts.append(packer.finish().tokens)
    tokens = np.concatenate(parts)
    mask_id = tok.token_to_id("<mask>")
    assert mask_id not in tokens.tolist()
    body = tokens[(tokens != BOS) & (tokens != EOS)].tolist()
    assert tok.decode(body, skip_special_tokens=False) == "".join("\n".join(d) for d in docs)
    # and sentence by sentence: every block boundary falls between sentences unless a sentence is overlong
    assert packer.stats.packed_tokens == packer.stats.stream_tokens == len(body)


def test_short_seq_prob_gives_bert_its_share_of_shorter_pairs():
    """BERT's short_seq_prob: a document aims at a random length in [2, seq_len - 4] with this probability."""
    rng = random.Random(5)
    docs = [[[rng.randrange(10, 99) for _ in range(4)] for _ in range(30)] for _ in range(300)]  # 120 tokens each
    mean = {p: pack_documents(docs, 64, "segment_pair", BOS, EOS, seed=0, short_seq_prob=p).lengths.mean()
            for p in (0.0, 0.1, 1.0)}
    # every pair fills (or is truncated to) the block unless its document drew a short target
    assert mean[0.0] > 0.8 * 64
    assert mean[1.0] < 0.7 * mean[0.0]  # targets uniform in [2, 60]: about half the block, plus the last sentence
    assert mean[1.0] < mean[0.1] < mean[0.0] - 1
    short = pack_documents(docs, 64, "segment_pair", BOS, EOS, seed=0, short_seq_prob=1.0)
    assert short.lengths.max() <= 64 and (short.lengths <= 20).any()
    assert 0.35 < short.nsp.mean() < 0.65


def test_short_seq_prob_is_for_segment_pair_only():
    with pytest.raises(ConfigError, match=r"data.short_seq_prob=0.1 applies to data.packing=segment_pair only"):
        load_config(None, ["--data.short_seq_prob=0.1"])
    with pytest.raises(ConfigError, match=r"data.short_seq_prob=1.5 must be in \[0, 1\]"):
        load_config(None, ["--data.packing=segment_pair", "--data.short_seq_prob=1.5"])
    assert load_config(None, ["--data.packing=segment_pair", "--data.short_seq_prob=0.1"]).data.short_seq_prob == 0.1
