"""Shards at a URL fetched into this node's cache (`data.shards_url`): everything the URL serves is checked before
the memory-mapped reader (`shards.py`) may open it. The URL side (file system, one-line errors, upload) is remote.py.

    fetch_shards(cfg)   # data.shards_url -> the cached meta.json, after downloading what the cache lacks

What a fetch checks, and against what (the URL's content is data from outside, possibly hostile):
1) meta.json: read up to `manifest.MAX_META_BYTES`; with `data.shards_sha256` set, its sha256 must be the pinned one
   (else nothing is downloaded), which makes the manifest, and through its files table every file, as trusted as
   the pin; without a pin, the manifest is whatever the URL serves. Then `manifest.parse_meta`: size, nesting depth,
   every field (dtype, vocab_size, seq_len, counts, special ids, max_token_id below vocab_size) and every name (a
   shard file name of the format, or `tokenizer/<one of tokenizer.FILES>`), before any file is opened; a name is
   never a path. seq_len and packing must be the config's.
2) each file: streamed into a unique temporary in its destination directory (`tempfiles.temporary`), with a running
   size and sha256; the download stops as soon as it passes the size the manifest gives (a server sending more
   fills no disk), and the file is renamed into place only when its size, and its sha256 when the table has one,
   are the manifest's.
3) a cached file: kept when its size is the manifest's and its sha256 is the table's. The sha256 of a cached file
   is stored in `.verified.json` keyed by its (size, mtime_ns, inode) and computed again whenever one of them
   changed, so a start reads no file twice and a file altered in place is hashed again (an alteration that
   restores size, mtime and inode is not seen: whoever can do that can write the cache, which is trusted).
   Without a files table: sizes only.
4) token ids: the largest id of each tokens file is below vocab_size, by a chunked numpy scan once per file (kept
   in `.verified.json` with its sha256), since a split record's `max_token_id` is only the manifest's word.

The cache: `data.cache_dir/<sha256(url)[:16]>/`, the same layout. Under a file lock, so that under DDP (every
process runs `make pretrain`, as for `prepare_data`'s lock) the first process of a node downloads and the others
wait and then find the files there (on NFS the lock is per host: nodes may fetch into one cache at once, each
into its own temporaries, and remove only stale temporaries of their own host). The cached meta.json is removed
before the first download and written back after the last, so a killed fetch never leaves a cache that looks
complete. Every message and log line shows the URL without credentials (`redact.redact_url`).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from .config import ExperimentConfig
from .manifest import MAX_META_BYTES, ShardError, inside, tokenizer_entry
from .prepare import sha256_file
from .redact import redact_url
from .remote import (
    cache_path,
    clean_url,
    filesystem,
    parse_remote_meta,
    read_meta_bytes,
    remote_call,
    scrubbed,
    shard_files,
)
from .shards import META
from .tempfiles import exclusive, stale_temporary, temporary, write_bytes_atomic, write_json_atomic
from .tokenizer import tokenizer_dir

CHUNK = 1 << 20  # bytes per read of a download: how far past its size a file is read before it is refused


def fetch_shards(cfg: ExperimentConfig, log: Callable[[str], None] = print) -> Path:
    """The local meta.json of `data.shards_url`'s shards, downloaded into this node's cache when they are not
    there (or not whole); one process per cache directory at a time."""
    cache = cache_path(cfg)
    cache.mkdir(parents=True, exist_ok=True)
    waiting = f"data: waiting for another process fetching {redact_url(cfg.data.shards_url or '')} into {cache}"
    with exclusive(cache / ".fetch.lock", waiting, log), scrubbed(cfg.data.shards_url or ""):
        return _fetch(cfg, cache, log)


def _fetch(cfg: ExperimentConfig, cache: Path, log: Callable[[str], None]) -> Path:
    url = clean_url(cfg.data.shards_url or "")
    shown = redact_url(url)  # every message and log line: no credentials of the URL
    fs, root = filesystem(url, cfg.data.storage_options)
    # 1) the remote meta.json: bounded, pinned, validated, and checked against the config before any download
    raw = read_meta_bytes(fs, f"{root}/{META}", f"{shown}/{META}")
    meta = _verify_meta(raw, f"{shown}/{META}", cfg.data.shards_sha256)
    d = cfg.data
    differ = [f"data.{k}={getattr(d, k)!r} (the shards: {meta.get(k)!r})" for k in ("seq_len", "packing")
              if meta.get(k) != getattr(d, k)]
    if differ:
        raise ShardError(f"{shown}: the shards were prepared with other settings than the config's "
                         f"{', '.join(differ)}: set them as the shards have them, or upload shards made with this "
                         "config")
    sizes = shard_files(meta)
    table: dict[str, dict[str, Any]] | None = meta.get("files")
    if table is None:
        if d.shards_sha256:
            raise ShardError(f"{shown}/{META}: has no files table, so data.shards_sha256 cannot vouch for its "
                             "files: upload the shards with `python -m data_prep upload`")
        log(f"data: {shown}/{META} has no files table: its files are checked by their sizes only, not by sha256 "
            "(upload them with `python -m data_prep upload` for checksums)")
    else:
        for name, size in sizes.items():
            if name not in table:
                raise ShardError(f"{shown}/{META}: {name} is not in its files table: upload the shards again")
            if table[name]["bytes"] != size:
                raise ShardError(f"{shown}/{META}: {name} is {table[name]['bytes']} bytes in its files table, "
                                 f"{size} by its split record: upload the shards again")
    # 2) what the cache holds already; temporaries of this host's dead processes go (never another host's)
    for leftover in cache.glob("*.tmp*"):
        if stale_temporary(leftover.name):
            leftover.unlink(missing_ok=True)
    cached_raw = _read_cached(cache / META)
    store = _Verified(cache)

    def expected(name: str) -> str | None:
        return table[name]["sha256"] if table is not None else None

    todo = [name for name in sizes if not store.matches(name, sizes[name], expected(name))]
    if not todo and cached_raw == raw:
        log(f"data: {cache} holds the shards of {shown} ({len(sizes)} files, "
            f"{'sizes and sha256' if table is not None else 'sizes only'} checked)")
    else:
        # 3) download what is missing; meta.json last, so the cache is complete only when it is there
        (cache / META).unlink(missing_ok=True)
        total = sum(sizes[n] for n in todo)
        if todo:
            log(f"data: downloading {len(todo)} of {len(sizes)} files ({total / 1e6:.1f} MB) from {shown} into "
                f"{cache}")
        # a few at once: an object store answers each request with latency, so one at a time leaves bandwidth idle
        try:
            with ThreadPoolExecutor(max_workers=min(d.fetch_threads, max(1, len(todo)))) as pool:
                jobs = {n: pool.submit(_download, fs, f"{root}/{n}", f"{shown}/{n}",
                                       inside(cache, n, f"{shown}/{META}"), sizes[n], expected(n)) for n in todo}
            for name, job in jobs.items():  # all finished: record what came, then the first failure in file order
                if job.exception() is None:
                    store.add(name, job.result())
            for job in jobs.values():
                job.result()
        finally:
            store.save()
    # 4) no token id beyond the vocabulary: each tokens file scanned once (a record's max_token_id, checked by
    #    parse_meta, is the writer's word; a hostile manifest could state any), its result kept with its sha256
    for record in meta["splits"].values():
        for part in record.get("parts", [record]):
            top = store.max_token_id(part["tokens"], meta["dtype"])
            if top >= meta["vocab_size"]:
                (cache / part["tokens"]).unlink(missing_ok=True)  # never left where a reader could map it
                store.save()
                raise ShardError(f"{shown}/{part['tokens']}: token id {top} is not below the vocab_size "
                                 f"{meta['vocab_size']} of its {META}: shards of another tokenizer, or damaged; "
                                 "upload the shards again")
    store.save()
    if cached_raw != raw or todo:
        write_bytes_atomic(cache / META, raw)
    # 5) the shards' tokenizer into run_dir/tokenizer, when the run has none: export pairs it with the model
    tok = tokenizer_dir(cfg)
    names = sorted((n for n in table or {} if tokenizer_entry(n)), key=lambda n: n == "tokenizer/tokenizer.json")
    ours = (table or {}).get("tokenizer/tokenizer.json", {}).get("sha256") == meta.get("tokenizer_sha256")
    if names and ours and not (tok / "tokenizer.json").is_file():
        tok.mkdir(parents=True, exist_ok=True)
        for name in names:
            assert table is not None
            _download(fs, f"{root}/{name}", f"{shown}/{name}",
                      inside(tok, name.partition("/")[2], f"{shown}/{META}: files[{name!r}]"),
                      table[name]["bytes"], table[name]["sha256"])
        log(f"data: the shards' tokenizer from {shown}/tokenizer into {tok}")
    return cache / META


def _verify_meta(raw: bytes, where: str, pin: str | None) -> dict[str, Any]:
    """The validated meta.json, once its bytes are the pinned ones (when `data.shards_sha256` pins them)."""
    if pin is not None and (got := hashlib.sha256(raw).hexdigest()) != pin.lower():
        raise ShardError(f"{where}: its sha256 is {got}, data.shards_sha256 pins {pin.lower()}: these are not the "
                         "shards you pinned; check the URL, or pin the new meta.json once you trust it")
    return parse_remote_meta(raw, where)


def _read_cached(path: Path) -> bytes | None:
    try:
        return path.read_bytes() if path.stat().st_size <= MAX_META_BYTES else None
    except OSError:
        return None


class _Verified:
    """`.verified.json` in the cache: per cached file, the sha256 (and for tokens files the largest id) computed
    for it, valid while its (size, mtime_ns, inode) are the ones recorded; else it is hashed (scanned) again."""

    NAME = ".verified.json"

    def __init__(self, cache: Path):
        self.cache = cache
        self.entries: dict[str, dict[str, Any]] = {}
        raw = _read_cached(cache / self.NAME)
        try:
            found = json.loads(raw) if raw is not None else {}
            if isinstance(found, dict) and isinstance(found.get("files"), dict):
                self.entries = {k: v for k, v in found["files"].items() if isinstance(v, dict)}
        except (ValueError, RecursionError):
            pass  # damaged: every file is hashed again
        self.changed = False

    def _stat(self, name: str) -> list[int] | None:
        try:
            st = (self.cache / name).lstat()
        except OSError:
            return None
        return [st.st_size, st.st_mtime_ns, st.st_ino] if stat.S_ISREG(st.st_mode) else None  # no symlinks

    def _entry(self, name: str) -> dict[str, Any] | None:
        """The entry of `name`, hashed again when the file changed since it was recorded; None: no such file."""
        key = self._stat(name)
        if key is None:
            return None
        entry = self.entries.get(name)
        if entry is None or entry.get("stat") != key or not isinstance(entry.get("sha256"), str):
            entry = self.entries[name] = {"stat": key, "sha256": sha256_file(self.cache / name)}
            self.changed = True
        return entry

    def matches(self, name: str, size: int, sha256: str | None) -> bool:
        """The cached file is there, `size` bytes, and (when the table gives one) of sha256 `sha256`."""
        key = self._stat(name)
        if key is None or key[0] != size:
            return False
        if sha256 is None:
            return True  # no files table: sizes only (said in the log)
        entry = self._entry(name)
        return entry is not None and entry["sha256"] == sha256

    def add(self, name: str, sha256: str) -> None:
        """`name` was just downloaded with this sha256."""
        key = self._stat(name)
        if key is not None:
            self.entries[name] = {"stat": key, "sha256": sha256}
            self.changed = True

    def max_token_id(self, name: str, dtype: str) -> int:
        """The largest id in the tokens file `name`, scanned once (chunked) and then kept with its entry."""
        entry = self._entry(name)
        assert entry is not None, f"{name} was checked to be in the cache"
        if type(entry.get("max_token_id")) is not int:
            entry["max_token_id"] = scan_max_token_id(self.cache / name, dtype)
            self.changed = True
        return entry["max_token_id"]

    def save(self) -> None:
        if self.changed:
            write_json_atomic(self.cache / self.NAME, {"files": self.entries})
            self.changed = False


def scan_max_token_id(path: Path, dtype: str, chunk: int = 1 << 24) -> int:
    """The largest id of a tokens file (-1 when it is empty), read in chunks so memory stays bounded."""
    if path.stat().st_size == 0:
        return -1
    tokens = np.memmap(path, np.dtype(dtype), "r")
    return max(int(tokens[i : i + chunk].max()) for i in range(0, len(tokens), chunk))


def _download(fs: Any, remote: str, where: str, path: Path, size: int, sha256: str | None) -> str:
    """`remote` to `path`, streamed through a new temporary beside it with a running size and sha256: stopped as
    soon as it passes `size`, renamed into place only once its size (and sha256) are right. Returns the sha256."""
    fd, tmp = temporary(path)
    try:
        h, got = hashlib.sha256(), 0
        with remote_call(where, "cannot download it", lambda: fs.open(remote, "rb", block_size=CHUNK)) as f:
            while chunk := remote_call(where, "cannot download it", lambda: f.read(CHUNK)):
                got += len(chunk)
                if got > size:  # before writing it: the disk never holds more than the manifest says
                    raise ShardError(f"{where}: more than the {size} bytes its meta.json says (stopped after "
                                     f"reading {got}): upload the shards again")
                h.update(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
        if got != size:
            raise ShardError(f"{where}: {got} bytes, its meta.json says {size}: upload the shards again")
        digest = h.hexdigest()
        if sha256 is not None and digest != sha256:
            raise ShardError(f"{where}: its sha256 is not the one its meta.json records: upload the shards again")
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
        return digest
    finally:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
