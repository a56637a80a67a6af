"""A shard manifest is data from outside: a hostile meta.json (served from a real S3 server, moto's, and from
file://) can make a fetch fail with one line naming the URL and the entry, and nothing else: no file outside the
cache, nothing it names loaded, no disk filled, no traceback. Also the pin (data.shards_sha256), the re-hash of a
cached file altered in place, the log line of a manifest without a files table, the same checks on local shards,
and temporaries that never follow a planted symlink and are removed only when provably stale."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from data_prep import fetch, shards, tempfiles
from data_prep.config import ConfigError, ExperimentConfig, load_config
from data_prep.fetch import fetch_shards
from data_prep.manifest import MAX_META_BYTES, validate_meta
from data_prep.remote import cache_path
from data_prep.shards import (
    META,
    ShardError,
    ShardWriter,
    open_split,
    read_meta,
    short_phase,
)
from data_prep.tempfiles import write_json_atomic

from .test_object_store import BUCKET, client, endpoint  # noqa: F401 - the S3 server fixture

pytestmark = pytest.mark.timeout(120)

VOCAB = 300
BLOCKS = [[0, 5, 6, 2], [0, 7, 2], [0, 8, 9, 10, 299, 2]]


def shard_files(directory: Path, blocks: list[list[int]] = BLOCKS, name: str = "train") -> dict[str, Any]:
    """A train split (or slice) written by the real writer: its record."""
    dtype = np.uint16
    with ShardWriter(directory, name, dtype) as w:
        w.write(np.array([t for b in blocks for t in b], dtype), np.array([len(b) for b in blocks], np.int64))
        return w.commit({"documents": 1, "sentences": 3})


def manifest(directory: Path, record: dict[str, Any], table: bool = True) -> dict[str, Any]:
    """meta.json as `python -m data_prep upload` writes it: the shards' fields and a files table."""
    meta = {"format": 1, "dtype": "uint16", "vocab_size": VOCAB, "seq_len": 8, "packing": "full_sentences",
            "special_ids": {"bos": 0, "pad": 1, "eos": 2, "unk": 3, "mask": VOCAB - 1}, "splits": {"train": record}}
    if table:
        meta["files"] = {record[k]: entry((directory / record[k]).read_bytes()) for k in ("tokens", "offsets")}
    return meta


def entry(data: bytes) -> dict[str, Any]:
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def dump(meta: dict[str, Any]) -> bytes:
    return (json.dumps(meta, indent=2) + "\n").encode()


class Server:
    """One place that serves files under a URL: a file:// directory or a prefix of the moto S3 bucket."""

    def __init__(self, kind: str, tmp_path: Path, endpoint_url: str | None, case: str):
        self.kind, self.endpoint = kind, endpoint_url
        if kind == "file":
            self.root = tmp_path / "served" / "bucket" / case
            self.url = f"file://{self.root}"
        else:
            self.fs = client(endpoint_url)
            self.url = f"s3://{BUCKET}/hostile/{tmp_path.name}/{case}"

    def put(self, name: str, data: bytes) -> None:
        """`name` relative to the URL's directory, `..` included (where a hostile name points)."""
        if self.kind == "file":
            path = Path(os.path.normpath(f"{self.root}/{name}"))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        else:  # S3 keys are names: `..` stays in them
            self.fs.pipe_file(f"{self.url[5:]}/{name}", data)

    def args(self) -> list[str]:
        extra = [f'--data.storage_options={{"endpoint_url": "{self.endpoint}"}}'] if self.kind == "s3" else []
        return [f"--data.shards_url={self.url}", *extra]


def config(tmp_path: Path, server: Server, *extra: str) -> ExperimentConfig:
    return load_config(None, [f"--run_dir={tmp_path / 'run'}", f"--corpus.train={tmp_path / 'none.txt'}",
                              f"--tokenizer.vocab_size={VOCAB}", "--data.seq_len=8", "--data.fetch_threads=1",
                              f"--data.cache_dir={tmp_path / 'cache'}", *server.args(), *extra])


def tree(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


@pytest.fixture(params=["file", "s3"])
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def s3(kind: str, request: pytest.FixtureRequest) -> str | None:
    return request.getfixturevalue("endpoint") if kind == "s3" else None


# ---------------------------------------------------------------------------------------------------------------
# Hostile manifests at a URL


def _dotdot(meta: dict, src: Path, server: Server) -> tuple[bytes, str]:
    # consistent with its record (26 bytes: 13 uint16 ids), so that only its name is wrong; the sha256 that would
    # "verify" it comes from the same manifest
    evil = b"#!/bin/sh\necho owned\n".ljust(26, b"#")
    meta["splits"]["train"]["tokens"] = "../../evil.sh"
    meta["files"]["../../evil.sh"] = entry(evil)
    del meta["files"]["train.tokens.bin"]
    server.put("../../evil.sh", evil)
    return dump(meta), "splits.train.tokens: '../../evil.sh' is not a file name of this format"


def _absolute(meta: dict, src: Path, server: Server) -> tuple[bytes, str]:
    target = str(src.parent / "abs" / "evil.sh")
    evil = b"#!/bin/sh\necho owned\n".ljust(32, b"#")  # the 4 offsets of 3 blocks
    meta["splits"]["train"]["offsets"] = target
    meta["files"][target] = entry(evil)
    del meta["files"]["train.offsets.bin"]
    server.put(target, evil)  # where `{url}/{name}` points
    return dump(meta), f"splits.train.offsets: {target!r} is not a file name of this format"


def _tokenizer(meta: dict, src: Path, server: Server) -> tuple[bytes, str]:
    evil, tok = b"#!/bin/sh\necho owned\n", b'{"model": {}}'
    meta["files"]["tokenizer/tokenizer.json"] = entry(tok)
    meta["tokenizer_sha256"] = entry(tok)["sha256"]
    meta["files"]["tokenizer/../../x.sh"] = entry(evil)
    server.put("tokenizer/tokenizer.json", tok)
    server.put("tokenizer/../../x.sh", evil)
    return dump(meta), "files['tokenizer/../../x.sh']: not a shard file or tokenizer/<file> of this format"


def _dtype(name: str):
    def case(meta: dict, src: Path, server: Server) -> tuple[bytes, str]:
        # the tokens file as that dtype would have it, its size and sha256 in the table: only the dtype is wrong
        data = np.array([t for b in BLOCKS for t in b]).astype(np.dtype(name)).tobytes()
        meta["dtype"] = meta["splits"]["train"]["dtype"] = name
        meta["files"]["train.tokens.bin"] = entry(data)
        server.put("train.tokens.bin", data)
        return dump(meta), f"dtype: '{name}'; the ids of a vocabulary of 300 are stored as 'uint16'"
    return case


def _ids(stated: int | None):
    """Token ids beyond the vocabulary in a file whose size and sha256 the table gives correctly; the record
    states no max_token_id, a false one, or the true one."""
    def case(meta: dict, src: Path, server: Server) -> tuple[bytes, str]:
        record = shard_files(src, [[0, 5, 2], [0, 5000, 2]])
        if stated is None:
            del record["max_token_id"]
        else:
            record["max_token_id"] = stated
        meta = manifest(src, record)
        for name in ("train.tokens.bin", "train.offsets.bin"):
            server.put(name, (src / name).read_bytes())
        if stated == 5000:
            return dump(meta), "splits.train.max_token_id: token id 5000 is not below vocab_size 300"
        return dump(meta), "/train.tokens.bin: token id 5000 is not below the vocab_size 300 of its meta.json"
    return case


def _vocab(meta: dict, src: Path, server: Server) -> tuple[bytes, str]:
    meta["vocab_size"] = 10**12  # would size the embedding
    return dump(meta), "vocab_size: 1000000000000 is not an integer in [1, 16777216]"


def _deep(meta: dict, src: Path, server: Server) -> tuple[bytes, str]:
    return b'{"a": ' * 1000 + b"1" + b"}" * 1000, "meta.json: nested 1000 deep, more than a meta.json may be (16)"


def _large(meta: dict, src: Path, server: Server) -> tuple[bytes, str]:
    meta["padding"] = "x" * (9 << 20)
    raw = dump(meta)
    return raw, f"meta.json: {MAX_META_BYTES + 1} bytes, more than a meta.json may have"


CASES = {"dotdot": _dotdot, "absolute": _absolute, "tokenizer": _tokenizer, "dtype-O": _dtype("O"),
         "dtype-float64": _dtype("float64"), "ids-unstated": _ids(None), "ids-false": _ids(10),
         "ids-stated": _ids(5000), "vocab": _vocab, "deep": _deep, "large": _large}


@pytest.mark.parametrize("case", CASES)
def test_a_hostile_manifest_is_one_line_and_writes_nothing_outside_the_cache(case: str, kind: str, s3, tmp_path):
    src = tmp_path / "src"
    record = shard_files(src)
    meta = manifest(src, record)
    server = Server(kind, tmp_path, s3, case)
    for name in ("train.tokens.bin", "train.offsets.bin"):
        server.put(name, (src / name).read_bytes())
    raw, expected = CASES[case](copy.deepcopy(meta), src, server)
    server.put(META, raw)
    cfg = config(tmp_path, server)
    before = tree(tmp_path)
    with pytest.raises(ShardError) as info:
        fetch_shards(cfg, log=lambda *_: None)
    message = str(info.value)
    assert "\n" not in message and message.startswith(server.url) and expected in message, message
    cache = cache_path(cfg)
    new = tree(tmp_path) - before
    assert all(p.is_relative_to(tmp_path / "cache") for p in new), sorted(new)  # nothing written outside the cache
    assert not (cache / META).exists() and not list(cache.glob("*.tmp*"))  # no cache a reader would open
    assert not (tmp_path / "run" / "tokenizer").exists()
    assert not (cache / "train.tokens.bin").exists() or case not in ("ids-unstated", "ids-false")


def test_a_server_sending_more_than_the_table_says_is_cut_off(kind: str, s3, tmp_path, monkeypatch):
    src = tmp_path / "src"
    meta = manifest(src, shard_files(src))
    server = Server(kind, tmp_path, s3, "oversized")
    size = meta["files"]["train.tokens.bin"]["bytes"]
    server.put("train.tokens.bin", (src / "train.tokens.bin").read_bytes() + bytes(8 << 20))  # 8 MB more
    server.put("train.offsets.bin", (src / "train.offsets.bin").read_bytes())
    server.put(META, dump(meta))
    written: dict[str, int] = {}
    real = os.write

    def counting(fd: int, data: Any) -> int:
        n = real(fd, data)
        target = os.readlink(f"/proc/self/fd/{fd}")
        if "train.tokens.bin" in target:
            written[target] = written.get(target, 0) + n
        return n

    monkeypatch.setattr(os, "write", counting)
    with pytest.raises(ShardError) as info:
        fetch_shards(config(tmp_path, server), log=lambda *_: None)
    message = str(info.value)
    assert message.startswith(f"{server.url}/train.tokens.bin: more than the {size} bytes its meta.json says")
    read = int(message.rpartition("stopped after reading ")[2].partition(")")[0])
    assert size < read <= size + fetch.CHUNK  # one read past the size, not the 8 MB
    assert sum(written.values()) <= size  # the disk never held more than the manifest says
    assert not list(tmp_path.rglob("train.tokens.bin.tmp*")) and not list(tmp_path.rglob("cache/*/train.tokens*"))


# ---------------------------------------------------------------------------------------------------------------
# Verification a user can trust


def serve_good(tmp_path: Path, kind: str, s3: str | None, case: str, table: bool = True) -> tuple[Server, bytes]:
    src = tmp_path / "src"
    meta = manifest(src, shard_files(src), table=table)
    server = Server(kind, tmp_path, s3, case)
    for name in ("train.tokens.bin", "train.offsets.bin"):
        server.put(name, (src / name).read_bytes())
    raw = dump(meta)
    server.put(META, raw)
    return server, raw


def test_the_pin_accepts_its_manifest_and_refuses_another(kind: str, s3, tmp_path) -> None:
    server, raw = serve_good(tmp_path, kind, s3, "pinned")
    pin = hashlib.sha256(raw).hexdigest()
    got = fetch_shards(config(tmp_path, server, f"--data.shards_sha256={pin.upper()}"), log=lambda *_: None)
    assert got.read_bytes() == raw and open_split(got, "train").block(2).tolist() == BLOCKS[2]
    # the bucket's manifest changes (a new upload, or a hostile one): refused before anything is downloaded
    server.put(META, raw.replace(b'"documents": 1', b'"documents": 2'))
    other = tmp_path / "other"
    with pytest.raises(ShardError) as info:
        fetch_shards(config(other, server, f"--data.shards_sha256={pin}"), log=lambda *_: None)
    assert str(info.value).startswith(f"{server.url}/meta.json: its sha256 is ")
    assert f"data.shards_sha256 pins {pin}: these are not the shards you pinned" in str(info.value)
    assert not (other / "cache").exists() or not list((other / "cache").rglob("*.bin"))
    with pytest.raises(ConfigError, match=r"data.shards_sha256='abc' must be a sha256: 64 hex digits"):
        config(tmp_path, server, "--data.shards_sha256=abc")


def test_a_cached_file_altered_in_place_is_hashed_again_and_downloaded_again(tmp_path, monkeypatch) -> None:
    server, raw = serve_good(tmp_path, "file", None, "altered")
    cfg = config(tmp_path, server)
    lines: list[str] = []
    meta = fetch_shards(cfg, lines.append)
    assert "downloading 2 of 2 files" in lines[-1]
    # a second start hashes nothing: the stored sha256 of each file holds while its size, mtime and inode do
    hashed: list[Path] = []
    real = fetch.sha256_file
    monkeypatch.setattr(fetch, "sha256_file", lambda p: hashed.append(p) or real(p))
    assert fetch_shards(cfg, lines.append) == meta and "holds the shards" in lines[-1] and hashed == []
    # the same size, other bytes, meta.json still there: once this was taken as whole
    tokens = meta.parent / "train.tokens.bin"
    good = tokens.read_bytes()
    with open(tokens, "r+b") as f:
        f.write(b"\xff\xff")
    assert tokens.stat().st_size == len(good)
    fetch_shards(cfg, lines.append)
    assert "downloading 1 of 2 files" in lines[-1] and tokens.read_bytes() == good
    assert hashed == [tokens]  # only the file that changed


def test_a_manifest_without_files_table_says_so_once(kind: str, s3, tmp_path) -> None:
    server, raw = serve_good(tmp_path, kind, s3, "no-table", table=False)
    lines: list[str] = []
    meta = fetch_shards(config(tmp_path, server), lines.append)
    said = [s for s in lines if "files table" in s]
    assert said == [f"data: {server.url}/meta.json has no files table: its files are checked by their sizes only, "
                    "not by sha256 (upload them with `python -m data_prep upload` for checksums)"]
    assert open_split(meta, "train").num_blocks == 3
    # a pin cannot vouch for files the manifest has no checksums of
    pin = hashlib.sha256(raw).hexdigest()
    with pytest.raises(ShardError, match="has no files table, so data.shards_sha256 cannot vouch for its files"):
        fetch_shards(config(tmp_path / "pinned", server, f"--data.shards_sha256={pin}"), log=lambda *_: None)


def test_credentials_in_the_url_are_never_printed(endpoint, tmp_path) -> None:  # noqa: F811
    secret = "s3cr3tV4lue"
    for url in (f"s3://AKIAEXAMPLE:{secret}@{BUCKET}/secret", f"file://{tmp_path}/none?token={secret}"):
        server = Server("file", tmp_path, None, "secret")
        server.url, server.kind, server.endpoint = url, "s3" if url.startswith("s3") else "file", endpoint
        lines: list[str] = []
        with pytest.raises(ShardError) as info:
            fetch_shards(config(tmp_path, server), lines.append)
        # the backend's own text names the bucket "AKIAEXAMPLE:s3cr3tV4lue@shards": scrubbed too
        assert secret not in str(info.value) and "REDACTED" in str(info.value) and "cannot read it" in str(info.value)
        assert not any(secret in s for s in lines)


# ---------------------------------------------------------------------------------------------------------------
# Local shards: the same validation before anything is opened


def local(tmp_path: Path, change) -> Path:
    meta = manifest(tmp_path, shard_files(tmp_path), table=False)
    change(meta)
    (tmp_path / META).write_text(json.dumps(meta))
    return tmp_path / META


@pytest.mark.parametrize("change, problem", [
    (lambda m: m["splits"]["train"].update(tokens="../train.tokens.bin"), "splits.train.tokens: '../train.tokens"),
    (lambda m: m["splits"]["train"].update(offsets="/etc/passwd"), "splits.train.offsets: '/etc/passwd' is not"),
    (lambda m: m["splits"]["train"].update(tokens="valid.tokens.bin"), "splits.train.tokens: 'valid.tokens.bin'"),
    (lambda m: m.update(dtype="O"), "dtype: 'O'; the ids of a vocabulary of 300 are stored as 'uint16'"),
    (lambda m: m.update(dtype="uint32"), "dtype: 'uint32'; the ids of a vocabulary of 300"),
    (lambda m: m["splits"]["train"].update(max_token_id=300), "splits.train.max_token_id: token id 300 is not"),
    (lambda m: m["splits"]["train"].update(num_blocks=-1), "splits.train.num_blocks: -1 is not an integer"),
    (lambda m: m["special_ids"].update(mask=300), "special_ids.mask: 300 is not an integer in [0, 299]"),
    (lambda m: m.update(seq_len=True), "seq_len: True is not an integer"),
    (lambda m: m.update(short={"seq_len": 4, "meta": "/etc/meta.json"}), "short: {'seq_len': 4, 'meta': '/etc"),
    (lambda m: m.update(short={"seq_len": 4, "meta": "../../x/meta.json"}), "short: {'seq_len': 4, 'meta': '../.."),
], ids=["dotdot", "absolute", "other-split", "dtype-O", "dtype-wrong", "ids", "count", "special", "bool",
        "short-absolute", "short-dotdot"])
def test_local_shards_are_validated_before_anything_is_opened(tmp_path: Path, change, problem: str) -> None:
    path = local(tmp_path, change)
    for call in (read_meta, lambda p: open_split(p, "train"), short_phase):
        with pytest.raises(ShardError) as info:
            call(path)
        assert str(info.value).startswith(f"{path}: ") and problem in str(info.value) and "\n" not in str(info.value)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="./\\-_0123456789abcdefghijklmnopqrstuvwxyz~ ", max_size=40),
       st.sampled_from(["tokens", "offsets"]))
@example("train.tokens.bin", "tokens")
@example("train-00001-of-00002.offsets.bin", "offsets")
@example("../train.tokens.bin", "tokens")
@example("/train.tokens.bin", "tokens")
@example("train.tokens.bin/../../x", "tokens")
def test_a_name_is_accepted_only_when_the_writer_could_have_written_it(name: str, kind: str) -> None:
    # the law: validate_meta accepts a record's file name only when it is the writer's name for that split and
    # kind, so it is a plain file name inside the directory
    meta = manifest(Path("/nonexistent"), {"tokens": "train.tokens.bin", "offsets": "train.offsets.bin",
                                           "dtype": "uint16", "num_blocks": 3, "num_tokens": 13}, table=False)
    meta["splits"]["train"][kind] = name
    try:
        validate_meta(meta, "meta.json")
    except ShardError as e:
        # the name itself, or (a writer's name of another slice) the record's mixed stems
        assert str(e).startswith((f"meta.json: splits.train.{kind}: ", "meta.json: splits.train: its files have "
                                  "different stems")) and "\n" not in str(e)
        return
    assert re.fullmatch(rf"train(-\d{{5}}-of-\d{{5}})?\.{kind}\.bin", name)
    assert os.path.dirname(name) == "" and os.path.normpath(name) == name


def test_a_deep_or_huge_local_meta_json_is_one_line(tmp_path: Path) -> None:
    (tmp_path / META).write_bytes(b"[" * 100_000 + b"]" * 100_000)  # json.loads: RecursionError
    with pytest.raises(ShardError, match=r"meta.json: nested 100000 deep, more than a meta.json may be \(16\)"):
        read_meta(tmp_path)
    (tmp_path / META).write_bytes(b" " * (9 << 20))
    with pytest.raises(ShardError, match=r"meta.json: 9437184 bytes, more than a meta.json may have"):
        read_meta(tmp_path)


def test_a_file_shorter_than_its_record_is_refused_before_mapping(tmp_path: Path) -> None:
    path = local(tmp_path, lambda m: None)
    assert open_split(path, "train").block(2).tolist() == BLOCKS[2]
    with open(tmp_path / "train.tokens.bin", "r+b") as f:
        f.truncate(4)
    with pytest.raises(ShardError, match=r"train.tokens.bin: 4 bytes, its record says 26: run `make data` again"):
        open_split(path, "train")


def test_a_slice_with_a_hostile_name_is_refused(tmp_path: Path) -> None:
    good = shard_files(tmp_path, BLOCKS, shards.stem("train", 0, 2))
    hostile = {**shard_files(tmp_path, BLOCKS, shards.stem("train", 1, 2)), "tokens": "../../evil.bin"}
    for k, record in enumerate((good, hostile)):
        write_json_atomic(tmp_path / shards.meta_name(k, 2), {**manifest(tmp_path, record, table=False),
                                                             "shard_index": k, "num_shards": 2})
    with pytest.raises(ShardError, match=r"meta-00001-of-00002.json: splits.train.tokens: '../../evil.bin' is not"):
        read_meta(tmp_path)


def test_the_writer_records_the_largest_id(tmp_path: Path) -> None:
    assert shard_files(tmp_path)["max_token_id"] == 299
    assert shard_files(tmp_path / "empty", [])["max_token_id"] == -1


# ---------------------------------------------------------------------------------------------------------------
# Temporaries


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_a_planted_symlink_at_a_temporary_name_is_never_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("precious")
    data = tmp_path / "data"
    data.mkdir()
    # the name the writer once used, predictable from the pid
    (data / f"{META}.tmp{os.getpid()}").symlink_to(outside)
    write_json_atomic(data / META, {"a": 1})
    assert outside.read_text() == "precious" and json.loads((data / META).read_text()) == {"a": 1}


def test_only_provably_stale_temporaries_are_removed(tmp_path: Path) -> None:
    host, live, gone = tempfiles._host(), os.getppid(), dead_pid()
    names = {"other-host": f"train.tokens.bin.tmp-elsewhere-{gone}-abcd1234",  # NFS: another node's download
             "live": f"train.tokens.bin.tmp-{host}-{live}-abcd1234",
             "dead": f"train.tokens.bin.tmp-{host}-{gone}-abcd1234",
             "legacy-dead": f"train.offsets.bin.tmp{gone}"}
    for name in names.values():
        (tmp_path / name).write_bytes(b"x")
    shard_files(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.tmp*")) == sorted([names["other-host"], names["live"]])


def test_a_fetch_removes_only_stale_temporaries_of_its_host(tmp_path: Path) -> None:
    server, _ = serve_good(tmp_path, "file", None, "temporaries")
    cfg = config(tmp_path, server)
    cache = cache_path(cfg)
    cache.mkdir(parents=True)
    host, gone = tempfiles._host(), dead_pid()
    keep = [f"train.tokens.bin.tmp-elsewhere-{gone}-abcd1234", f"train.tokens.bin.tmp-{host}-{os.getppid()}-ab12"]
    for name in [*keep, f"train.tokens.bin.tmp-{host}-{gone}-abcd1234", f"valid.tokens.bin.tmp{gone}"]:
        (cache / name).write_bytes(b"half")
    fetch_shards(cfg, log=lambda *_: None)
    assert sorted(p.name for p in cache.glob("*.tmp*")) == sorted(keep)
