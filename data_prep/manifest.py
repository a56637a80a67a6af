"""What a meta.json may say: a meta.json is data, never a path to follow.

`parse_meta` and `validate_meta` are the one place that checks it (used by `shards.read_meta`,
`shards.combine_parts` and `fetch.py`): before anything is opened, its size and nesting are bounded, every file name
must be one the writer produces (`{stem}.{tokens,offsets,nsp,bstart}.bin`, stem `train`, `valid` or
`train-00000-of-00004`; `tokenizer/<file>` in a files table; `../<hash>/meta.json` for the short shards), and every
field the reader uses is checked: dtype (the one `token_dtype` gives the vocabulary), vocab_size, seq_len, special
ids below the vocabulary, non-negative counts, and `max_token_id` (the largest id the writer wrote, in each split
record) below vocab_size. `inside` is the last check before a name from outside becomes a path.

Apart from shards.py (the format itself, its writer and reader) so that the rules for hostile input read on
their own; shards.py, remote.py and fetch.py import them, this module imports none of them. `ShardError` lives
here, at the bottom of the shard modules, and is raised by all of them.
"""

from __future__ import annotations

import json
import os
import re
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from .config import Packing

FORMAT = 1
SPLITS = ("train", "valid")
KINDS = ("tokens", "offsets", "nsp", "bstart")
SHARD_FILE = re.compile(r"(train|valid)(-\d{5}-of-\d{5})?\.(tokens|offsets|nsp|bstart)\.bin")
"""Every shard file name the writer produces, and so the only ones a meta.json may name."""
SHORT_META = re.compile(r"\.\./[0-9a-f]{16}/meta\.json")
"""The short shards' meta.json, relative to the long shards' directory (a sibling hashed directory)."""
SHA256 = re.compile(r"[0-9a-f]{64}")
ENCODERS = ("tiktoken", "tokenizers")
"""What a split record's `encoder` may say ran (data.encoder's choice; the shards are the same bytes either way)."""
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




REMAKE = "run `make data` again"


def show(value: Any) -> str:
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
            bad(entry, f"{show(value)} is not an integer in [{lo}, {hi}]")
        return value

    if not isinstance(meta, dict):
        raise ShardError(f"{where}: not a JSON object ({type(meta).__name__}); {fix}")
    if meta.get("format") != FORMAT:
        raise ShardError(f"{where}: shard format {show(meta.get('format'))}, this code reads {FORMAT}; {fix}")
    vocab = integer(meta.get("vocab_size"), "vocab_size", 1, MAX_VOCAB)
    dtype = token_dtype(vocab).name
    if meta.get("dtype") != dtype:
        bad("dtype", f"{show(meta.get('dtype'))}; the ids of a vocabulary of {vocab} are stored as {dtype!r}")
    seq_len = integer(meta.get("seq_len"), "seq_len", 8, MAX_SEQ_LEN)
    if meta.get("packing") not in typing.get_args(Packing):
        bad("packing", f"{show(meta.get('packing'))} is not one of {', '.join(typing.get_args(Packing))}")
    ids = meta.get("special_ids")
    if not isinstance(ids, dict) or sorted(ids) != sorted(("bos", "pad", "eos", "unk", "mask")):
        bad("special_ids", f"{show(ids)} is not an object of the ids of bos, pad, eos, unk and mask")
    for k, v in ids.items():
        integer(v, f"special_ids.{k}", 0, vocab - 1)
    for key in ("tokenizer_sha256",):
        if key in meta and not (isinstance(meta[key], str) and SHA256.fullmatch(meta[key])):
            bad(key, f"{show(meta[key])} is not a sha256 (64 hex digits)")
    for key in ("shard_index", "num_shards"):
        if key in meta:
            integer(meta[key], key, 0, 99999)

    splits = meta.get("splits")
    if not isinstance(splits, dict) or not splits or not set(splits) <= set(SPLITS):
        bad("splits", f"{show(splits)} is not an object of the splits {' and '.join(SPLITS)}")
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
            bad("short", f"{show(short)} does not name the short shards' meta.json as ../<16 hex digits>/meta.json")
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
        bad(entry, f"names the files {show(kinds)}; a record names tokens and offsets (and nsp and bstart for "
                   "the pair packings)")
    stems = set()
    for kind in kinds:
        name = part[kind]
        m = SHARD_FILE.fullmatch(name) if isinstance(name, str) else None
        if m is None or m[1] != split or m[3] != kind:
            bad(f"{entry}.{kind}", f"{show(name)} is not a file name of this format ({split}.{kind}.bin or "
                                   f"{split}-0000k-of-0000N.{kind}.bin)")
        if name in names:
            bad(f"{entry}.{kind}", f"{show(name)} is named twice")
        names.add(name)
        stems.add(name.rsplit(".", 2)[0])
    if len(stems) != 1:
        bad(entry, f"its files have different stems ({', '.join(sorted(stems))})")
    if part.get("dtype") != dtype:
        bad(f"{entry}.dtype", f"{show(part.get('dtype'))}, not the shards' {dtype!r}")
    blocks = integer(part.get("num_blocks"), f"{entry}.num_blocks", 0, MAX_COUNT)
    integer(part.get("num_tokens"), f"{entry}.num_tokens", 0, MAX_COUNT)
    if "max_token_id" in part:
        top = integer(part["max_token_id"], f"{entry}.max_token_id", -1, MAX_VOCAB)
        if top >= vocab:
            bad(f"{entry}.max_token_id", f"token id {top} is not below vocab_size {vocab} (shards of another "
                                         "tokenizer, or damaged)")
    if "encoder" in part and part["encoder"] not in ENCODERS:  # absent from records written before it was kept
        bad(f"{entry}.encoder", f"{show(part['encoder'])} is not one of {', '.join(ENCODERS)}")
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
        entry = f"files[{show(name)}]"
        if not (SHARD_FILE.fullmatch(name) or tokenizer_entry(name)):
            bad(entry, "not a shard file or tokenizer/<file> of this format")
        if SHARD_FILE.fullmatch(name) and name not in names:
            bad(entry, "no split record names this file")
        if not isinstance(e, dict) or not (isinstance(e.get("sha256"), str) and SHA256.fullmatch(e["sha256"])):
            bad(entry, f"{show(e)} is not {{bytes, sha256 (64 hex digits)}}")
        integer(e.get("bytes"), f"{entry}.bytes", 0, MAX_COUNT if SHARD_FILE.fullmatch(name) else MAX_TOKENIZER_BYTES)


def inside(directory: Path, name: str, where: str) -> Path:
    """`directory / name`, once it is certain to stay under `directory` (no absolute name, no `..`, no symlinked
    folder on the way out): the last check before a name from outside becomes a path."""
    path = directory / name
    if (os.path.isabs(name) or ".." in Path(name).parts
            or not path.parent.resolve().is_relative_to(directory.resolve())):
        raise ShardError(f"{where}: {show(name)} is not a file name inside {directory}")
    return path
