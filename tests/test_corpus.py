from __future__ import annotations

import gzip
import json
import resource
from pathlib import Path

import pytest

from data_prep.config import CorpusConfig
from data_prep.corpus import Corpus, CorpusError, CorpusStats, decode_line, held_out, read_source

from .conftest import make_documents, write_txt


def read_all(source: str | Path, text_field: str = "text", max_bytes: int = 1_000_000) -> tuple[list, CorpusStats]:
    stats = CorpusStats()
    return list(read_source(str(source), text_field, max_bytes, stats)), stats


def test_txt_documents_are_blank_line_separated(tmp_path: Path) -> None:
    p = tmp_path / "a.txt"
    p.write_text("first line\nsecond line\n\n\n  \nnext doc\r\nwith crlf   \n\nlast doc without newline")
    docs, stats = read_all(p)
    assert docs == [["first line", "second line"], ["next doc", "with crlf"], ["last doc without newline"]]
    assert stats.replaced_bytes == 0 and stats.nul_bytes == 0


def test_gzip_jsonl_and_parquet_give_the_same_documents(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = make_documents(20)
    texts = ["\n".join(d) for d in docs]
    write_txt(tmp_path / "c.txt", docs)
    with gzip.open(tmp_path / "c.txt.gz", "wt", encoding="utf-8") as f:
        f.write((tmp_path / "c.txt").read_text())
    lines = "".join(json.dumps({"id": i, "body": t}) + "\n" for i, t in enumerate(texts))
    (tmp_path / "c.jsonl").write_text(lines)
    with gzip.open(tmp_path / "c.jsonl.gz", "wt") as f:
        f.write(lines)
    pq.write_table(pa.table({"body": texts}), tmp_path / "c.parquet", row_group_size=7)
    for name in ("c.txt", "c.txt.gz"):
        assert read_all(tmp_path / name)[0] == docs
    for name in ("c.jsonl", "c.jsonl.gz", "c.parquet"):
        assert read_all(tmp_path / name, text_field="body")[0] == docs, name


def test_missing_text_field_and_bad_json_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(CorpusError, match=r"a.jsonl:1: no field 'text' \(has: body\); set corpus.text_field"):
        read_all(tmp_path / "a.jsonl")
    (tmp_path / "b.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(CorpusError, match=r"b.jsonl:2: not valid JSON"):
        read_all(tmp_path / "b.jsonl")


def test_datasets_saved_to_disk(tmp_path: Path) -> None:
    import datasets

    docs = make_documents(12)
    ds = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": ["\n".join(d) for d in docs]}),
        "test": datasets.Dataset.from_dict({"text": ["held out text"]}),
    })
    ds.save_to_disk(str(tmp_path / "ds"))
    assert read_all(f"hf:{tmp_path / 'ds'}")[0] == docs
    assert read_all(f"hf:{tmp_path / 'ds'}:test")[0] == [["held out text"]]
    with pytest.raises(CorpusError, match="no split 'valid'"):
        read_all(f"hf:{tmp_path / 'ds'}:valid")
    with pytest.raises(CorpusError, match="no column 'content'"):
        read_all(f"hf:{tmp_path / 'ds'}", text_field="content")


def test_a_dataset_repository_of_files_streams_without_filling_the_cache(tmp_path: Path, monkeypatch) -> None:
    """hf:DIR for a folder laid out like a hub dataset repository (data/<split>-*.parquet): streamed as the hub
    would be, in file order, with its splits; nothing converted to Arrow in the datasets cache."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    docs = make_documents(30)
    repo = tmp_path / "repo" / "data"
    repo.mkdir(parents=True)
    for k in range(3):
        pq.write_table(pa.table({"id": list(range(10)), "text": ["\n".join(d) for d in docs[10 * k : 10 * k + 10]]}),
                       repo / f"train-{k:05d}-of-00003.parquet")
    pq.write_table(pa.table({"id": [0], "text": ["held out text"]}), repo / "test-00000-of-00001.parquet")
    read, stats = read_all(f"hf:{repo.parent}")
    assert read == docs and stats.bytes == sum(len("\n".join(d).encode()) for d in docs)
    assert read_all(f"hf:{repo.parent}:test")[0] == [["held out text"]]
    assert not list(cache.rglob("*.arrow")), "materialised in the datasets cache"
    with pytest.raises(CorpusError, match=r"hf:.*repo:valid: cannot load from its files"):
        read_all(f"hf:{repo.parent}:valid")
    with pytest.raises(CorpusError, match="no column 'content'"):
        read_all(f"hf:{repo.parent}", text_field="content")


def test_invalid_utf8_is_replaced_and_counted(tmp_path: Path) -> None:
    p = tmp_path / "bad.txt"
    p.write_bytes(b"ok \xff\xfe bytes\ntruncated \xe2\x82\n\nkeeps \xef\xbf\xbd real replacement char\n")
    docs, stats = read_all(p)
    assert docs == [["ok \ufffd\ufffd bytes", "truncated \ufffd"], ["keeps \ufffd real replacement char"]]
    assert stats.replaced_bytes == 4
    s = CorpusStats()
    raw = b"a\x80b\xc3\xa9\xf0\x9f\x98"
    assert decode_line(raw, s) == raw.decode("utf-8", errors="replace")
    assert s.replaced_bytes == 4


def test_nul_bytes_are_dropped_and_a_file_of_nuls_is_empty(tmp_path: Path) -> None:
    (tmp_path / "nul.txt").write_bytes(b"\x00" * 100_000)
    docs, stats = read_all(tmp_path / "nul.txt")
    assert docs == [] and stats.nul_bytes == 100_000
    (tmp_path / "mixed.txt").write_bytes(b"a\x00b\n")
    assert read_all(tmp_path / "mixed.txt")[0] == [["ab"]]
    with pytest.raises(CorpusError, match="corpus.train: the corpus holds no text"):
        list(Corpus(CorpusConfig(train=[str(tmp_path / "nul.txt")])).documents("train"))


def test_empty_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("")
    corpus = Corpus(CorpusConfig(train=[str(tmp_path / "empty.txt")]))
    with pytest.raises(CorpusError, match="holds no text"):
        list(corpus.documents("train"))


def test_fifty_megabyte_line_streams_in_bounded_pieces(tmp_path: Path) -> None:
    p = tmp_path / "long.txt.gz"
    piece = "αβγ word " * 1000  # multi-byte characters, so cuts must respect UTF-8 boundaries
    n = 50_000_000 // len(piece.encode())
    with gzip.open(p, "wt", encoding="utf-8", compresslevel=1) as f:
        f.write("short first line\n")
        for _ in range(n):
            f.write(piece)
        f.write("\n\nnext document\n")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    stats = CorpusStats()
    total = n_pieces = 0
    docs = read_source(str(p), "text", 1_000_000, stats)
    first = next(docs)
    assert first[0] == "short first line"
    for s in first[1:]:
        assert len(s.encode()) <= 1_000_000
        total += len(s)
        n_pieces += 1
    assert total == n * len(piece) - 1  # every character kept; only the line's trailing space goes
    assert stats.replaced_bytes == 0 and stats.split_lines == 1 and n_pieces >= 50
    assert next(docs) == ["next document"]
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    # The document (this one line) is held as a list of pieces, about 78 MB as Python strings of 2-byte
    # characters; what must not happen is a second copy of it, or of the file.
    assert grown_mb < 120, f"reading a 50 MB line grew peak memory by {grown_mb:.0f} MB"


def test_directories_and_globs_in_sorted_order(tmp_path: Path) -> None:
    (tmp_path / "d" / "sub").mkdir(parents=True)
    write_txt(tmp_path / "d" / "b.txt", [["second"]])
    write_txt(tmp_path / "d" / "a.txt", [["first"]])
    write_txt(tmp_path / "d" / "sub" / "c.txt", [["third"]])
    (tmp_path / "d" / "notes.md").write_text("ignored")
    cfg = CorpusConfig(train=[str(tmp_path / "d")], valid_fraction=0.0)
    assert list(Corpus(cfg).documents("train")) == [["first"], ["second"], ["third"]]
    cfg = CorpusConfig(train=[str(tmp_path / "d" / "*.txt")], valid_fraction=0.0)
    assert list(Corpus(cfg).documents("train")) == [["first"], ["second"]]
    with pytest.raises(CorpusError, match=r"corpus.train: no file matches .*\*.jsonl"):
        Corpus(CorpusConfig(train=[str(tmp_path / "d" / "*.jsonl")]))
    with pytest.raises(CorpusError, match="corpus.valid: .*missing.txt does not exist"):
        Corpus(CorpusConfig(train=[str(tmp_path / "d")], valid=[str(tmp_path / "missing.txt")]))


def test_seeded_document_split(tmp_path: Path) -> None:
    docs = [[f"document number {i}"] for i in range(2000)]
    p = write_txt(tmp_path / "c.txt", docs)
    cfg = CorpusConfig(train=[str(p)], valid_fraction=0.1)
    train = list(Corpus(cfg, seed=1).documents("train"))
    valid = list(Corpus(cfg, seed=1).documents("valid"))
    assert sorted(train + valid) == sorted(docs)  # a partition: nothing lost, nothing duplicated
    assert 150 < len(valid) < 250
    assert valid == [d for i, d in enumerate(docs) if held_out(1, i, 0.1)]
    assert valid == list(Corpus(cfg, seed=1).documents("valid"))  # same seed, same split
    assert valid != list(Corpus(cfg, seed=2).documents("valid"))
    # an explicit valid set replaces the split
    v = write_txt(tmp_path / "v.txt", [["explicit validation"]])
    explicit = Corpus(CorpusConfig(train=[str(p)], valid=[str(v)]))
    assert list(explicit.documents("valid")) == [["explicit validation"]]
    assert len(list(explicit.documents("train"))) == 2000


def test_stats_count_documents_and_sentences(tmp_path: Path) -> None:
    docs = make_documents(50)
    p = write_txt(tmp_path / "c.txt", docs)
    stats = CorpusStats()
    list(Corpus(CorpusConfig(train=[str(p)], valid_fraction=0.0)).documents("train", stats))
    assert stats.documents == 50 and stats.sentences == sum(map(len, docs))
    assert stats.bytes == p.stat().st_size
