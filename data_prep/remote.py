"""Shards from object storage: a data directory at a URL (`s3://`, `gs://`, `hf://`, `file://`, any fsspec URL),
fetched once per node into a local cache and read there by the memory-mapped reader (`shards.py`), so that
nodes without a shared disk can train and nothing downstream of the reader changes.

    upload_shards("runs/x/data/<hash>", "s3://bucket/roberta/shards")   # python -m data_prep upload URL
    fetch_shards(cfg)   # fetch.py: data.shards_url -> the cached meta.json

At the URL: the files the reader opens (per split and slice `*.tokens.bin`, `*.offsets.bin`, and for the pair
packings `*.nsp.bin`, `*.bstart.bin`), the shards' tokenizer under `tokenizer/` (export pairs it with the model;
a node whose run_dir has no tokenizer gets it), then `meta.json`, uploaded last with a `files` table of each
file's size and sha256, so a directory whose meta.json is there is complete. A directory copied there by other
means (`aws s3 cp --recursive`) works too: without the table, files are checked by the sizes the split records
imply, and the log says so.


This module: the URL side (its file system, errors and manifest as one line without credentials) and the upload;
fetch.py: the download into the node's verified cache, which checks what the URL serves.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

from .config import ExperimentConfig
from .manifest import MAX_META_BYTES, ShardError, parse_meta
from .prepare import sha256_file
from .redact import CREDENTIAL_KEY, REDACTED, redact_text, redact_url
from .shards import META, file_sizes, read_meta
from .tokenizer import FILES as TOKENIZER_FILES

T = TypeVar("T")


def cache_path(cfg: ExperimentConfig) -> Path:
    """This node's copy of `data.shards_url`: one directory per URL under `data.cache_dir` (or run_dir/data/remote)."""
    assert cfg.data.shards_url, "only for data.shards_url"
    root = Path(cfg.data.cache_dir).expanduser() if cfg.data.cache_dir else cfg.run_path / "data" / "remote"
    return root / hashlib.sha256(clean_url(cfg.data.shards_url).encode()).hexdigest()[:16]


def clean_url(url: str) -> str:
    return url.rstrip("/")


def remote_call(where: str, what: str, call: Callable[[], T]) -> T:
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

    fs, path = remote_call(redact_url(url), "cannot open its file system",
                           lambda: fsspec.core.url_to_fs(url, **storage_options))
    return fs, path.rstrip("/")


def shard_files(meta: dict[str, Any]) -> dict[str, int]:
    """Every file the reader opens for these shards (all splits, all slices), name -> size in bytes."""
    sizes: dict[str, int] = {}
    for record in meta["splits"].values():
        for part in record.get("parts", [record]):
            sizes.update(file_sizes(part))
    return sizes


@contextlib.contextmanager
def scrubbed(url: str) -> Iterator[None]:
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


def read_meta_bytes(fs: Any, path: str, where: str) -> bytes:
    """At most one byte more than a meta.json may have (parse_meta refuses that many)."""
    def read() -> bytes:
        with fs.open(path, "rb") as f:
            return f.read(MAX_META_BYTES + 1)

    return remote_call(where, "cannot read it (is this the directory `python -m data_prep upload` wrote?)", read)


FIX = "upload the shards again (`python -m data_prep upload`)"


def parse_remote_meta(raw: bytes, where: str, strict: bool = True) -> dict[str, Any]:
    """A meta.json's validated content (`manifest.parse_meta`); one line naming it when it is not one (strict),
    else {}."""
    try:
        return parse_meta(raw, where, FIX)
    except ShardError:
        if not strict:
            return {}
        raise


# ---------------------------------------------------------------------------------------------------------------
# Upload


def upload_shards(directory: str | Path, url: str, storage_options: dict[str, Any] | None = None,
                  tokenizer: str | Path | None = None, log: Callable[[str], None] = print) -> int:
    """Copy the data directory's shards to `url`, and the files of `tokenizer` (a tokenizer directory) to
    `url/tokenizer/` when it is the shards' tokenizer, then meta.json with every file's size and sha256; a file
    the remote holds already with the same size and checksum is skipped. Returns the bytes sent."""
    with scrubbed(url):
        return _upload(Path(directory), clean_url(url), storage_options, tokenizer, log)


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
    if remote_call(shown, "cannot list it", lambda: fs.exists(remote_meta)):
        old = parse_remote_meta(read_meta_bytes(fs, remote_meta, f"{shown}/{META}"), f"{shown}/{META}",
                                strict=False).get("files", {})
        # until the new files are all there, no reader may pair the old meta.json with them
        remote_call(f"{shown}/{META}", "cannot delete it", lambda: fs.rm_file(remote_meta))
    for folder in sorted({f"{root}/{n}".rpartition("/")[0] for n in sources}):  # file:// needs them; S3: no-op
        remote_call(shown, "cannot create it", lambda f=folder: fs.makedirs(f, exist_ok=True))
    table, sent = {}, 0
    for name, path in sources.items():
        size = path.stat().st_size
        table[name] = {"bytes": size, "sha256": sha256_file(path)}
        target = f"{root}/{name}"
        if old.get(name) == table[name] and remote_call(f"{shown}/{name}", "cannot stat it",
                                                        lambda t=target: fs.exists(t) and fs.size(t)) == size:
            continue
        remote_call(f"{shown}/{name}", "cannot upload it", lambda p=path, t=target: fs.put_file(str(p), t))
        sent += size
    text = (json.dumps({**meta, "files": table}, indent=2) + "\n").encode()
    remote_call(f"{shown}/{META}", "cannot upload it", lambda: fs.pipe_file(remote_meta, text))
    log(f"upload: {directory} -> {shown}: {len(sources)} files, {sent / 1e6:.1f} MB sent "
        f"({sum(e['bytes'] for e in table.values()) / 1e6:.1f} MB in all), then {META} (sha256 "
        f"{hashlib.sha256(text).hexdigest()}: pin it as data.shards_sha256 where you train)")
    return sent

