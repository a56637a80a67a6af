from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_prep.config import ExperimentConfig
from data_prep.readers import CorpusStats, decode_line
from data_prep.tokenizer import FILES, TokenizerError, load_tokenizer, special_ids
from data_prep.tokenizer_training import train_tokenizer

HARD_TEXTS = [
    "Plain English, with punctuation; and numbers 12345.",
    "  leading and trailing spaces  ",
    "emoji 😀👍🏽 and a family 👨‍👩‍👧",
    "中文字符和日本語のテキスト、한국어",
    "control \x07\x1b[31m characters\ttab\x0c",
    "mixed\u200bzero-width\u00a0nbsp",
]


@pytest.fixture
def trained(tiny_cfg: ExperimentConfig) -> tuple[ExperimentConfig, Path]:
    return tiny_cfg, train_tokenizer(tiny_cfg, log=lambda *_: None)


def test_files_and_special_ids(trained) -> None:
    cfg, out = trained
    assert all((out / f).is_file() for f in (*FILES, "quality.json"))
    tok = load_tokenizer(out)
    assert tok.get_vocab_size() == cfg.tokenizer.vocab_size
    ids = special_ids(tok)
    assert ids == {"bos": 0, "pad": 1, "eos": 2, "unk": 3, "mask": cfg.tokenizer.vocab_size - 1}
    assert [tok.id_to_token(i) for i in range(4)] == ["<s>", "<pad>", "</s>", "<unk>"]
    assert tok.id_to_token(cfg.tokenizer.vocab_size - 1) == "<mask>"


def test_post_processor_wraps_like_roberta(trained) -> None:
    _, out = trained
    tok = load_tokenizer(out)
    a = tok.encode("the kernel", add_special_tokens=False).ids
    b = tok.encode("a driver", add_special_tokens=False).ids
    assert tok.encode("the kernel").ids == [0, *a, 2]
    assert tok.encode("the kernel", "a driver").ids == [0, *a, 2, 2, *b, 2]


def test_mask_token_strips_the_space_before_it(trained) -> None:
    _, out = trained
    tok = load_tokenizer(out)
    mask = special_ids(tok)["mask"]
    def enc(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False).ids

    assert enc("the <mask> driver") == [*enc("the"), mask, *enc(" driver")]


def test_decode_encode_is_exact_on_hard_text(trained) -> None:
    _, out = trained
    tok = load_tokenizer(out)
    invalid = decode_line(b"bytes \xff\xfe that are not utf-8 \xe2\x82", CorpusStats())
    for text in [*HARD_TEXTS, invalid, "\n".join(HARD_TEXTS)]:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert 3 not in ids, "byte-level BPE must never produce <unk>"
        assert tok.decode(ids, skip_special_tokens=False) == text


def test_transformers_fast_and_python_tokenizers_agree(trained) -> None:
    from tokenizers import AddedToken
    from transformers import AutoTokenizer, RobertaTokenizer

    cfg, out = trained
    tok = load_tokenizer(out)
    auto = AutoTokenizer.from_pretrained(out)
    # built from vocab.json + merges.txt only, not from tokenizer.json: an independent path to the same ids
    slow = RobertaTokenizer(vocab=str(out / "vocab.json"), merges=str(out / "merges.txt"),
                            mask_token=AddedToken("<mask>", lstrip=True, special=True))
    assert (auto.bos_token_id, auto.pad_token_id, auto.eos_token_id, auto.unk_token_id, auto.mask_token_id) == (
        0, 1, 2, 3, cfg.tokenizer.vocab_size - 1)
    assert auto.model_max_length == cfg.data.seq_len
    for text in [*HARD_TEXTS, "Read the <mask> register."]:
        expected = tok.encode(text).ids
        assert auto(text)["input_ids"] == expected
        assert slow(text)["input_ids"] == expected
        assert auto.decode(expected, skip_special_tokens=True) == text.replace(" <mask>", "")
    assert auto("first part", "second part")["input_ids"] == tok.encode("first part", "second part").ids


def test_literal_special_tokens_in_the_corpus_are_text_and_split_special_tokens_says_so(trained) -> None:
    """One behaviour, chosen: training encodes a literal "<mask>" or "</s>" in the corpus as text (fairseq does, and
    a corpus about HTML or tokenizers must not inject masks or separators); the exported tokenizer keeps
    `transformers`' default of matching them, which fill-mask needs ("Paris is the <mask> of France"), and
    `split_special_tokens=True` gives exactly the ids training saw."""
    import numpy as np
    from transformers import AutoTokenizer

    from data_prep.encode import encode_sentences, load_encoder

    _, out = trained
    text = "a literal <mask> then </s> and <s> inside <pad> text"
    trained_ids = encode_sentences(load_encoder(out / "tokenizer.json"), [text], [True], np.uint32).tokens.tolist()
    auto = AutoTokenizer.from_pretrained(out)
    assert not {0, 1, 2, auto.mask_token_id} & set(trained_ids)  # text, never a special id
    assert auto(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] == trained_ids
    assert auto.mask_token_id in auto(text)["input_ids"]  # the default: matched, as fill-mask needs


def test_quality_report(trained) -> None:
    _, out = trained
    report = json.loads((out / "quality.json").read_text())
    assert report["vocab_size"] == 400
    assert report["exact_roundtrip"] == 1.0
    assert 1.0 < report["bytes_per_token"] < 10
    assert report["tokens_per_word"] >= 1.0
    assert report["train_seconds"] >= 0 and report["peak_rss_mb"] > 0
    assert report["valid_bytes"] > 0 and report["train_documents"] > 200


def test_rerun_skips_and_force_rebuilds(trained) -> None:
    cfg, out = trained
    stamp = (out / "tokenizer.json").stat().st_mtime_ns
    messages: list[str] = []
    train_tokenizer(cfg, log=messages.append)
    assert "up to date" in messages[0] and "--force" in messages[0]
    assert (out / "tokenizer.json").stat().st_mtime_ns == stamp
    train_tokenizer(cfg, force=True, log=messages.append)
    assert (out / "tokenizer.json").stat().st_mtime_ns != stamp
    assert not list(out.parent.glob("tokenizer.*")), "no temporary directory is left behind"


def test_same_corpus_same_tokenizer(tiny_cfg: ExperimentConfig, tmp_path: Path) -> None:
    first = (train_tokenizer(tiny_cfg, log=lambda *_: None) / "tokenizer.json").read_text()
    tiny_cfg.run_dir = str(tmp_path / "other")
    second = (train_tokenizer(tiny_cfg, log=lambda *_: None) / "tokenizer.json").read_text()
    assert first == second


def test_load_missing_tokenizer_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match=r"tokenizer.json does not exist: run `make tokenizer` first"):
        load_tokenizer(tmp_path)
