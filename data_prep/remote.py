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
imply.

The cache: `data.cache_dir/<sha256(url)[:16]>/`, the same layout. Under a file lock, so that under DDP (every
process runs `make pretrain`, as for `prepare_data`'s lock) the first process of a node downloads and the others
wait and then find the files there. Each file is downloaded under a temporary name, checked (size, and sha256
when the table has it) and renamed into place; the cached meta.json is removed before the first download and
written back after the last, so a killed fetch never leaves a cache that looks complete. Every start reads the
remote meta.json (one small request) and keeps a cached file of the right size that is the remote one: the cached
meta.json is byte-equal to the remote one, or the file's sha256 is the table's.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from filelock import FileLock, Timeout

from .config import ExperimentConfig
from .prepare import sha256_file
from .shards import FORMAT, META, ShardError, file_sizes, read_meta
from .tokenizer import FILES as TOKENIZER_FILES
from .tokenizer import tokenizer_dir

T = TypeVar("T")


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
    except Exception as e:
        text = " ".join(str(e).split()) or type(e).__name__
        raise ShardError(f"{where}: {what}: {text}") from None


def filesystem(url: str, storage_options: dict[str, Any]) -> tuple[Any, str]:
    """fsspec's file system for `url` and the path on it (without a trailing slash)."""
    import fsspec

    fs, path = _remote(url, "cannot open its file system", lambda: fsspec.core.url_to_fs(url, **storage_options))
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
    directory, url = Path(directory), _clean(url)
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
    remote_meta = f"{root}/{META}"
    old = {}
    if _remote(url, "cannot list it", lambda: fs.exists(remote_meta)):
        old = _parse(_remote(f"{url}/{META}", "cannot read it", lambda: fs.cat_file(remote_meta)),
                     f"{url}/{META}", strict=False).get("files", {})
        # until the new files are all there, no reader may pair the old meta.json with them
        _remote(f"{url}/{META}", "cannot delete it", lambda: fs.rm_file(remote_meta))
    for folder in sorted({f"{root}/{n}".rpartition("/")[0] for n in sources}):  # file:// needs them; S3: no-op
        _remote(url, "cannot create it", lambda f=folder: fs.makedirs(f, exist_ok=True))
    table, sent = {}, 0
    for name, path in sources.items():
        size = path.stat().st_size
        table[name] = {"bytes": size, "sha256": sha256_file(path)}
        target = f"{root}/{name}"
        if old.get(name) == table[name] and _remote(f"{url}/{name}", "cannot stat it",
                                                    lambda t=target: fs.exists(t) and fs.size(t)) == size:
            continue
        _remote(f"{url}/{name}", "cannot upload it", lambda p=path, t=target: fs.put_file(str(p), t))
        sent += size
    text = json.dumps({**meta, "files": table}, indent=2) + "\n"
    _remote(f"{url}/{META}", "cannot upload it", lambda: fs.pipe_file(remote_meta, text.encode()))
    log(f"upload: {directory} -> {url}: {len(sources)} files, {sent / 1e6:.1f} MB sent "
        f"({sum(e['bytes'] for e in table.values()) / 1e6:.1f} MB in all), then {META}")
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
        log(f"data: waiting for another process fetching {cfg.data.shards_url} into {cache}")
        lock.acquire()
    try:
        return _fetch(cfg, cache, log)
    finally:
        lock.release()


def _fetch(cfg: ExperimentConfig, cache: Path, log: Callable[[str], None]) -> Path:
    url = _clean(cfg.data.shards_url or "")
    fs, root = filesystem(url, cfg.data.storage_options)
    # 1) the remote meta.json, checked against the config before anything is downloaded
    raw = _remote(f"{url}/{META}", "cannot read it (is this the directory `python -m data_prep upload` wrote?)",
                  lambda: fs.cat_file(f"{root}/{META}"))
    meta = _parse(raw, f"{url}/{META}")
    d = cfg.data
    differ = [f"data.{k}={getattr(d, k)!r} (the shards: {meta.get(k)!r})" for k in ("seq_len", "packing")
              if meta.get(k) != getattr(d, k)]
    if differ:
        raise ShardError(f"{url}: the shards were prepared with other settings than the config's {', '.join(differ)}: "
                         "set them as the shards have them, or upload shards made with this config")
    # 2) what the cache holds already: the right size, and the same file as the remote one
    for leftover in cache.glob("*.tmp*"):  # of a killed fetch; the lock says no other is running
        leftover.unlink(missing_ok=True)
    cached_raw = (cache / META).read_bytes() if (cache / META).is_file() else None
    table = meta.get("files", {})
    old_table = _parse(cached_raw, str(cache / META), strict=False).get("files", {}) if cached_raw else {}
    try:
        sizes = shard_files(meta)
    except (KeyError, TypeError, ValueError) as e:
        raise ShardError(f"{url}/{META}: a split record is damaged ({type(e).__name__}: {e}): upload the shards "
                         "again") from None
    for name, size in sizes.items():
        if name in table and table[name].get("bytes") != size:
            raise ShardError(f"{url}/{META}: {name} is {table[name].get('bytes')} bytes in its files table, "
                             f"{size} by its split record: upload the shards again")

    def whole(name: str) -> bool:
        path, sha = cache / name, table.get(name, {}).get("sha256")
        if not path.is_file() or path.stat().st_size != sizes[name]:
            return False
        if cached_raw == raw:
            return True
        return sha is not None and (old_table.get(name, {}).get("sha256") == sha or sha256_file(path) == sha)

    todo = [name for name in sizes if not whole(name)]
    if not todo and cached_raw == raw:
        log(f"data: {cache} holds the shards of {url} ({len(sizes)} files, sizes checked)")
    else:
        # 3) download what is missing; meta.json last, so the cache is complete only when it is there
        (cache / META).unlink(missing_ok=True)
        total = sum(sizes[n] for n in todo)
        if todo:
            log(f"data: downloading {len(todo)} of {len(sizes)} files ({total / 1e6:.1f} MB) from {url} into {cache}")
        # a few at once: an object store answers each request with latency, so one at a time leaves bandwidth idle
        with ThreadPoolExecutor(max_workers=min(d.fetch_threads, max(1, len(todo)))) as pool:
            for done in [pool.submit(_download, fs, f"{root}/{n}", f"{url}/{n}", cache / n, sizes[n],
                                     table.get(n, {}).get("sha256")) for n in todo]:
                done.result()  # the first failure in file order, named by its URL (the others still finish)
        _write_bytes_atomic(cache / META, raw)
    # 4) the shards' tokenizer into run_dir/tokenizer, when the run has none: export pairs it with the model
    tok = tokenizer_dir(cfg)
    names = sorted((n for n in table if n.startswith("tokenizer/")), key=lambda n: n == "tokenizer/tokenizer.json")
    ours = table.get("tokenizer/tokenizer.json", {}).get("sha256") == meta.get("tokenizer_sha256")
    if names and ours and not (tok / "tokenizer.json").is_file():
        tok.mkdir(parents=True, exist_ok=True)
        for name in names:
            _download(fs, f"{root}/{name}", f"{url}/{name}", tok / name.partition("/")[2], table[name]["bytes"],
                      table[name]["sha256"])
        log(f"data: the shards' tokenizer from {url}/tokenizer into {tok}")
    return cache / META


def _download(fs: Any, remote: str, where: str, path: Path, size: int, sha256: str | None) -> None:
    """`remote` to `path`, through a temporary name that is renamed only once its size (and sha256) are right."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        _remote(where, "cannot download it", lambda: fs.get_file(remote, str(tmp)))
        got = tmp.stat().st_size
        if got != size:
            raise ShardError(f"{where}: {got} bytes, its meta.json says {size}: upload the shards again")
        if sha256 is not None and sha256_file(tmp) != sha256:
            raise ShardError(f"{where}: its sha256 is not the one its meta.json records: upload the shards again")
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _parse(raw: bytes, where: str, strict: bool = True) -> dict[str, Any]:
    """A meta.json's content; one line naming it when it is not one (strict), else {}."""
    try:
        meta = json.loads(raw)
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("splits"), dict):
            raise ValueError(f"not a meta.json of shard format {FORMAT}")
    except (ValueError, UnicodeDecodeError) as e:
        if not strict:
            return {}
        raise ShardError(f"{where}: {e}; upload the shards again (`python -m data_prep upload`)") from None
    return meta
