"""Weighted corpus sources (issue 15): the config entries, the weighted stream, per-source records in meta.json,
the tokenizer's bounded sample, and slices prepared apart equal to one preparation."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from data_prep import shards
from data_prep.config import ConfigError, config_from_dict, dump_config, load_config
from data_prep.corpus import Corpus, held_out, kept
from data_prep.prepare import format_report, prepare_data
from data_prep.tokenizer_training import format_report as tokenizer_report
from data_prep.tokenizer_training import train_tokenizer
from pretrain.hf.card import source_lines
from tests.conftest import make_documents, write_txt

SIZES = {"wiki": 60, "books": 40, "news": 50}


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("sources")
    return {name: write_txt(tmp / f"{name}.txt", make_documents(n, seed=i + 10))
            for i, (name, n) in enumerate(SIZES.items())}


def mix(corpora: dict[str, Path], weights: dict[str, float]) -> str:
    """A --corpus.train= value: one named mapping per source."""
    entries = [{"path": str(corpora[n]), "weight": w, "name": n} for n, w in weights.items()]
    return "--corpus.train=" + json.dumps(entries)


def cfg_of(tmp_path: Path, *overrides: str):
    return load_config(None, [f"--run_dir={tmp_path / 'run'}", "--tokenizer.vocab_size=400", "--data.seq_len=32",
                              "--data.num_proc=1", *overrides])


def texts(docs) -> list[str]:
    return ["\n".join(d) for d in docs]


# --- the config ------------------------------------------------------------------------------------------------


def test_mappings_sit_beside_plain_strings_and_round_trip(tmp_path: Path) -> None:
    cfg = cfg_of(tmp_path, '--corpus.train=[a.txt, {path: "hf:cc_news", weight: 0.5, name: news}]')
    assert cfg.corpus.train[0] == "a.txt"  # what the user wrote is kept: plain configs serialise as before
    assert [(s.path, s.weight, s.name, s.label) for s in cfg.corpus.sources] == [
        ("a.txt", 1.0, None, "a.txt"), ("hf:cc_news", 0.5, "news", "news")]
    assert config_from_dict(cfg.to_dict()) == cfg
    assert "weight: 0.5" in dump_config(cfg)
    plain = cfg_of(tmp_path, "--corpus.train=[a.txt, b.txt]")
    assert plain.to_dict()["corpus"]["train"] == ["a.txt", "b.txt"]


@pytest.mark.parametrize("train, message", [
    ("[a.txt, {path: b.txt, weight: -1}]", "corpus.train[1].weight: -1 must be >= 0"),
    ("[{path: a.txt, wieght: 2}]", "unknown key corpus.train[0].wieght (known in corpus.train[0]: path, weight, name)"),
    ("[{path: a.txt, weight: heavy}]", "corpus.train[0].weight: expected float, got 'heavy'"),
    ("[{weight: 2.0, name: books}]", "corpus.train[0].path: missing"),
    ("[{path: a.txt, name: books}, {path: b.txt, name: books}]",
     "corpus.train[1].name: 'books' is also the name of corpus.train[0]"),
    ("[{path: a.txt, name: my books}]", "corpus.train[0].name: 'my books' must be letters"),
    ("[{path: a.txt, weight: 0}]", "corpus.train: every weight is 0"),
    ("[{path: a.txt, weight: .inf}]", "corpus.train[0].weight: inf must be a finite number"),
], ids=["negative", "unknown-key", "not-a-number", "no-path", "duplicate-name", "bad-name", "all-zero", "inf"])
def test_a_bad_source_entry_is_one_line_naming_it(tmp_path: Path, train: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        cfg_of(tmp_path, f"--corpus.train={train}")
    assert message in str(err.value) and "\n" not in str(err.value)


def test_several_bad_entries_are_gathered_into_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        cfg_of(tmp_path, "--corpus.train=[{path: a, weight: -2}, {path: '', name: x}]")
    assert str(err.value) == ("corpus.train[0].weight: -2 must be >= 0; "
                              "corpus.train[1].path: missing (a file, glob, directory or hf:NAME)")


# --- the weighted stream ---------------------------------------------------------------------------------------


def test_weights_give_the_expected_documents_exactly(tmp_path: Path, corpora) -> None:
    cfg = cfg_of(tmp_path, mix(corpora, {"wiki": 1, "books": 2.0, "news": 0.5}), "--corpus.valid_fraction=0")
    docs = list(Corpus(cfg.corpus, 7).records("train"))
    by_source = Counter(d.source for d in docs)
    half = [j for j in range(SIZES["news"]) if kept(7, str(corpora["news"]), j, 0.5)]
    # about half: the sample is keyed by the path, which pytest's tmp directory varies (15 of 50 was seen once;
    # outside [10, 40] has a probability of about 6e-6)
    assert by_source == {0: 60, 1: 2 * 40, 2: len(half)} and 10 <= len(half) <= 40
    news = texts(make_documents(50, seed=12))
    assert texts(d.lines for d in docs if d.source == 2) == [news[j] for j in half]
    # the copies of weight 2 are a whole pass apart: books, then books again
    books = texts(make_documents(40, seed=11))
    assert texts(d.lines for d in docs if d.source == 1) == books + books
    # 1.5: every document once, then the seeded half of a 0.5 pass again; 0: none
    cfg = cfg_of(tmp_path, mix(corpora, {"books": 1.5, "news": 0}), "--corpus.valid_fraction=0")
    got = texts(d.lines for d in Corpus(cfg.corpus, 7).records("train"))
    assert got == books + [books[j] for j in range(40) if kept(7, str(corpora["books"]), j, 0.5)]


def test_held_out_documents_never_reach_train_in_any_pass_and_weight_1_is_the_plain_stream(tmp_path, corpora):
    plain = cfg_of(tmp_path, f"--corpus.train=[{corpora['wiki']}, {corpora['books']}]", "--corpus.valid_fraction=0.2")
    weighted = cfg_of(tmp_path, mix(corpora, {"wiki": 1, "books": 3}), "--corpus.valid_fraction=0.2")
    named = cfg_of(tmp_path, mix(corpora, {"wiki": 1, "books": 1}), "--corpus.valid_fraction=0.2")
    both = texts(make_documents(60, seed=10)) + texts(make_documents(40, seed=11))
    valid = [t for i, t in enumerate(both) if held_out(0, i, 0.2)]
    for cfg in (plain, weighted, named):
        assert texts(Corpus(cfg.corpus).documents("valid")) == valid  # weights never touch validation
    train = texts(Corpus(weighted.corpus).documents("train"))
    assert not set(train) & set(valid)
    assert len(train) == sum((1 if i < 60 else 3) for i in range(100) if not held_out(0, i, 0.2))
    assert texts(Corpus(named.corpus).documents("train")) == texts(Corpus(plain.corpus).documents("train"))
    # the content address: the same for weight 1 written either way, new when a weight changes
    assert Corpus(named.corpus).fingerprint() == Corpus(plain.corpus).fingerprint()
    assert Corpus(weighted.corpus).fingerprint() != Corpus(plain.corpus).fingerprint()
    heavier = cfg_of(tmp_path, mix(corpora, {"wiki": 1, "books": 3.5}), "--corpus.valid_fraction=0.2")
    assert Corpus(heavier.corpus).fingerprint() != Corpus(weighted.corpus).fingerprint()


# --- make data: per-source records, slices ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, corpora) -> Path:
    tmp = tmp_path_factory.mktemp("tok")
    return train_tokenizer(cfg_of(tmp, mix(corpora, {"wiki": 1, "books": 1, "news": 1})), log=lambda _: None)


def prep(tmp_path: Path, tokenizer: Path, *overrides: str) -> Path:
    cfg = cfg_of(tmp_path, *overrides)
    if not (cfg.run_path / "tokenizer").exists():
        shutil.copytree(tokenizer, cfg.run_path / "tokenizer")
    return prepare_data(cfg, log=lambda _: None)


WEIGHTS = {"wiki": 1, "books": 2.0, "news": 0.5}


def test_meta_json_records_each_source_and_the_report_and_card_show_them(tmp_path, corpora, tokenizer) -> None:
    meta_path = prep(tmp_path, tokenizer, mix(corpora, WEIGHTS), "--corpus.valid_fraction=0.1")
    meta = json.loads(meta_path.read_text())
    train = meta["splits"]["train"]
    table = {s["name"]: s for s in meta["sources"]}
    assert list(table) == ["wiki", "books", "news"]
    assert [table[n]["weight"] for n in table] == [1.0, 2.0, 0.5] and table["news"]["path"] == str(corpora["news"])
    assert sum(s["documents"] for s in meta["sources"]) == train["documents"]
    assert sum(s["tokens"] for s in meta["sources"]) == train["stream_tokens"]
    assert sum(s["share"] for s in meta["sources"]) == pytest.approx(1, abs=1e-5)
    assert table["books"]["tokens"] / train["stream_tokens"] == pytest.approx(table["books"]["share"], abs=1e-6)
    kept_books = sum(not held_out(0, 60 + j, 0.1) for j in range(40))
    assert table["books"]["documents"] == 2 * kept_books
    alone = cfg_of(tmp_path, f"--corpus.train={corpora['books']}", "--corpus.valid_fraction=0")
    sizes = [d.bytes for d in Corpus(alone.corpus).records("train")]
    assert table["books"]["bytes"] == 2 * sum(n for j, n in enumerate(sizes) if not held_out(0, 60 + j, 0.1))
    report = format_report(meta, meta_path.parent)
    assert "books" in report and "2 " in report.split("books")[1] and f"{table['books']['share']:.2%}" in report
    lines = source_lines(meta)
    assert "- books (`" in lines and "weight 2," in lines and f"{table['books']['tokens']:,} tokens" in lines
    # the valid split counts its documents per source too (weights never apply there)
    assert [s["documents"] for s in meta["splits"]["valid"]["sources"]] == [
        sum(held_out(0, base + j, 0.1) for j in range(n)) for base, n in ((0, 60), (60, 40), (100, 50))]
    # another weight: another shard directory
    other = prep(tmp_path, tokenizer, mix(corpora, {**WEIGHTS, "news": 1.0}), "--corpus.valid_fraction=0.1")
    assert other.parent != meta_path.parent


def block_multiset(meta_path: Path, split: str) -> Counter:
    reader = shards.open_split(meta_path, split)
    return Counter(tuple(reader.block(i).tolist()) for i in range(reader.num_blocks))


@pytest.mark.parametrize("packing", ["doc_sentences", "full_sentences"])
def test_slices_prepared_apart_hold_what_one_machine_prepares(tmp_path, corpora, tokenizer, packing) -> None:
    """Three slices, each prepared as if on its own machine (own run_dir), then copied together."""
    args = (mix(corpora, WEIGHTS), "--corpus.valid_fraction=0.1", f"--data.packing={packing}")
    whole = prep(tmp_path / "one", tokenizer, *args)
    together = tmp_path / "together"
    for k in range(3):
        part = prep(tmp_path / f"machine{k}", tokenizer, *args, "--data.num_shards=3", f"--data.shard_index={k}")
        together.mkdir(exist_ok=True)
        for f in part.parent.iterdir():
            shutil.copy(f, together / f.name)
    meta = shards.read_meta(together)  # no meta.json: the reader combines the slices' parts
    one = json.loads(whole.read_text())
    assert meta["sources"] == one["sources"]  # per-source documents, bytes, tokens and shares add up exactly
    for split in ("train", "valid"):
        assert meta["splits"][split]["documents"] == one["splits"][split]["documents"]
        reader, single = shards.open_split(together, split), shards.open_split(whole, split)
        tokens = np.concatenate([reader.block(i) for i in range(reader.num_blocks)])
        ref = np.concatenate([single.block(i) for i in range(single.num_blocks)])
        text = ~np.isin(tokens, [0, 2])
        assert Counter(tokens[text].tolist()) == Counter(ref[~np.isin(ref, [0, 2])].tolist())
        if packing == "doc_sentences":  # blocks never cross documents: the same documents give the same blocks
            assert block_multiset(together, split) == block_multiset(whole, split)


# --- the tokenizer's bounded sample ----------------------------------------------------------------------------


def test_the_tokenizer_sample_respects_the_cap_follows_the_weights_and_repeats(tmp_path, corpora) -> None:
    sizes = {n: p.stat().st_size for n, p in corpora.items()}
    cap = sum(sizes.values()) // 3
    args = (mix(corpora, {"wiki": 1, "books": 2.0, "news": 0.5}), f"--tokenizer.max_train_bytes={cap}",
            "--corpus.valid_fraction=0.1")
    first = train_tokenizer(cfg_of(tmp_path / "a", *args), log=lambda _: None)
    second = train_tokenizer(cfg_of(tmp_path / "b", *args), log=lambda _: None)
    assert (first / "tokenizer.json").read_bytes() == (second / "tokenizer.json").read_bytes()
    report = json.loads((first / "quality.json").read_text())
    assert report == {**json.loads((second / "quality.json").read_text()),
                      **{k: report[k] for k in ("train_seconds", "peak_rss_mb")}}
    read = {r["name"]: r for r in report["sources"]}
    assert report["max_train_bytes"] == cap and cap * 0.9 < report["train_bytes"] <= cap
    # weight x size: books gets 2 x its size per unit, news a half
    total = sizes["wiki"] + 2 * sizes["books"] + 0.5 * sizes["news"]
    for name, w in (("wiki", 1), ("books", 2.0), ("news", 0.5)):
        assert read[name]["bytes"] == pytest.approx(cap * w * sizes[name] / total, rel=0.1, abs=400)
    assert report["bytes_read"] < sum(sizes.values()) * 0.6  # left each source early
    assert "a sample: tokenizer.max_train_bytes" in tokenizer_report(report, first)
    assert "read from books" in tokenizer_report(report, first)
    # the sample never holds a held-out document of the first source (its global index is exact)
    wiki = texts(make_documents(60, seed=10))
    assert report["train_documents"] == sum(r["documents"] for r in report["sources"])
    assert read["wiki"]["documents"] <= sum(not held_out(0, i, 0.1) for i in range(len(wiki)))


def test_a_cap_of_0_is_the_tokenizer_of_all_the_text(tmp_path, corpora) -> None:
    args = (f"--corpus.train={corpora['wiki']}", "--corpus.valid_fraction=0.1")
    plain = train_tokenizer(cfg_of(tmp_path / "a", *args), log=lambda _: None)
    zero = train_tokenizer(cfg_of(tmp_path / "b", *args, "--tokenizer.max_train_bytes=0"), log=lambda _: None)
    big = train_tokenizer(cfg_of(tmp_path / "c", *args, "--tokenizer.max_train_bytes=100000000"), log=lambda _: None)
    assert (plain / "tokenizer.json").read_bytes() == (zero / "tokenizer.json").read_bytes()
    assert json.loads((plain / "quality.json").read_text())["fingerprint"] == json.loads(
        (zero / "quality.json").read_text())["fingerprint"]
    assert (big / "tokenizer.json").read_bytes() == (plain / "tokenizer.json").read_bytes()  # a cap above the corpus


def test_a_cap_below_every_first_document_is_one_line(tmp_path, corpora) -> None:
    with pytest.raises(ConfigError, match=r"tokenizer.max_train_bytes=10 is smaller than the first document"):
        train_tokenizer(cfg_of(tmp_path, f"--corpus.train={corpora['wiki']}", "--tokenizer.max_train_bytes=10"),
                        log=lambda _: None)


def test_slices_from_machines_that_saw_another_corpus_are_refused(tmp_path, corpora, tokenizer) -> None:
    together = tmp_path / "together"
    together.mkdir()
    for k, weights in enumerate((WEIGHTS, {**WEIGHTS, "news": 1.0})):  # machine 1 was given another weight
        part = prep(tmp_path / f"m{k}", tokenizer, mix(corpora, weights), "--data.num_shards=2",
                    f"--data.shard_index={k}")
        for f in part.parent.iterdir():
            shutil.copy(f, together / f.name)
    with pytest.raises(shards.ShardError, match=r"meta-00001-of-00002.json: prepared from another corpus_fingerprint"):
        shards.read_meta(together)


def test_an_explicit_validation_set_is_counted_per_entry_and_never_weighted(tmp_path, corpora, tokenizer) -> None:
    meta_path = prep(tmp_path, tokenizer, mix(corpora, {"wiki": 2.0}),
                     f"--corpus.valid=[{corpora['books']}, {corpora['news']}]")
    meta = json.loads(meta_path.read_text())
    assert [s["documents"] for s in meta["splits"]["valid"]["sources"]] == [40, 50]
    assert [s["documents"] for s in meta["sources"]] == [120]
