"""tiktoken's BPE core gives `tokenizers`' ids for the project's tokenizer (nasty text, every code point, random
text), `make data` writes the same bytes with either encoder and says which ran, and the choice falls back to
`tokenizers` where tiktoken would differ: a pipeline that is not RoBERTa's, merges out of id order, and a merge
list that passes every static check yet encodes differently (caught by the start-of-run self-check)."""

from __future__ import annotations

import json
import sys
import unicodedata

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from data_prep.config import load_config
from data_prep.encode import Encoders, SentenceEncoder, load_encoder, sentence_batches, tokenizers_texts
from data_prep.encode_tiktoken import (
    byte_decoder,
    choose_encoder,
    self_check,
    tiktoken_refusal,
    tiktoken_texts,
)
from data_prep.manifest import ShardError, validate_meta
from data_prep.prepare import prepare_data
from data_prep.tokenizer import SPECIALS, finalize
from data_prep.tokenizer_training import train_tokenizer
from data_prep.typed_config import ConfigError
from tests.conftest import make_documents, write_txt
from tests.test_encode_fast import NASTY, SPACES, trained_tokenizer

ZWJ_FAMILY = "\U0001F468\u200D\U0001F469\u200D\U0001F467\u200D\U0001F466"
NASTIER = [
    ["\x00NUL\x00 inside", "\ufffd replaced \ufffd\ufffd bytes", "tab\t\t\tend", " " * 300 + "x", "\n" * 5,
     "\r\r\r\n\r", "a" + "\u00a0" * 40 + "b", "  \t \u3000 \u2028 x"],
    [ZWJ_FAMILY + " family", "👍🏽 skin tone", "🏳️‍🌈 flag", "🇫🇷🇩🇪 regional", "e\u0301\u0302\u0303 marks",
     "\u0915\u094d\u0937 devanagari", "\u05e9\u05dc\u05d5\u05dd \u0645\u0631\u062d\u0628\u0627 rtl \u200f\u202e"],
    ["w" * 5_000, "1" * 5_000 + "x", "ab" * 3000, "'" * 200 + "s", "'sme'll've're'd't'm", "it's 'S 'LL"],
    ["<s>x</s>", "<mask><mask>", " <mask>", "<pad>", "<unk>", "<|endoftext|>", "</s></s>"],
    ["½ ² ³ Ⅻ ௰ 〇 numbers", "ǅ ʰ ǂ letters", "¬ ¦ © symbols", "\u00ad\u200b\ufeff format", "\ue000 private"],
]


@pytest.fixture(scope="module")
def project_tok() -> Tokenizer:
    return trained_tokenizer()


def ids_both(tok: Tokenizer, texts: list[str]) -> tuple[list[list[int]], list[list[int]]]:
    got = [np.asarray(ids).tolist() for ids in tiktoken_texts(tok)(texts)]
    return got, [list(ids) for ids in tokenizers_texts(tok)(texts)]


def test_the_project_tokenizer_qualifies(project_tok) -> None:
    assert tiktoken_refusal(project_tok) is None


@pytest.mark.timeout(120)
def test_same_ids_on_nasty_text(project_tok) -> None:
    docs = NASTY + NASTIER
    texts = [line for doc in docs for line in doc] + ["\n".join(doc) for doc in docs] + ["".join(SPACES)]
    got, want = ids_both(project_tok, texts)
    for text, g, w in zip(texts, got, want, strict=True):
        assert g == w, text[:80]
    # and through the sentence encoder: documents cut at newlines, runs across batches
    ours, reference = SentenceEncoder.of(project_tok, np.uint16, tiktoken_texts), SentenceEncoder.of(project_tok, np.uint16)
    for size in (1, 3, 4096):
        for lines, first in sentence_batches(docs, size):
            a, b = ours(lines, first), reference(lines, first)
            assert a.tokens.tolist() == b.tokens.tolist() and a.lengths.tolist() == b.lengths.tolist()


def test_both_regex_engines_class_characters_alike() -> None:
    """Oniguruma (`tokenizers`) and fancy-regex (tiktoken) agree on which characters are letters, numbers,
    whitespace and other, for code points of every general category in every plane (up to 24 each, spread out).
    Ids only show a piece boundary where a merge would cross it, so the tokenizer merges "a", "1", tab and space with
    every byte after them: "a" + c is one piece (and one merge) only if c is a letter, "1" + c only if a number,
    tab + c only if whitespace, and " " + c unless c is whitespace. (bench/bench_data.py --codepoints checks every
    code point; it takes a minute.)"""
    tok = classes_tokenizer()
    by_class: dict[tuple[int, str], list[str]] = {}
    for c in range(sys.maxunicode + 1):
        if not 0xD800 <= c <= 0xDFFF:
            by_class.setdefault((c >> 16, unicodedata.category(chr(c))), []).append(chr(c))
    chars = [c for group in by_class.values() for c in group[:: max(1, len(group) // 24)]]
    assert len(by_class) > 60 and len(chars) > 1000
    texts = ["".join(f"a{c}1{c}\t{c} {c}" for c in chars[i : i + 100]) for i in range(0, len(chars), 100)]
    got, want = ids_both(tok, texts)
    assert sum(len(ids) for ids in got) <= sum(len(t.encode()) for t in texts) - len(chars)  # a merge per c or more
    differ = [c for i, (g, w) in enumerate(zip(got, want, strict=True)) if g != w for c in chars[100 * i:][:100]
              if len({str(ids) for ids in ids_both(tok, [f"a{c}1{c}\t{c} {c}"])}) > 1]
    assert not differ, [f"U+{ord(c):04X} {unicodedata.category(c)}" for c in differ[:5]]


def classes_tokenizer() -> Tokenizer:
    """A byte-level BPE whose merges are "a", "1", tab and space followed by each of the 256 bytes."""
    alphabet = byte_decoder()
    char = {b: c for c, b in alphabet.items()}
    merges = [(char[ord(head)], c) for head in "a1\t " for c in alphabet]
    return handmade(merges, [a + b for a, b in merges])


@settings(max_examples=60, deadline=None)
@given(text=st.text(st.characters(exclude_categories=("Cs",)), max_size=200))
def test_same_ids_on_random_text(project_tok, text) -> None:
    got, want = ids_both(project_tok, [text, "x" + text, text + "\n" + text])
    assert got == want


def test_a_pipeline_that_is_not_robertas_takes_tokenizers(project_tok) -> None:
    other = Tokenizer.from_str(project_tok.to_str())
    other.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    other.encode_special_tokens = True
    said: list[str] = []
    assert "not RoBERTa's byte-level BPE" in tiktoken_refusal(other)
    assert choose_encoder(other, "auto", [["a b"]], np.dtype(np.uint16), said.append).final().name == "tokenizers"
    assert len(said) == 1 and said[0].startswith("data: encoding with tokenizers, not tiktoken: ")
    with pytest.raises(ConfigError, match=r"^data\.encoder=tiktoken: .*set data\.encoder to auto or tokenizers$"):
        choose_encoder(other, "tiktoken", [["a b"]], np.dtype(np.uint16), said.append)


def handmade(merges: list[tuple[str, str]], extra: list[str]) -> Tokenizer:
    """The project's pipeline around a hand-written byte-level BPE: specials 0-3, the 256 bytes, `extra`, <mask>."""
    vocab = {t: i for i, t in enumerate([*SPECIALS, *byte_decoder(), *extra])}
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIALS))
    tok = finalize(tok)
    tok.encode_special_tokens = True
    return tok


def test_merges_out_of_id_order_take_tokenizers() -> None:
    swapped = handmade([("a", "b"), ("c", "d")], ["cd", "ab"])  # the first merge's token has the larger id
    assert "out of merge order" in tiktoken_refusal(swapped)
    assert "two merges make the same token" in tiktoken_refusal(handmade([("a", "bc"), ("ab", "c")],
                                                                         ["bc", "ab", "abc"]))
    assert "neither a byte nor a merge" in tiktoken_refusal(handmade([("a", "b")], ["ab", "xyz"]))
    said: list[str] = []
    assert choose_encoder(swapped, "auto", [["abcd"]], np.dtype(np.uint16), said.append).final().name == "tokenizers"
    assert len(said) == 1


def test_a_mismatch_the_static_checks_miss_falls_back_with_one_line() -> None:
    """merges "b c", "a b", "ab c": `tokenizers` encodes "abc" as "a" "bc" (no merge joins them), tiktoken as
    "abc" (a pair whose concatenation is a token). Only the self-check can see it, on text that holds "abc"."""
    tok = handmade([("b", "c"), ("a", "b"), ("ab", "c")], ["bc", "ab", "abc"])
    assert tiktoken_refusal(tok) is None
    got, want = ids_both(tok, ["abc"])
    assert got != want
    assert self_check(tok, [["no such letters"], ["ab", "bc"]], np.dtype(np.uint16)) is None
    said: list[str] = []
    sample = [["first line", "then abc here"]]
    assert choose_encoder(tok, "auto", sample, np.dtype(np.uint16), said.append).final().name == "tokenizers"
    assert said == ["data: encoding with tokenizers, not tiktoken: tiktoken and tokenizers give different ids for "
                    "the sample's line 'then abc here'"]
    with pytest.raises(ConfigError, match="data.encoder=tiktoken: tiktoken and tokenizers give different ids"):
        choose_encoder(tok, "tiktoken", sample, np.dtype(np.uint16), said.append).final()
    assert choose_encoder(tok, "tokenizers", sample, np.dtype(np.uint16), said.append).final().name == "tokenizers"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("merges, extra, why", [
    ([("b", "c"), ("a", "b"), ("ab", "c")], ["bc", "ab", "abc"],
     "tiktoken and tokenizers give different ids for the sample's line 'then abc here'"),
    ([("b", "c"), ("a", "b")], ["bc", "ab", "\u4e2d"], "a token is not written in the byte-level alphabet"),
], ids=["self-check", "no-table"])
def test_workers_that_began_with_tiktoken_fall_back_when_the_self_check_fails(tmp_path, merges, extra, why) -> None:
    """The workers encode with tiktoken while the checks run; when one fails, what they encoded is thrown away and
    they encode it again with `tokenizers`: the stream is `tokenizers`' own, and one line says why. (A worker
    that cannot even make tiktoken's table, for a token outside the byte alphabet, encodes with `tokenizers`.)"""
    tok = handmade(merges, extra)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    docs = [["then abc here"]] + [["abc", f"x ab bc abc {k}", "abcabc"] for k in range(40)]
    said: list[str] = []
    choice = choose_encoder(load_encoder(path), "auto", docs[:1], np.dtype(np.uint16), said.append, path)
    assert choice.first.name == "tiktoken"
    with Encoders(2) as encoders:
        encoders.start(choice)
        got = list(encoders.stream(docs, batch_sentences=5))
        assert encoders.final().name == "tokenizers"
    reference = SentenceEncoder.of(load_encoder(path), np.uint16)
    want = [reference(lines, first) for lines, first in sentence_batches(docs, 5)]
    assert [e.tokens.tolist() for e in got] == [e.tokens.tolist() for e in want]
    assert [e.lengths.tolist() for e in got] == [e.lengths.tolist() for e in want]
    if len(merges) == 3:
        tiktoken_made = SentenceEncoder.of(load_encoder(path), np.uint16, tiktoken_texts)(*next(sentence_batches(docs, 5)))
        assert tiktoken_made.tokens.tolist() != want[0].tokens.tolist()  # what the workers began with was wrong
    assert said == [f"data: encoding with tokenizers, not tiktoken: {why}"]


@pytest.mark.timeout(300)
def test_make_data_writes_the_same_bytes_with_either_encoder(tmp_path) -> None:
    corpus = write_txt(tmp_path / "corpus.txt", make_documents(200, seed=7) + NASTY + NASTIER)
    base = [f"--corpus.train={corpus}", "--corpus.valid_fraction=0.1", "--tokenizer.vocab_size=400",
            "--data.seq_len=32", "--data.num_proc=1"]
    tok_dir = train_tokenizer(load_config(None, [f"--run_dir={tmp_path / 'a'}", *base]), log=lambda _: None)
    outs = {}
    for encoder in ("tiktoken", "tokenizers"):
        run = tmp_path / encoder
        (run / "tokenizer").mkdir(parents=True)
        for f in tok_dir.iterdir():
            (run / "tokenizer" / f.name).write_bytes(f.read_bytes())
        cfg = load_config(None, [f"--run_dir={run}", *base, f"--data.encoder={encoder}"])
        outs[encoder] = prepare_data(cfg, log=lambda _: None).parent
        meta = json.loads((outs[encoder] / "meta.json").read_text())
        assert {r["encoder"] for r in meta["splits"].values()} == {encoder}
    meta["splits"]["train"]["encoder"] = "../x"  # a manifest says only what the format allows
    with pytest.raises(ShardError, match=r"splits\.train\.encoder: '\.\./x' is not one of tiktoken, tokenizers"):
        validate_meta(meta, "meta.json")
    files = sorted(p.name for p in outs["tiktoken"].glob("*.bin"))
    assert files == sorted(p.name for p in outs["tokenizers"].glob("*.bin")) and len(files) == 4
    for name in files:
        assert (outs["tiktoken"] / name).read_bytes() == (outs["tokenizers"] / name).read_bytes(), name
    assert outs["tiktoken"].name == outs["tokenizers"].name  # the encoder is not part of the content address
    # shards made by one encoder are reused under the other: same directory, nothing rebuilt
    said: list[str] = []
    again = load_config(None, [f"--run_dir={tmp_path / 'tokenizers'}", *base, "--data.encoder=auto"])
    assert prepare_data(again, log=said.append).parent == outs["tokenizers"]
    assert any("is up to date" in line for line in said)
