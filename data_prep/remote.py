"""Shards from object storage: a data directory at a URL (`s3://`, `gs://`, `hf://`, `file://`, any fsspec URL),
fetched once per node into a local cache and read there by the memory-mapped reader (`shards.py`), so that
nodes without a shared disk can train and nothing downstream of the reader changes.

    upload_shards("runs/x/data/<hash>", "s3://bucket/roberta/shards")   # python -m data_prep upload URL
    fetch_shards(cfg)   # data.shards_url -> the cached meta.json, after downloading what the cache lacks

At the URL: the files the reader opens (per split and slice `*.tokens.bin`, `*.offsets.bin`, and for the pair
packings `*.nsp.bin`, `*.bstart.bin`), the shards' tokenizer under `tokenizer/` (export pairs it with the model;
a node whose run_dir has no tokenizer gets it), then `meta.json`, uploaded last with a `files` table of each
file's size and sha256, so a directory whose meta.json is there is complete. A directory copied there by other
means (`aws s3 cp --recursive`) works too: without the table, files are checked by the sizes the split records
imply, and the log says so.

What a fetch checks, and against what (the URL's content is data from outside, possibly hostile):
1) meta.json: read up to `shards.MAX_META_BYTES`; with `data.shards_sha256` set, its sha256 must be the pinned one
   (else nothing is downloaded), which makes the manifest, and through its files table every file, as trusted as
   the pin; without a pin, the manifest is whatever the URL serves. Then `shards.parse_meta`: size, nesting depth,
   every field (dtype, vocab_size, seq_len, counts, special ids, max_token_id below vocab_size) and every name (a
   shard file name of the format, or `tokenizer/<one of tokenizer.FILES>`), before any file is opened; a name is
   never a path. seq_len and packing must be the config's.
2) each file: streamed into a unique temporary in its destination directory (`shards.temporary`), with a running
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

import contextlib
import hashlib
import json
import os
import stat
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

import numpy as np
from filelock import FileLock, Timeout

from .config import ExperimentConfig
from .prepare import sha256_file
from .redact import CREDENTIAL_KEY, REDACTED, redact_text, redact_url
from .shards import (
    MAX_META_BYTES,
    META,
    ShardError,
    file_sizes,
    inside,
    parse_meta,
    read_meta,
    stale_temporary,
    temporary,
    tokenizer_entry,
    write_json_atomic,
)
from .tokenizer import FILES as TOKENIZER_FILES
from .tokenizer import tokenizer_dir

T = TypeVar("T")
CHUNK = 1 << 20  # bytes per read of a download: how far past its size a file is read before it is refused


def cache_path(cfg: ExperimentConfig) -> Path:
    """This node's copy of `data.shards_url`: one directory per URL under `data.cache_dir` (or run_dir/data/remote)."""
    assert cfg.data.shards_url, "only for data.shards_url"
    root = Path(cfg.data.cache_dir).expanduser() if cfg.data.cache_dir else cfg.run_path / "data" / "remote"
    return root / hashlib.sha256(_clean(cfg.data.shards_url).encode()).hexdigest()[:16]


def _clean(url: str) -> str:
    return url.rstrip("/")


def _remote(where: str, what: str, call: Callable[[], T]) -> T:
    """`call()`, or one ShardError line naming the URL. Every backend raises its own types (botocore, aiohttp,
    huggingface_hub; ImportError for a protocol whose package is missing), so any Exception of the call is
    the remote's answer; bugs of this module stay outside `call`."""
    try:
        return call()
    except ShardError:
        raise
    except Exception as e:
        text = " ".join(str(e).split())[:500] or type(e).__name__  # a server's error page is not a message
        raise ShardError(redact_text(f"{where}: {what}: {text}")) from None


def filesystem(url: str, storage_options: dict[str, Any]) -> tuple[Any, str]:
    """fsspec's file system for `url` and the path on it (without a trailing slash)."""
    import fsspec

    fs, path = _remote(redact_url(url), "cannot open its file system",
                       lambda: fsspec.core.url_to_fs(url, **storage_options))
    return fs, path.rstrip("/")


def shard_files(meta: dict[str, Any]) -> dict[str, int]:
    """Every file the reader opens for these shards (all splits, all slices), name -> size in bytes."""
    sizes: dict[str, int] = {}
    for record in meta["splits"].values():
        for part in record.get("parts", [record]):
            sizes.update(file_sizes(part))
    return sizes


# ---------------------------------------------------------------------------------------------------------------
# Upload


def upload_shards(directory: str | Path, url: str, storage_options: dict[str, Any] | None = None,
                  tokenizer: str | Path | None = None, log: Callable[[str], None] = print) -> int:
    """Copy the data directory's shards to `url`, and the files of `tokenizer` (a tokenizer directory) to
    `url/tokenizer/` when it is the shards' tokenizer, then meta.json with every file's size and sha256; a file
    the remote holds already with the same size and checksum is skipped. Returns the bytes sent."""
    with _scrubbed(url):
        return _upload(Path(directory), _clean(url), storage_options, tokenizer, log)


def _upload(directory: Path, url: str, storage_options: dict[str, Any] | None, tokenizer: str | Path | None,
            log: Callable[[str], None]) -> int:
    meta = read_meta(directory)  # meta.json, or the slices' parts combined
    sources = {}
    for name, size in shard_files(meta).items():
        path = sources[name] = directory / name
        if not path.is_file() or path.stat().st_size != size:
            raise ShardError(f"{path} is missing or not {size} bytes as its record says: run `make data` again")
    if tokenizer is not None and (Path(tokenizer) / "tokenizer.json").is_file():
        tok = Path(tokenizer)
        if sha256_file(tok / "tokenizer.json") == meta.get("tokenizer_sha256"):  # export needs it beside the model
            # tokenizer.json last: on the node, its presence says the directory is complete
            sources |= {f"tokenizer/{n}": tok / n for n in sorted(TOKENIZER_FILES, key=lambda n: n == "tokenizer.json")
                        if (tok / n).is_file()}
        else:
            log(f"upload: warning: {tok} is not the tokenizer of these shards; uploading the shards without it")
    fs, root = filesystem(url, storage_options or {})
    shown = redact_url(url)
    remote_meta = f"{root}/{META}"
    old = {}
    if _remote(shown, "cannot list it", lambda: fs.exists(remote_meta)):
        old = _parse(_read_meta_bytes(fs, remote_meta, f"{shown}/{META}"), f"{shown}/{META}",
                     strict=False).get("files", {})
        # until the new files are all there, no reader may pair the old meta.json with them
        _remote(f"{shown}/{META}", "cannot delete it", lambda: fs.rm_file(remote_meta))
    for folder in sorted({f"{root}/{n}".rpartition("/")[0] for n in sources}):  # file:// needs them; S3: no-op
        _remote(shown, "cannot create it", lambda f=folder: fs.makedirs(f, exist_ok=True))
    table, sent = {}, 0
    for name, path in sources.items():
        size = path.stat().st_size
        table[name] = {"bytes": size, "sha256": sha256_file(path)}
        target = f"{root}/{name}"
        if old.get(name) == table[name] and _remote(f"{shown}/{name}", "cannot stat it",
                                                    lambda t=target: fs.exists(t) and fs.size(t)) == size:
            continue
        _remote(f"{shown}/{name}", "cannot upload it", lambda p=path, t=target: fs.put_file(str(p), t))
        sent += size
    text = (json.dumps({**meta, "files": table}, indent=2) + "\n").encode()
    _remote(f"{shown}/{META}", "cannot upload it", lambda: fs.pipe_file(remote_meta, text))
    log(f"upload: {directory} -> {shown}: {len(sources)} files, {sent / 1e6:.1f} MB sent "
        f"({sum(e['bytes'] for e in table.values()) / 1e6:.1f} MB in all), then {META} (sha256 "
        f"{hashlib.sha256(text).hexdigest()}: pin it as data.shards_sha256 where you train)")
    return sent


# ---------------------------------------------------------------------------------------------------------------
# Fetch


def fetch_shards(cfg: ExperimentConfig, log: Callable[[str], None] = print) -> Path:
    """The local meta.json of `data.shards_url`'s shards, downloaded into this node's cache when they are not
    there (or not whole); one process per cache directory at a time."""
    cache = cache_path(cfg)
    cache.mkdir(parents=True, exist_ok=True)
    lock = FileLock(cache / ".fetch.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log(f"data: waiting for another process fetching {redact_url(cfg.data.shards_url or '')} into {cache}")
        lock.acquire()
    try:
        with _scrubbed(cfg.data.shards_url or ""):
            return _fetch(cfg, cache, log)
    finally:
        lock.release()


@contextlib.contextmanager
def _scrubbed(url: str) -> Iterator[None]:
    """A ShardError raised inside, without the credentials of `url`: the messages name it redacted, but a backend's
    own text may quote its parts (botocore: `Invalid bucket name "KEY:SECRET@bucket"`)."""
    try:
        yield
    except ShardError as e:
        raise ShardError(_scrub(str(e), url)) from None


def _scrub(text: str, url: str) -> str:
    """`text` with every URL redacted and every credential of `url` (userinfo, credential-like query values)
    replaced wherever it appears."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    secrets = {userinfo, *userinfo.split(":")} | {v for k, v in parse_qsl(parts.query) if CREDENTIAL_KEY.search(k)}
    text = redact_text(text)
    for secret in sorted((s for s in secrets if len(s) >= 4), key=len, reverse=True):  # shorter: not a secret
        text = text.replace(secret, REDACTED)
    return text


def _fetch(cfg: ExperimentConfig, cache: Path, log: Callable[[str], None]) -> Path:
    url = _clean(cfg.data.shards_url or "")
    shown = redact_url(url)  # every message and log line: no credentials of the URL
    fs, root = filesystem(url, cfg.data.storage_options)
    # 1) the remote meta.json: bounded, pinned, validated, and checked against the config before any download
    raw = _read_meta_bytes(fs, f"{root}/{META}", f"{shown}/{META}")
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
        _write_bytes_atomic(cache / META, raw)
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


def _read_meta_bytes(fs: Any, path: str, where: str) -> bytes:
    """At most one byte more than a meta.json may have (parse_meta refuses that many)."""
    def read() -> bytes:
        with fs.open(path, "rb") as f:
            return f.read(MAX_META_BYTES + 1)

    return _remote(where, "cannot read it (is this the directory `python -m data_prep upload` wrote?)", read)


def _verify_meta(raw: bytes, where: str, pin: str | None) -> dict[str, Any]:
    """The validated meta.json, once its bytes are the pinned ones (when `data.shards_sha256` pins them)."""
    if pin is not None and (got := hashlib.sha256(raw).hexdigest()) != pin.lower():
        raise ShardError(f"{where}: its sha256 is {got}, data.shards_sha256 pins {pin.lower()}: these are not the "
                         "shards you pinned; check the URL, or pin the new meta.json once you trust it")
    return _parse(raw, where)


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
        with _remote(where, "cannot download it", lambda: fs.open(remote, "rb", block_size=CHUNK)) as f:
            while chunk := _remote(where, "cannot download it", lambda: f.read(CHUNK)):
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


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    fd, tmp = temporary(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


FIX = "upload the shards again (`python -m data_prep upload`)"


def _parse(raw: bytes, where: str, strict: bool = True) -> dict[str, Any]:
    """A meta.json's validated content (`shards.parse_meta`); one line naming it when it is not one (strict),
    else {}."""
    try:
        return parse_meta(raw, where, FIX)
    except ShardError:
        if not strict:
            return {}
        raise
