"""Encoding a document's sentences in one call and cutting at newlines gives exactly the tokens of encoding them one
by one (the definition, `encode_sentences_one_by_one`), on text chosen to break it."""

from __future__ import annotations

import re
import sys
import unicodedata

import numpy as np
import pytest
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


def assert_same(encode: SentenceEncoder, lines: list[str], first: list[bool]) -> None:
    got = encode(lines, first)
    want = encode_sentences_one_by_one(encode.tok, lines, first, encode.dtype)
    assert got.tokens.tolist() == want.tokens.tolist(), (lines, first)
    assert got.lengths.tolist() == want.lengths.tolist(), (lines, first)
    assert got.first.tolist() == want.first.tolist()


@pytest.mark.timeout(120)
def test_whole_documents_cut_at_newlines_equal_sentence_by_sentence(tok) -> None:
    encode = SentenceEncoder(tok, np.uint16)
    assert encode.starts_line is not None, "the project's tokenizer takes the one-call path"
    docs = NASTY + make_documents(50, seed=11)
    for size in (1, 2, 3, 5, 4096):  # documents cut across batches: runs that continue a document
        for lines, first in sentence_batches(docs, size):
            assert_same(encode, lines, first)
    # a batch that starts inside a document, and single lines of every kind
    assert_same(encode, ["continued", "", "x"], [False, False, True])
    for line in [s for d in NASTY for s in d]:
        assert_same(encode, [line], [True])
        assert_same(encode, [line], [False])
        assert_same(encode, ["before", line, "after"], [True, False, False])


@pytest.mark.timeout(120)
def test_every_space_character_at_a_line_end_and_start(tok) -> None:
    encode = SentenceEncoder(tok, np.uint32)
    for c in SPACES:
        assert_same(encode, ["a" + c, c + "b", c, "x" + c + "y", c + c, "end" + c], [True] + [False] * 5)
        assert_same(encode, [c, "z"], [False, False])


def test_python_whitespace_holds_the_regex_whitespace(tok) -> None:
    """The one-call path trusts Python's `\\s` to see every sentence that ends in the regex's whitespace."""
    text = "".join("x" + c + "\n\n" for c in SPACES)  # a space c forms the piece c + "\n"; any other c does not
    pieces = {offsets for _, offsets in tok.pre_tokenizer.pre_tokenize_str(text)}
    regex_space = {c for i, c in enumerate(SPACES) if (4 * i + 1, 4 * i + 3) in pieces}
    assert {"\n", " ", "\t", "\r", "\u3000"} <= regex_space
    assert all(re.match(r"\s", c) for c in regex_space), sorted(c for c in regex_space if not re.match(r"\s", c))


def test_other_pipelines_are_encoded_sentence_by_sentence(tok) -> None:
    other = Tokenizer.from_str(tok.to_str())
    other.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    other.encode_special_tokens = True
    assert splittable(tok) and not splittable(other)
    encode = SentenceEncoder(other, np.uint16)
    assert encode.starts_line is None
    assert_same(encode, ["a b", "c d"], [True, False])


@pytest.mark.timeout(120)
def test_worker_processes_give_the_same_stream(tok, tmp_path) -> None:
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    docs = NASTY * 3 + make_documents(40, seed=5)
    ref = SentenceEncoder(load_encoder(path), np.uint16)
    want = [ref(lines, first) for lines, first in sentence_batches(docs, 7)]
    got = list(encode_stream(path, docs, np.uint16, num_proc=2, batch_sentences=7))
    assert [e.tokens.tolist() for e in got] == [e.tokens.tolist() for e in want]
    assert [e.lengths.tolist() for e in got] == [e.lengths.tolist() for e in want]
