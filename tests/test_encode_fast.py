"""Encoding a document's sentences in one call and cutting at newlines gives exactly the tokens of encoding them one
by one (the definition, `encode_sentences_one_by_one`), on text chosen to break it."""

from __future__ import annotations

import sys
import unicodedata

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, pre_tokenizers, trainers

from data_prep.encode import (
    SentenceEncoder,
    encode_sentences_one_by_one,
    encode_stream,
    load_encoder,
    sentence_batches,
    splittable,
)
from data_prep.tokenizer import SPECIALS, build_untrained, finalize
from tests.conftest import make_documents

# Every character the GPT-2 regex could call whitespace (Unicode White_Space is in these categories), and more
SPACES = sorted({chr(c) for c in range(sys.maxunicode + 1) if not 0xD800 <= c <= 0xDFFF
                 and (unicodedata.category(chr(c)) in ("Zs", "Zl", "Zp", "Cc", "Cf") or chr(c).isspace())})

NASTY = [
    ["plain line", "", "after an empty line", "   ", "only spaces above", "trailing space ", "\ttab first"],
    ["", "the first line was empty"],
    ["", "", ""],
    ["line\r", "\rcarriage", "a\rb", "\r\n inside", "two\n\nnewlines inside", "x\ny", "\n"],
    ["A literal <mask> and </s>", "<s>", " <mask>", "<pad><unk>", "\n<mask>", "x <mask> "],
    ["it's", "'s", "'ll be", "don't'", "'", "s"],
    ["    indented code()", "        deeper", "\tmixed \t tabs", "}", "  ", "  }"],
    ["unicode\u00a0nbsp\u00a0", "\u3000ideographic", "\u2028line sep", "para\u2029", "\u0085next", "\u200bzw"],
    ["e\u0301 combining", "\u0301starts with a mark", "emoji 🙂🙂", "中文文本", "١٢٣ arabic digits", "x" * 300],
    ["12345 67890", "3.14159", "-1", "1,000,000"],
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return trained_tokenizer()


def trained_tokenizer() -> Tokenizer:
    """The project's pipeline (`build_untrained`, `finalize`) trained on raw joined lines, so that it has the merges
    that would differ if a piece ran across a newline (a space then a newline, blank lines, "\r\n")."""
    code = ["def f(x):", "    if x:  ", "        return x", "\treturn 0", "", "  # note ", "\r", "}\r"]
    texts = ["\n".join(d) for d in NASTY + make_documents(100, seed=3) + [code] * 30] * 5
    tok = build_untrained()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=600, special_tokens=list(SPECIALS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok = finalize(tok)
    tok.encode_special_tokens = True
    assert {"ĠĊ", "ĊĊ", "čĊ"} <= set(tok.get_vocab()), "merges across a line end, for the test to bite"
    return tok


def assert_same(tok: Tokenizer, encode: SentenceEncoder, lines: list[str], first: list[bool]) -> None:
    got = encode(lines, first)
    want = encode_sentences_one_by_one(tok, lines, first, encode.dtype)
    assert got.tokens.tolist() == want.tokens.tolist(), (lines, first)
    assert got.lengths.tolist() == want.lengths.tolist(), (lines, first)
    assert got.first.tolist() == want.first.tolist()


@pytest.mark.timeout(120)
def test_whole_documents_cut_at_newlines_equal_sentence_by_sentence(tok) -> None:
    encode = SentenceEncoder.of(tok, np.uint16)
    assert encode.starts_line is not None, "the project's tokenizer takes the one-call path"
    docs = NASTY + make_documents(50, seed=11)
    for size in (1, 2, 3, 5, 4096):  # documents cut across batches: runs that continue a document
        for lines, first in sentence_batches(docs, size):
            assert_same(tok, encode, lines, first)
    # a batch that starts inside a document, and single lines of every kind
    assert_same(tok, encode, ["continued", "", "x"], [False, False, True])
    for line in [s for d in NASTY for s in d]:
        assert_same(tok, encode, [line], [True])
        assert_same(tok, encode, [line], [False])
        assert_same(tok, encode, ["before", line, "after"], [True, False, False])


@pytest.mark.timeout(120)
def test_every_space_character_at_a_line_end_and_start(tok) -> None:
    encode = SentenceEncoder.of(tok, np.uint32)
    for c in SPACES:
        assert_same(tok, encode, ["a" + c, c + "b", c, "x" + c + "y", c + c, "end" + c], [True] + [False] * 5)
        assert_same(tok, encode, [c, "z"], [False, False])


def test_python_whitespace_holds_the_regex_whitespace(tok) -> None:
    """The one-call path trusts `str.isspace` to see every sentence that ends in the regex's whitespace."""
    text = "".join("x" + c + "\n\n" for c in SPACES)  # a space c forms the piece c + "\n"; any other c does not
    pieces = {offsets for _, offsets in tok.pre_tokenizer.pre_tokenize_str(text)}
    regex_space = {c for i, c in enumerate(SPACES) if (4 * i + 1, 4 * i + 3) in pieces}
    assert {"\n", " ", "\t", "\r", "\u3000"} <= regex_space
    assert all(c.isspace() for c in regex_space), sorted(c for c in regex_space if not c.isspace())


def test_other_pipelines_are_encoded_sentence_by_sentence(tok) -> None:
    other = Tokenizer.from_str(tok.to_str())
    other.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    other.encode_special_tokens = True
    assert splittable(tok) and not splittable(other)
    encode = SentenceEncoder.of(other, np.uint16)
    assert encode.starts_line is None
    assert_same(other, encode, ["a b", "c d"], [True, False])


@pytest.mark.timeout(120)
def test_worker_processes_give_the_same_stream(tok, tmp_path) -> None:
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    docs = NASTY * 3 + make_documents(40, seed=5)
    ref = SentenceEncoder.of(load_encoder(path), np.uint16)
    want = [ref(lines, first) for lines, first in sentence_batches(docs, 7)]
    got = list(encode_stream(path, docs, np.uint16, num_proc=2, batch_sentences=7))
    assert [e.tokens.tolist() for e in got] == [e.tokens.tolist() for e in want]
    assert [e.lengths.tolist() for e in got] == [e.lengths.tolist() for e in want]


def read_txt_line_by_line(path, max_bytes: int, stats):
    """The definition of a .txt file's documents (the reader before it read blocks): line by line, each line as
    `_read_lines` gives it, its bytes counted before it is looked at."""
    from data_prep.readers import _read_lines, decode_line

    with open(path, "rb") as f:
        doc: list[str] = []
        for raw, complete in _read_lines(f, max_bytes, stats):
            stats.bytes += len(raw) + complete
            line = decode_line(raw, stats)
            if complete:
                line = line.rstrip()
            if line.strip():
                doc.append(line)
            elif doc:
                yield doc
                doc = []
        if doc:
            yield doc


LINE = st.one_of(st.text(st.sampled_from("ab \t\r\x00é中🙂"), max_size=12), st.sampled_from(["", " ", "\r", "x" * 40]))


@settings(max_examples=80, deadline=None)
@given(lines=st.lists(LINE, max_size=30), end=st.sampled_from(["", "\n", "\r\n"]),
       junk=st.sampled_from([b"", b"\xff", b"\xe2\x82"]), block=st.sampled_from([7, 64, 1 << 20]))
def test_the_block_reader_reads_what_the_line_reader_reads(tmp_path_factory, lines, end, junk, block) -> None:
    """Same documents, same bytes counted per document (weights and the tokenizer's sample use them), same
    counters, whatever the block size, line ends, NULs, invalid UTF-8 and lines over max_line_bytes (16 here)."""
    from data_prep import readers

    path = tmp_path_factory.mktemp("blocks") / "c.txt"
    path.write_bytes(b"\n".join(s.encode() + (junk if i % 3 == 0 else b"") for i, s in enumerate(lines)) +
                     end.encode())
    got, want = readers.CorpusStats(), readers.CorpusStats()
    results = []
    for docs, stats in ((readers._read_txt(path, 16, got, block=block), got),
                        (read_txt_line_by_line(path, 16, want), want)):
        before, per_doc = 0, []
        for doc in docs:
            per_doc.append((doc, stats.bytes - before))
            before = stats.bytes
        results.append(per_doc)
    assert results[0] == results[1]
    assert got == want
