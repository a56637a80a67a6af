"""The on-disk format of packed shards: flat binaries any numpy can read, described by `meta.json`.

This module is the only way `pretrain` reads shards:

    split = open_split("runs/x/data/<hash>/meta.json", "train")   # or the data directory itself
    split.num_blocks, split.num_tokens, split.seq_len, split.special_ids
    split.block(i)          # np.ndarray of the block's ids, <s> ... </s>, unpadded (a view of a memmap)
    split.block_lengths()   # (num_blocks,) int64: to batch short DOC-SENTENCES blocks by tokens
    split.nsp_labels        # (num_blocks,) uint8 for the pair packings (0: B follows A, 1: random B), else None
    split.b_start(i)        # pair packings: where B starts in block i (for token types), else None
    short_phase(meta_path)  # BERT's length schedule: (seq_len, meta.json) of the short shards, or None

Shards at a URL (`data.shards_url`) are first fetched into a local cache by `remote.py`, then read from there.

Layout of a data directory, per split (`train`, `valid`) and per slice (one when `data.num_shards` is 1):

    {split}.tokens.bin      the blocks back to back, no padding, uint16 while the vocabulary fits (half the
                            bytes of int32, and 65,536 ids cover RoBERTa's 50,265), else uint32
    {split}.offsets.bin     int64, num_blocks + 1 start positions: block i is tokens[offsets[i]:offsets[i+1]]
    {split}.nsp.bin         uint8 NSP label per block (pair packings only)
    {split}.bstart.bin      int32 position of B's first token per block (pair packings only)
    {split}.json            the split's record: file names and counts; written last, it marks the split complete
    meta.json               everything above for all splits, plus vocabulary, special ids, settings

With `data.num_shards` = N > 1, slice k writes the same files with the stem `{split}-0000k-of-0000N` and its
metadata as `meta-0000k-of-0000N.json`; the slice that completes the set writes `meta.json`, whose splits list
the slices as `parts` (a reader also finds the parts itself when `meta.json` is missing). No merging: a split
is read across its parts as one sequence of blocks.

Crash safety: every file is written under a temporary name, flushed to disk and renamed when complete; the
split record, then `meta.json`, are written atomically after the files they describe, so a file is trusted
only when a record names it and its size matches the record. A temporary is `{name}.tmp-{host}-{pid}-{random}`,
created with O_EXCL (never an existing file or a planted symlink); cleanup removes only temporaries that provably
belong to no running process (this host's name, a pid that is gone), so processes on other hosts sharing the
directory over NFS never lose each other's files.

A meta.json is data, never a path to follow (`parse_meta`, `validate_meta`: the one place that checks it, used by
`read_meta`, `combine_parts` and remote.py): before anything is opened, its size and nesting are bounded, every
file name must be one the writer produces (`{stem}.{tokens,offsets,nsp,bstart}.bin`, stem `train`, `valid` or
`train-00000-of-00004`; `tokenizer/<file>` in a files table; `../<hash>/meta.json` for the short shards), and every
field the reader uses is checked: dtype (the one `token_dtype` gives the vocabulary), vocab_size, seq_len,
special ids below the vocabulary, non-negative counts, and `max_token_id` (the largest id the writer wrote, in
each split record) below vocab_size. The reader also checks each file's size against its record before mapping it.
"""

from __future__ import annotations

import glob
import json
import os
import re
import socket
import tempfile
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from .config import Packing
from .sources import add_counts, mixture

FORMAT = 1
META = "meta.json"
SPLITS = ("train", "valid")
KINDS = ("tokens", "offsets", "nsp", "bstart")
SHARD_FILE = re.compile(r"(train|valid)(-\d{5}-of-\d{5})?\.(tokens|offsets|nsp|bstart)\.bin")
"""Every shard file name the writer produces, and so the only ones a meta.json may name."""
SHORT_META = re.compile(r"\.\./[0-9a-f]{16}/meta\.json")
"""The short shards' meta.json, relative to the long shards' directory (a sibling hashed directory)."""
SHA256 = re.compile(r"[0-9a-f]{64}")
MAX_META_BYTES = 8 << 20  # a meta.json of 10,000 slices with 20 sources each is about 5 MB
MAX_DEPTH = 16  # meta.json nests 7 deep (meta, splits, split, parts, part, sources, source)
MAX_VOCAB = 1 << 24  # 330 times RoBERTa's 50,265: the embedding is vocab_size x hidden, allocated from this
MAX_SEQ_LEN = 1 << 20
MAX_COUNT = 1 << 50  # tokens, blocks or bytes of one file: a petabyte
MAX_TOKENIZER_BYTES = 1 << 30  # a tokenizer file (RoBERTa's tokenizer.json: 2 MB)


class ShardError(ValueError):
    """Missing, incomplete or inconsistent shards: the message names the file."""


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def stem(split: str, shard_index: int = 0, num_shards: int = 1) -> str:
    return split if num_shards == 1 else f"{split}-{shard_index:05d}-of-{num_shards:05d}"


def meta_name(shard_index: int = 0, num_shards: int = 1) -> str:
    return META if num_shards == 1 else f"meta-{shard_index:05d}-of-{num_shards:05d}.json"


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    fd, tmp = temporary(path)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(data, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------------
# Temporaries: unique, never through a symlink, removed only by their owner or when provably stale


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "_"


_TMP = re.compile(r"(?P<final>.+)\.tmp-(?P<host>[A-Za-z0-9._]+)-(?P<pid>\d+)-[A-Za-z0-9_]+")
_LEGACY_TMP = re.compile(r"(?P<final>.+)\.tmp(?P<pid>\d+)")  # `{name}.tmp{pid}`, written before host names


def temporary(path: Path) -> tuple[int, Path]:
    """(open fd, path) of a new temporary beside `path`, for writing it and renaming it to `path`. mkstemp
    creates it with O_EXCL (and O_NOFOLLOW), so a file or symlink planted under the name is never written
    through; the name carries host and pid, for `remove_temporaries`. Readable by all like any other output."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f"{path.name}.tmp-{_host()}-{os.getpid()}-")
    os.fchmod(fd, 0o644)
    return fd, Path(name)


def _alive(pid: int) -> bool:
    if pid <= 0 or pid == os.getpid():
        return True  # os.kill(0) would mean the process group; our own temporaries are removed by their writer
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OverflowError:
        return False  # no such pid can exist
    except PermissionError:
        return True  # another user's process
    return True


def stale_temporary(name: str) -> bool:
    """Whether `name` is a temporary of a process that is gone: made on this host by a pid not running. Another
    host's (a directory shared over NFS), or a live process's, are not."""
    m = _TMP.fullmatch(name)
    if m is not None and m["host"] != _host():
        return False
    m = m or _LEGACY_TMP.fullmatch(name)
    return m is not None and not _alive(int(m["pid"]))


# ---------------------------------------------------------------------------------------------------------------
# Writing


class ShardWriter:
    """Writes one split (of one slice) in chunks; `commit` renames the files into place and writes the record.

    Use as a context manager: an exception (or a kill) before `commit` leaves only temporaries, which no reader
    trusts and the next run on this host removes (`remove_temporaries`).
    """

    def __init__(self, directory: str | Path, name: str, dtype: np.dtype, pairs: bool = False):
        self.directory, self.name, self.dtype = Path(directory), name, np.dtype(dtype)
        self.directory.mkdir(parents=True, exist_ok=True)
        remove_temporaries(self.directory, name)
        kinds = ["tokens", "offsets"] + (["nsp", "bstart"] if pairs else [])
        self.files = {k: f"{name}.{k}.bin" for k in kinds}
        self._tmp: dict[str, Path] = {}
        self._fh = {}
        for k, f in self.files.items():
            fd, self._tmp[k] = temporary(self.directory / f)
            self._fh[k] = os.fdopen(fd, "wb")
        self.num_blocks = 0
        self.num_tokens = 0
        self.max_token_id = -1  # recorded, so that a reader refuses ids beyond the vocabulary without a scan
        self._fh["offsets"].write(np.zeros(1, np.int64).tobytes())

    def write(self, tokens: np.ndarray, lengths: np.ndarray, nsp: np.ndarray | None = None,
              b_start: np.ndarray | None = None) -> None:
        assert int(lengths.sum()) == len(tokens), f"{self.name}: block lengths do not add up to the tokens"
        assert (nsp is not None) == ("nsp" in self._fh), f"{self.name}: NSP labels given for a non-pair split"
        self._fh["tokens"].write(np.ascontiguousarray(tokens, self.dtype).tobytes())
        if len(tokens):
            self.max_token_id = max(self.max_token_id, int(np.max(tokens)))
        self._fh["offsets"].write((self.num_tokens + np.cumsum(lengths, dtype=np.int64)).tobytes())
        if nsp is not None:
            self._fh["nsp"].write(np.asarray(nsp, np.uint8).tobytes())
            self._fh["bstart"].write(np.asarray(b_start, np.int32).tobytes())
        self.num_blocks += len(lengths)
        self.num_tokens += len(tokens)

    def commit(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Flush, rename into place, then write `{name}.json`; returns that record."""
        for fh in self._fh.values():
            fh.flush()
            os.fsync(fh.fileno())
            fh.close()
        for k, tmp in self._tmp.items():
            os.replace(tmp, self.directory / self.files[k])
        record = {**self.files, "dtype": self.dtype.name, "num_blocks": self.num_blocks,
                  "num_tokens": self.num_tokens, "max_token_id": self.max_token_id, **(extra or {})}
        write_json_atomic(self.directory / f"{self.name}.json", record)
        return record

    def abort(self) -> None:
        for fh in self._fh.values():
            fh.close()
        for tmp in self._tmp.values():
            tmp.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def remove_temporaries(directory: Path, name: str) -> None:
    """Leftovers of killed runs for this split and slice: only those `stale_temporary` proves stale."""
    for p in directory.glob(f"{glob.escape(name)}.*.tmp*"):
        if stale_temporary(p.name):
            p.unlink(missing_ok=True)


def file_sizes(record: dict[str, Any]) -> dict[str, int]:
    """The files of a split's (or slice's) record, name -> the size in bytes its counts imply."""
    itemsize = np.dtype(record["dtype"]).itemsize
    sizes = {"tokens": record["num_tokens"] * itemsize, "offsets": (record["num_blocks"] + 1) * 8,
             "nsp": record["num_blocks"], "bstart": record["num_blocks"] * 4}
    return {record[kind]: size for kind, size in sizes.items() if kind in record}


def load_record(directory: str | Path, name: str) -> dict[str, Any] | None:
    """The record of a complete split, or None when it is missing or its files do not match it."""
    directory = Path(directory)
    path = directory / f"{name}.json"
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        for name, size in file_sizes(record).items():
            if (directory / name).stat().st_size != size:
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return record


# ---------------------------------------------------------------------------------------------------------------
# Validation: a meta.json is data, checked before anything it names is opened

REMAKE = "run `make data` again"


def _show(value: Any) -> str:
    """A value from outside in a message: its repr, cut short (a hostile name may be megabytes long)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def json_depth(raw: bytes) -> int:
    """How deep arrays and objects nest in `raw` (strings skipped), without parsing it: json.loads recurses."""
    text = re.sub(rb'"(?:[^"\\]|\\.)*"', b"", raw, flags=re.DOTALL)
    b = np.frombuffer(text, np.uint8)
    step = np.isin(b, np.frombuffer(b"[{", np.uint8)).astype(np.int64) - np.isin(b, np.frombuffer(b"]}", np.uint8))
    return int(np.cumsum(step).max(initial=0))


def parse_meta(raw: bytes, where: str, fix: str = REMAKE) -> dict[str, Any]:
    """The validated content of a meta.json's bytes (`validate_meta`); one ShardError line naming `where` if it is
    too large, nested too deep, not JSON or not a valid meta.json."""
    if len(raw) > MAX_META_BYTES:
        raise ShardError(f"{where}: {len(raw)} bytes, more than a meta.json may have ({MAX_META_BYTES}); {fix}")
    if (depth := json_depth(raw)) > MAX_DEPTH:
        raise ShardError(f"{where}: nested {depth} deep, more than a meta.json may be ({MAX_DEPTH}); {fix}")
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise ShardError(f"{where}: not valid JSON ({e}); {fix}") from None
    return validate_meta(meta, where, fix)


def read_bounded(path: Path) -> bytes:
    """A local meta.json's bytes, refused by its size before it is read."""
    if path.stat().st_size > MAX_META_BYTES:
        raise ShardError(f"{path}: {path.stat().st_size} bytes, more than a meta.json may have ({MAX_META_BYTES}); "
                         f"{REMAKE}")
    return path.read_bytes()


def validate_meta(meta: Any, where: str, fix: str = REMAKE) -> dict[str, Any]:
    """`meta` itself, once every field the readers use is what the format allows; else one ShardError line naming
    `where` and the entry. File names are checked as names (`SHARD_FILE`, `tokenizer/<file>`, `SHORT_META`), so no
    meta.json can point outside its directory; numbers are bounded before they size anything."""

    def bad(entry: str, problem: str) -> NoReturn:
        raise ShardError(f"{where}: {entry}: {problem}; {fix}")

    def integer(value: Any, entry: str, lo: int, hi: int) -> int:
        if type(value) is not int or not lo <= value <= hi:  # not bool, not float
            bad(entry, f"{_show(value)} is not an integer in [{lo}, {hi}]")
        return value

    if not isinstance(meta, dict):
        raise ShardError(f"{where}: not a JSON object ({type(meta).__name__}); {fix}")
    if meta.get("format") != FORMAT:
        raise ShardError(f"{where}: shard format {_show(meta.get('format'))}, this code reads {FORMAT}; {fix}")
    vocab = integer(meta.get("vocab_size"), "vocab_size", 1, MAX_VOCAB)
    dtype = token_dtype(vocab).name
    if meta.get("dtype") != dtype:
        bad("dtype", f"{_show(meta.get('dtype'))}; the ids of a vocabulary of {vocab} are stored as {dtype!r}")
    seq_len = integer(meta.get("seq_len"), "seq_len", 8, MAX_SEQ_LEN)
    if meta.get("packing") not in typing.get_args(Packing):
        bad("packing", f"{_show(meta.get('packing'))} is not one of {', '.join(typing.get_args(Packing))}")
    ids = meta.get("special_ids")
    if not isinstance(ids, dict) or sorted(ids) != sorted(("bos", "pad", "eos", "unk", "mask")):
        bad("special_ids", f"{_show(ids)} is not an object of the ids of bos, pad, eos, unk and mask")
    for k, v in ids.items():
        integer(v, f"special_ids.{k}", 0, vocab - 1)
    for key in ("tokenizer_sha256",):
        if key in meta and not (isinstance(meta[key], str) and SHA256.fullmatch(meta[key])):
            bad(key, f"{_show(meta[key])} is not a sha256 (64 hex digits)")
    for key in ("shard_index", "num_shards"):
        if key in meta:
            integer(meta[key], key, 0, 99999)

    splits = meta.get("splits")
    if not isinstance(splits, dict) or not splits or not set(splits) <= set(SPLITS):
        bad("splits", f"{_show(splits)} is not an object of the splits {' and '.join(SPLITS)}")
    names: set[str] = set()
    for split, record in splits.items():
        entry = f"splits.{split}"
        if not isinstance(record, dict):
            bad(entry, "not a JSON object")
        parts = record.get("parts", [record])
        if not isinstance(parts, list) or not parts or len(parts) > 99999:
            bad(f"{entry}.parts", "not a list of 1 to 99999 slice records")
        integer(record.get("num_blocks"), f"{entry}.num_blocks", 0, MAX_COUNT)
        integer(record.get("num_tokens"), f"{entry}.num_tokens", 0, MAX_COUNT)
        for i, part in enumerate(parts):
            _check_part(part, split, f"{entry}.parts[{i}]" if "parts" in record else entry, dtype, vocab, names,
                        integer, bad)
    if "short" in meta:
        short = meta["short"]
        name = short.get("meta") if isinstance(short, dict) else None
        if not (isinstance(name, str) and SHORT_META.fullmatch(name)):
            bad("short", f"{_show(short)} does not name the short shards' meta.json as ../<16 hex digits>/meta.json")
        integer(short.get("seq_len"), "short.seq_len", 8, seq_len - 1)
    if "files" in meta:
        _check_table(meta["files"], names, integer, bad)
    return meta


def _check_part(part: Any, split: str, entry: str, dtype: str, vocab: int, names: set[str],
                integer: Callable[..., int], bad: Callable[[str, str], NoReturn]) -> None:
    """One slice's record: its file names, dtype and counts."""
    if not isinstance(part, dict) or "parts" in part:
        bad(entry, "not a slice record (a JSON object with the files and counts of one slice)")
    kinds = [k for k in KINDS if k in part]
    if kinds not in (["tokens", "offsets"], list(KINDS)):
        bad(entry, f"names the files {_show(kinds)}; a record names tokens and offsets (and nsp and bstart for "
                   "the pair packings)")
    stems = set()
    for kind in kinds:
        name = part[kind]
        m = SHARD_FILE.fullmatch(name) if isinstance(name, str) else None
        if m is None or m[1] != split or m[3] != kind:
            bad(f"{entry}.{kind}", f"{_show(name)} is not a file name of this format ({split}.{kind}.bin or "
                                   f"{split}-0000k-of-0000N.{kind}.bin)")
        if name in names:
            bad(f"{entry}.{kind}", f"{_show(name)} is named twice")
        names.add(name)
        stems.add(name.rsplit(".", 2)[0])
    if len(stems) != 1:
        bad(entry, f"its files have different stems ({', '.join(sorted(stems))})")
    if part.get("dtype") != dtype:
        bad(f"{entry}.dtype", f"{_show(part.get('dtype'))}, not the shards' {dtype!r}")
    blocks = integer(part.get("num_blocks"), f"{entry}.num_blocks", 0, MAX_COUNT)
    integer(part.get("num_tokens"), f"{entry}.num_tokens", 0, MAX_COUNT)
    if "max_token_id" in part:
        top = integer(part["max_token_id"], f"{entry}.max_token_id", -1, MAX_VOCAB)
        if top >= vocab:
            bad(f"{entry}.max_token_id", f"token id {top} is not below vocab_size {vocab} (shards of another "
                                         "tokenizer, or damaged)")
    if "source_blocks" in part:
        counts = part["source_blocks"]
        if not isinstance(counts, list) or len(counts) > 1 << 16:
            bad(f"{entry}.source_blocks", "not a list of block counts")
        if sum(integer(n, f"{entry}.source_blocks", 0, blocks) for n in counts) > blocks:
            bad(f"{entry}.source_blocks", f"count more than the record's {blocks} blocks")


def tokenizer_entry(name: str) -> bool:
    """Whether `name` is a tokenizer file of a files table: `tokenizer/` and one of `tokenizer.FILES`."""
    from .tokenizer import FILES

    folder, _, file = name.partition("/")
    return folder == "tokenizer" and file in FILES


def _check_table(table: Any, names: set[str], integer: Callable[..., int],
                 bad: Callable[[str, str], NoReturn]) -> None:
    """The files table `upload` writes: shard files and `tokenizer/<file>`, each with its bytes and sha256."""
    if not isinstance(table, dict):
        bad("files", "not a JSON object of file name -> {bytes, sha256}")
    for name, e in table.items():
        entry = f"files[{_show(name)}]"
        if not (SHARD_FILE.fullmatch(name) or tokenizer_entry(name)):
            bad(entry, "not a shard file or tokenizer/<file> of this format")
        if SHARD_FILE.fullmatch(name) and name not in names:
            bad(entry, "no split record names this file")
        if not isinstance(e, dict) or not (isinstance(e.get("sha256"), str) and SHA256.fullmatch(e["sha256"])):
            bad(entry, f"{_show(e)} is not {{bytes, sha256 (64 hex digits)}}")
        integer(e.get("bytes"), f"{entry}.bytes", 0, MAX_COUNT if SHARD_FILE.fullmatch(name) else MAX_TOKENIZER_BYTES)


def inside(directory: Path, name: str, where: str) -> Path:
    """`directory / name`, once it is certain to stay under `directory` (no absolute name, no `..`, no symlinked
    folder on the way out): the last check before a name from outside becomes a path."""
    path = directory / name
    if (os.path.isabs(name) or ".." in Path(name).parts
            or not path.parent.resolve().is_relative_to(directory.resolve())):
        raise ShardError(f"{where}: {_show(name)} is not a file name inside {directory}")
    return path


# ---------------------------------------------------------------------------------------------------------------
# Reading

_PART = re.compile(r"meta-(\d{5})-of-(\d{5})\.json")


def combine_parts(directory: str | Path) -> dict[str, Any] | None:
    """`meta.json` for a directory of slices, built from their `meta-*-of-*.json`; None while any is missing."""
    directory = Path(directory)
    found = {}
    for p in directory.glob("meta-*-of-*.json"):
        if m := _PART.fullmatch(p.name):
            found.setdefault(int(m.group(2)), {})[int(m.group(1))] = p
    if len(found) != 1:
        return None  # none, or slices of different layouts: nothing safe to combine
    (n, parts), = found.items()
    if sorted(parts) != list(range(n)):
        return None
    metas = [parse_meta(read_bounded(parts[i]), str(parts[i]),
                        f"delete it and run `make data` again with data.shard_index={i}") for i in range(n)]
    for i, m in enumerate(metas[1:], 1):  # slices copied together from machines that saw different inputs
        differ = [k for k in ("corpus_fingerprint", "tokenizer_sha256", "settings") if m.get(k) != metas[0].get(k)]
        if differ:
            raise ShardError(f"{parts[i]}: prepared from another {' and '.join(differ)} than {parts[0].name}; "
                             "prepare every slice from the same corpus files (same sizes and times) and tokenizer")
    if differ := [str(parts[i]) for i, m in enumerate(metas) if set(m["splits"]) != set(metas[0]["splits"])]:
        raise ShardError(f"{differ[0]}: other splits than {parts[0].name}; {REMAKE}")
    try:
        meta = _combine(metas)
    except (KeyError, TypeError, IndexError, ValueError) as e:  # counts of the slices that do not add up
        raise ShardError(f"{directory}: the slices' meta-*-of-*.json do not combine ({type(e).__name__}: {_show(e)}); "
                         f"{REMAKE}") from None
    return validate_meta(meta, f"{directory} (its meta-*-of-*.json combined)")


def _combine(metas: list[dict[str, Any]]) -> dict[str, Any]:
    meta = {k: v for k, v in metas[0].items() if k not in ("splits", "shard_index")}
    meta["splits"] = {}
    for split in metas[0]["splits"]:
        records = [m["splits"][split] for m in metas]
        total = {k: sum(r.get(k, 0) for r in records) for k in
                 ("num_blocks", "num_tokens", "documents", "sentences", "stream_tokens", "packed_tokens",
                  "copied_tokens")}
        slots = total["num_blocks"] * meta["seq_len"]
        total["padding_fraction"] = round(1 - total["num_tokens"] / slots, 6) if slots else 0.0
        meta["splits"][split] = {**total, "parts": records}
        if all("sources" in r for r in records):
            meta["splits"][split]["sources"] = add_counts([r["sources"] for r in records])
    if "sources" in meta and "sources" in meta["splits"]["train"]:  # the mixture of the whole corpus, not slice 0's
        entries = [{k: s[k] for k in ("name", "path", "weight")} for s in meta["sources"]]
        meta["sources"] = mixture(entries, meta["splits"]["train"]["sources"])
    return meta


def read_meta(path: str | Path) -> dict[str, Any]:
    """`meta.json` (or a data directory: its meta.json, else its combined slice parts)."""
    path = Path(path)
    if path.is_dir():
        if (path / META).is_file():
            path = path / META
        else:
            meta = combine_parts(path)
            if meta is None:
                raise ShardError(f"{path}: no {META} and no complete set of meta-*-of-*.json slices "
                                 "(run `make data`, once per slice)")
            return meta
    if not path.is_file():
        raise ShardError(f"{path} does not exist: run `make data` first")
    return parse_meta(read_bounded(path), str(path), "delete it and run `make data`")


def short_phase(meta_path: str | Path) -> tuple[int, Path] | None:
    """The short shards of BERT's length schedule that `meta_path`'s meta.json points to (`data.short_seq_len`,
    written by prepare.py) as (seq_len, path of their meta.json), or None when it points to none."""
    meta_path = Path(meta_path)
    short = read_meta(meta_path).get("short")
    if not short:
        return None
    directory = meta_path if meta_path.is_dir() else meta_path.parent
    # a sibling directory (`validate_meta` allowed only ../<hash>/meta.json): under the data root, never elsewhere
    path = inside(directory.absolute().parent, short["meta"].partition("/")[2], f"{meta_path}: short.meta")
    return int(short["seq_len"]), path


class ShardSplit:
    """One split of a data directory (all its slices), read through numpy memmaps opened on first use.

    Pickles without its memmaps (DataLoader workers reopen them), so it is cheap to send to workers.
    """

    def __init__(self, meta_path: str | Path, split: str):
        meta_path = Path(meta_path)
        self.meta = read_meta(meta_path)
        self.directory = meta_path if meta_path.is_dir() else meta_path.parent
        if split not in self.meta["splits"]:
            raise ShardError(f"{meta_path}: no split {split!r} (has: {', '.join(self.meta['splits'])})")
        self.split = split
        record = self.meta["splits"][split]
        self.parts: list[dict[str, Any]] = record.get("parts", [record])
        self.seq_len: int = self.meta["seq_len"]
        self.vocab_size: int = self.meta["vocab_size"]
        self.special_ids: dict[str, int] = self.meta["special_ids"]
        self.packing: str = self.meta["packing"]
        self.dtype = np.dtype(self.meta["dtype"])
        counts = [p["num_blocks"] for p in self.parts]
        self._first = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # first global block of each part
        self.num_blocks = int(self._first[-1])
        self.num_tokens = sum(p["num_tokens"] for p in self.parts)
        for p in self.parts:  # mapping a file shorter than its record would read past it
            for name, size in file_sizes(p).items():
                path = inside(self.directory, name, str(meta_path))
                if not path.is_file():
                    raise ShardError(f"{path} is missing: run `make data` again")
                if path.stat().st_size != size:
                    raise ShardError(f"{path}: {path.stat().st_size} bytes, its record says {size}: run `make data` "
                                     "again")
        self._maps: list[dict[str, np.ndarray]] | None = None
        self._nsp: np.ndarray | None = None

    def __len__(self) -> int:
        return self.num_blocks

    def _open(self) -> list[dict[str, np.ndarray]]:
        if self._maps is None:
            self._maps = []
            for p in self.parts:
                maps = {"offsets": np.memmap(self.directory / p["offsets"], np.int64, "r")}
                # numpy cannot map an empty file: a split (slice) without blocks reads as empty arrays
                maps["tokens"] = (np.memmap(self.directory / p["tokens"], self.dtype, "r") if p["num_tokens"]
                                  else np.zeros(0, self.dtype))
                for kind, dtype in (("nsp", np.uint8), ("bstart", np.int32)):
                    if kind in p:
                        maps[kind] = (np.memmap(self.directory / p[kind], dtype, "r") if p["num_blocks"]
                                      else np.zeros(0, dtype))
                self._maps.append(maps)
        return self._maps

    def _locate(self, i: int) -> tuple[dict[str, np.ndarray], int]:
        if not 0 <= i < self.num_blocks:
            raise IndexError(f"block {i} out of range for {self.num_blocks} blocks of {self.split}")
        part = int(np.searchsorted(self._first, i, "right")) - 1
        return self._open()[part], i - int(self._first[part])

    def block(self, i: int) -> np.ndarray:
        """Block i: its ids from <s> to </s>, unpadded (read-only view)."""
        maps, j = self._locate(i)
        return maps["tokens"][maps["offsets"][j] : maps["offsets"][j + 1]]

    __getitem__ = block

    def block_lengths(self) -> np.ndarray:
        return np.concatenate([np.diff(m["offsets"]) for m in self._open()]).astype(np.int64)

    @property
    def nsp_labels(self) -> np.ndarray | None:
        """(num_blocks,) uint8 NSP labels of the pair packings (0: B follows A, 1: B random), else None."""
        if "nsp" not in self.parts[0]:
            return None
        if self._nsp is None:
            maps = self._open()
            self._nsp = maps[0]["nsp"] if len(maps) == 1 else np.concatenate([m["nsp"] for m in maps])
        return self._nsp

    def b_start(self, i: int) -> int | None:
        """Pair packings: the position of B's first token in block i (after `</s></s>`); else None."""
        if "bstart" not in self.parts[0]:
            return None
        maps, j = self._locate(i)
        return int(maps["bstart"][j])

    def source_blocks(self) -> list[np.ndarray] | None:
        """Per train source, the indices of its blocks, when the split was packed source by source
        (`prepare.valid_by_source`: each slice's record counts its blocks per source, in source order); else None."""
        if not all("source_blocks" in p for p in self.parts):
            return None
        per_source: list[list[np.ndarray]] = [[] for _ in self.parts[0]["source_blocks"]]
        for first, p in zip(self._first.tolist(), self.parts, strict=False):
            for k, n in enumerate(p["source_blocks"]):
                per_source[k].append(np.arange(first, first + n, dtype=np.int64))
                first += n
        return [np.concatenate(blocks) for blocks in per_source]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": None, "_nsp": None}


ShardReader = ShardSplit


def open_split(meta_path: str | Path, split: str) -> ShardSplit:
    """Split `split` ("train" or "valid") of the shards that `meta_path` (meta.json or its directory) describes."""
    return ShardSplit(meta_path, split)
