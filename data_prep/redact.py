"""Secrets never leave the process: credential-like values are replaced by `REDACTED` before a config, URL or
message is persisted or printed (logs/config.yaml, hparams.yaml, checkpoints, the model card, wandb's and
TensorBoard's configs, console lines).

What counts as a secret:
- in `data.storage_options` (any depth, e.g. s3fs's `key`/`secret`/`token`, `client_kwargs.aws_secret_access_key`,
  gcsfs's `token`): every value whose key names a credential (`CREDENTIAL_KEY`);
- in a URL: the userinfo (`s3://KEY:SECRET@bucket/...`, `https://user:pass@host/...`) and the values of query
  parameters that name a credential (a presigned URL's `X-Amz-Signature`, `X-Amz-Credential`, Azure's `sig`,
  `token`, `access_token`, ...).

On the command line: the value of an override of `data.storage_options`, in the copy of `sys.argv` that wandb
records and in the ablation's record of its overrides (`redact_argv`).

The run itself keeps the real values in memory (the config object it was given); only what is written or printed
is redacted. A resumed run takes its storage options from the config it is started with, not the checkpoint's.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

REDACTED = "REDACTED"

CREDENTIAL_KEY = re.compile(
    r"(key|secret|token|passw(or)?d|credential|auth|session|signature|^sig$|sas|cookie|private|bearer|api[_-]?key)",
    re.IGNORECASE)
"""A mapping key or query parameter whose value is a credential. `key` is one too: s3fs's access key id is one
half of the pair, and `endpoint_url`, `region_name`, `anon` or `client_kwargs` do not match."""

_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s'\"<>]+", re.IGNORECASE)


def redact_url(url: str) -> str:
    """`url` with its userinfo and credential-like query values replaced (anything else as it was)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return REDACTED
    netloc, path = parts.netloc, parts.path
    if "@" in netloc:
        netloc = f"{REDACTED}@{netloc.rpartition('@')[2]}"
    elif "@" in path:  # userinfo with a raw '/' (an AWS secret key has them): `s3://KEY:SE/CRET@bucket/p`
        netloc, path = REDACTED, f"@{path.rpartition('@')[2]}"  # on a path's own '@', too much goes: safe side
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(CREDENTIAL_KEY.search(k) for k, _ in pairs):
            query = urlencode([(k, REDACTED if CREDENTIAL_KEY.search(k) else v) for k, v in pairs], safe="/:")
    if netloc == parts.netloc and path == parts.path and query == parts.query:
        return url
    if path.startswith("@"):
        return f"{parts.scheme}://{netloc}{path}" + (f"?{query}" if query else "") + (
            f"#{parts.fragment}" if parts.fragment else "")
    return urlunsplit((parts.scheme, netloc, path, query, parts.fragment))


def redact_text(text: str) -> str:
    """Every URL inside `text` (an error message, a log line) redacted by `redact_url`; punctuation that ends a
    sentence or a clause after a URL (`s3://b/x: not found`) stays outside it."""

    def one(m: re.Match[str]) -> str:
        url = m.group(0)
        body = url.rstrip(".,;:)]}")
        return redact_url(body) + url[len(body):]

    return _URL.sub(one, text)


def redact_options(options: Any) -> Any:
    """A copy of an fsspec `storage_options` mapping (nested mappings and lists too) with every value whose key
    names a credential replaced by `REDACTED`; URLs inside values are redacted as well."""
    return _redacted(options, by_key=True)


def redact_config(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of a config dict (`ExperimentConfig.to_dict()`, or a checkpoint's) safe to persist: the storage
    options redacted, and every URL-valued string (shards_url, corpus entries, wandb's settings) without its
    credentials. The input is not changed."""
    out = _redacted(config, by_key=False)
    data = out.get("data") if isinstance(out, dict) else None
    if isinstance(data, dict) and "storage_options" in data:
        data["storage_options"] = redact_options(config["data"]["storage_options"])
    return out


def redact_argv(argv: list[str]) -> list[str]:
    """Command-line arguments safe to record (wandb keeps `sys.argv` in its run files; the ablation its
    overrides): the value of an override of `data.storage_options` (whole or any key of it) is replaced, as
    `--KEY=VALUE` or `--KEY VALUE`; URLs in every other argument are redacted. Only storage options: other keys
    that look like credentials (`batch.warmup_tokens`) are settings, and the ablation compares them."""

    def secret(key: str) -> bool:
        return key.startswith("--data.storage_options")

    out: list[str] = []
    for i, arg in enumerate(argv):
        key, eq, _ = arg.partition("=")
        if eq and secret(key):
            out.append(f"{key}={REDACTED}")
        elif i and "=" not in argv[i - 1] and secret(argv[i - 1]) and not arg.startswith("--"):
            out.append(REDACTED)
        else:
            out.append(redact_text(arg))
    return out


def _redacted(value: Any, by_key: bool) -> Any:
    """A copy of `value` (mappings and lists walked) with URLs in its strings redacted, and with `by_key`, every
    non-empty value under a key that names a credential replaced."""
    if isinstance(value, dict):
        return {k: (REDACTED if by_key and isinstance(k, str) and CREDENTIAL_KEY.search(k)
                    and v not in (None, "", {}, []) else _redacted(v, by_key)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_redacted(v, by_key) for v in value)
    if isinstance(value, str) and "://" in value:
        return redact_text(value)
    return value
