from __future__ import annotations

import gzip
import json
import resource
from pathlib import Path

import pytest

from data_prep.config import CorpusConfig
from data_prep.corpus import Corpus, held_out
from data_prep.readers import CorpusError, CorpusStats, decode_line, read_source

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


# ---------------------------------------------------------------------------------------------------------------
# Hostile and malformed corpora: one line naming the file (and line or row), exit 2, through the command line


def run_cli(capsys, tmp_path: Path, *args: str, command: str = "tokenizer") -> tuple[int, str, str]:
    from data_prep.__main__ import main

    capsys.readouterr()
    code = main([command, f"--run_dir={tmp_path / 'run'}", "--corpus.valid_fraction=0", "--tokenizer.vocab_size=300",
                 "--data.seq_len=32", "--data.num_proc=1", *args])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def test_a_deeply_nested_json_line_is_one_line_naming_it(tmp_path: Path, capsys) -> None:
    p = tmp_path / "c.jsonl"
    p.write_text(json.dumps({"text": "fine"}) + "\n" + '{"text": ' + "[" * 200_000 + "]" * 200_000 + "}\n")
    assert run_cli(capsys, tmp_path, f"--corpus.train={p}")[::2] == (
        2, f"error: {p}:2: JSON nested too deeply to read (a damaged or hostile line); remove the line\n")


def test_a_lone_surrogate_is_replaced_and_counted_like_invalid_utf8(tmp_path: Path, capsys) -> None:
    """JSON's "\\ud800" without its pair decodes to a code point no UTF-8 holds (the tokenizer refused the text
    with a TypeError); a pair is one character and stays."""
    p = tmp_path / "c.jsonl"
    p.write_text('{"text": "half \\ud800 of a pair\\nand \\udc00\\ud800 backwards"}\n'
                 '{"text": "a whole pair \\ud83d\\ude00 stays"}\n' * 20)
    docs, stats = read_all(p)
    assert docs[:2] == [["half \ufffd of a pair", "and \ufffd\ufffd backwards"], ["a whole pair \U0001f600 stays"]]
    assert stats.replaced_bytes == 3 * 20
    code, out, _ = run_cli(capsys, tmp_path, f"--corpus.train={p}", command="data")
    assert code == 0 and "data: wrote" in out
    meta = json.loads(next((tmp_path / "run" / "data").glob("*/meta.json")).read_text())
    assert meta["splits"]["train"]["replaced_bytes"] == 3 * 20


def gzip_members(*parts: bytes) -> bytearray:
    return bytearray(b"".join(gzip.compress(part, mtime=0) for part in parts))


def test_damaged_gzip_data_is_one_line_naming_the_file_and_the_lines_read(tmp_path: Path, capsys) -> None:
    first = "".join(f"sentence {i} of the first member\n" + ("\n" if i % 4 == 3 else "") for i in range(40)).encode()
    second = b"the second member\n" * 50
    # damaged deflate data: the second member's first block header says block type 3, which does not exist
    data = gzip_members(first, second)
    data[len(gzip.compress(first, mtime=0)) + 10] = 0b111
    p = tmp_path / "c.txt.gz"
    p.write_bytes(bytes(data))
    lines = len(first.splitlines())
    assert run_cli(capsys, tmp_path, f"--corpus.train={p}")[::2] == (2, (
        f"error: {p}: corrupt gzip file after line {lines} (error: Error -3 while decompressing data: "
        "invalid block type); replace the file (`gzip -t` checks one)\n"))
    # a CRC that does not match (the data decompressed, but is not what was compressed), in a .jsonl.gz
    lines = b"".join(json.dumps({"text": f"record {i}"}).encode() + b"\n" for i in range(30))
    data = gzip_members(lines)
    data[-8] ^= 1
    p = tmp_path / "c.jsonl.gz"
    p.write_bytes(bytes(data))
    crc = gzip.zlib.crc32(lines)
    assert run_cli(capsys, tmp_path, f"--corpus.train={p}")[::2] == (2, (
        f"error: {p}: corrupt gzip file after line 30 (BadGzipFile: CRC check failed {crc ^ 1:#x} != {crc:#x}); "
        "replace the file (`gzip -t` checks one)\n"))


def test_a_parquet_text_column_of_numbers_is_one_line_naming_it(tmp_path: Path, capsys) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": [1, 2, 3], "title": ["a", "b", "c"]}), p)
    assert run_cli(capsys, tmp_path, f"--corpus.train={p}")[::2] == (
        2, f"error: {p}: column 'text' holds int64, not text; set corpus.text_field to a text column (has: title)\n")
    pq.write_table(pa.table({"text": pa.array(["x", "y"]).dictionary_encode()}), p)  # text, dictionary-encoded
    assert read_all(p)[0] == [["x"], ["y"]]


def test_a_garbage_tokenizer_json_is_one_line_naming_it_and_the_fix(tmp_path: Path, capsys) -> None:
    corpus = write_txt(tmp_path / "c.txt", make_documents(50))
    path = tmp_path / "run" / "tokenizer" / "tokenizer.json"
    path.parent.mkdir(parents=True)
    path.write_text("garbage")
    assert run_cli(capsys, tmp_path, f"--corpus.train={corpus}", command="data")[::2] == (
        2, f"error: {path}: not a tokenizer file (expected value at line 1 column 1); delete it and run "
           "`make tokenizer` again\n")


def test_globs_and_directories_never_match_the_runs_own_outputs(tmp_path: Path, capsys, monkeypatch) -> None:
    """corpus.train: [data/**/*.txt] with run_dir under data/: the second run would train on its own
    tokenizer/merges.txt (and a directory spec on vocab.json and the shards' records) and rebuild everything."""
    monkeypatch.chdir(tmp_path)
    for spec in ("data/**/*.txt", "text"):
        root = Path(spec.split("/")[0])
        root.mkdir()
        write_txt(root / "c.txt", make_documents(60))
        for _ in range(2):
            code, out, err = run_cli(capsys, tmp_path, f"--corpus.train={spec}", f"--run_dir={root}/runs/0",
                                     command="data")
            assert code == 0, err
        assert "is up to date" in out and "warning" not in out, out
        assert (root / "runs" / "0" / "tokenizer" / "merges.txt").is_file()
    assert run_cli(capsys, tmp_path, "--corpus.train=data/runs/**/*.txt", "--run_dir=data/runs/0")[::2] == (
        2, f"error: corpus.train: no file matches data/runs/**/*.txt outside this run's outputs "
           f"({tmp_path / 'data/runs/0'})\n")
    from data_prep.config import load_config

    cfg = load_config(None, ["--corpus.train=data/**/*.txt", "--run_dir=data/runs/0", "--data.cache_dir=data/cache"])
    Path("data/cache/x").mkdir(parents=True)
    write_txt(Path("data/cache/x/cached.txt"), [["shards of a URL"]])
    assert Corpus.of_experiment(cfg).train_sources == ["data/c.txt"]
    assert Corpus(cfg.corpus).train_sources[0] == "data/c.txt" and len(Corpus(cfg.corpus).train_sources) > 1
    Path("link").symlink_to("data")  # the run_dir named through a symlink is still the run's
    cfg = load_config(None, ["--corpus.train=data/**/*.txt", "--run_dir=link/runs/0", "--data.cache_dir=link/cache"])
    assert Corpus.of_experiment(cfg).train_sources == ["data/c.txt"]


@pytest.mark.parametrize("spec, problem", [
    ("hf:/abs/missing", "/abs/missing is not a directory (hf: takes a `save_to_disk` directory, a folder of data "
                        "files, or a hub dataset name)"),
    ("hf:./missing/ds:train", "missing/ds is not a directory (hf: takes a `save_to_disk` directory, a folder of "
                              "data files, or a hub dataset name)"),
    ("hf:bad name!", "'bad name!' is neither a directory nor a hub dataset name (hf:NAME, hf:NAME/CONFIG or "
                     "hf:OWNER/NAME/CONFIG: letters, digits, '-', '_' and '.'); write a local folder as ./DIR or "
                     "/abs/DIR"),
    ("hf:a/b/c/d", "'a/b/c/d' is neither a directory nor a hub dataset name (hf:NAME, hf:NAME/CONFIG or "
                   "hf:OWNER/NAME/CONFIG: letters, digits, '-', '_' and '.'); write a local folder as ./DIR or "
                   "/abs/DIR"),
])
def test_an_hf_spec_that_is_no_folder_and_no_hub_name_is_refused_offline(spec: str, problem: str, tmp_path: Path,
                                                                          capsys, monkeypatch) -> None:
    import datasets

    def no_request(*args, **kwargs):
        raise AssertionError("load_dataset was called")

    monkeypatch.setattr(datasets, "load_dataset", no_request)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    assert run_cli(capsys, tmp_path, f"--corpus.train={spec}")[::2] == (2, f"error: corpus.train: {spec}: {problem}\n")


def test_hub_names_and_local_folders_pass_the_hf_check(tmp_path: Path, monkeypatch) -> None:
    from data_prep.specs import check_hf_spec

    for spec in ("hf:wikitext/wikitext-2-raw-v1", "hf:Salesforce/wikitext/wikitext-103-raw-v1:train", "hf:c4",
                 "hf:legacy-datasets/wikipedia/20220301.en:train"):
        assert check_hf_spec(spec) == spec
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "ds").mkdir()
    assert check_hf_spec("hf:~/ds:test") == f"hf:{tmp_path / 'ds'}:test"
    with pytest.raises(CorpusError, match=r"^corpus.valid: hf:: '' is neither a directory nor a hub dataset name"):
        check_hf_spec("hf:", "corpus.valid")
