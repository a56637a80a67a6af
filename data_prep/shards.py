"""The on-disk format of packed shards: flat binaries any numpy can read, described by `meta.json`.

This module is the only way `pretrain` reads shards:

    split = open_split("runs/x/data/<hash>/meta.json", "train")   # or the data directory itself
    split.num_blocks, split.num_tokens, split.seq_len, split.special_ids
    split.block(i)          # np.ndarray of the block's ids, <s> ... </s>, unpadded (a view of a memmap)
    split.block_lengths()   # (num_blocks,) int64: to batch short DOC-SENTENCES blocks by tokens
    split.nsp_labels        # (num_blocks,) uint8 for the pair packings (0: B follows A, 1: random B), else None
    split.b_start(i)        # pair packings: where B starts in block i (for token types), else None
    short_phase(meta_path)  # BERT's length schedule: (seq_len, meta.json) of the short shards, or None

Shards at a URL (`data.shards_url`) are first fetched into a local cache by `fetch.py`, then read from there.

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
only when a record names it and its size matches the record (temporaries: tempfiles.py).

A meta.json is read only through `manifest.py`'s `parse_meta` / `validate_meta`, which bound it and check every
name and field before this module opens anything it names; `ShardError` is defined there, with those rules.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from .manifest import REMAKE, ShardError, inside, parse_meta, read_bounded, show, validate_meta
from .sources import add_counts, mixture
from .tempfiles import remove_temporaries, temporary, write_json_atomic

META = "meta.json"


def stem(split: str, shard_index: int = 0, num_shards: int = 1) -> str:
    return split if num_shards == 1 else f"{split}-{shard_index:05d}-of-{num_shards:05d}"


def meta_name(shard_index: int = 0, num_shards: int = 1) -> str:
    return META if num_shards == 1 else f"meta-{shard_index:05d}-of-{num_shards:05d}.json"


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
        raise ShardError(f"{directory}: the slices' meta-*-of-*.json do not combine ({type(e).__name__}: {show(e)}); "
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
        (`build.valid_by_source`: each slice's record counts its blocks per source, in source order); else None."""
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
