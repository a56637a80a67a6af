"""`make data`: the corpus, tokenized and packed into shards under `run_dir/data/<hash>/` (format: `shards.py`).

The directory is named by a hash of everything the shards depend on: the corpus (`Corpus.fingerprint()`), the
tokenizer (sha256 of tokenizer.json), the packing settings and the format. A rerun with the same inputs reuses
it and says so; any change makes a new directory, so shards never silently mismatch a config.

Steps, one split after the other (train, then valid):
    1) the tokenizer: trained first when `run_dir/tokenizer` has none (an existing one is used as it is);
    2) documents stream from the corpus, in `data.num_proc` encoding workers, through the packer, into a
       `ShardWriter` (temporary names, renamed when complete): `build.build_split`;
    3) the split's record, then `meta.json`, are written atomically. A rerun after a crash finds the splits
       whose record and files agree and redoes only the others; a `meta.json` that is not what they make
       (unreadable, damaged, edited) is written again, never trusted.

With `data.short_seq_len` set (BERT's length schedule), the same corpus is first prepared at that length too,
with the same tokenizer and packing: the short shards get their own hashed directory (reused like any other), and
the long shards' meta.json points to it as `"short": {"seq_len": 128, "meta": "../<hash>/meta.json"}` (relative
to meta.json's directory). The long directory does not depend on short_seq_len, so a RoBERTa run and a BERT run
of one packing share it; its `short` entry names the short shards of the last prepare that asked for them, and
the trainer checks that it matches the config.

With `data.num_shards` = N, run it N times (e.g. on N machines) with `data.shard_index` = 0 .. N-1 over the
same run_dir (a shared file system) or copy the slices' files together afterwards: each slice writes its own
files and `meta-0000k-of-0000N.json`, and the last to finish writes `meta.json`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import multiprocessing as mp
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .build import build_split, peak_rss_mb, valid_by_source
from .cli import naming
from .config import ExperimentConfig
from .corpus import Corpus
from .manifest import FORMAT, SPLITS, token_dtype
from .pack import PAIR_PACKINGS
from .shards import META, combine_parts, load_record, meta_name, stem
from .sources import mixture, short_label
from .tempfiles import exclusive, write_json_atomic
from .tokenizer import load_tokenizer, special_ids, tokenizer_dir
from .tokenizer_training import settings as tokenizer_settings
from .tokenizer_training import train_tokenizer

# How a sentence becomes tokens (see encode.py); part of the hash, so a change can never mix two conventions.
SENTENCE_ENCODING = "line; '\\n'+line after the first of a document; no specials; special text as text"


def settings(cfg: ExperimentConfig) -> dict[str, Any]:
    """What the shards depend on besides corpus and tokenizer. Not num_proc or shard_index: the shards of a
    slice do not depend on the number of workers, and all slices of a corpus share one directory."""
    d = cfg.data
    return {"format": FORMAT, "sentence_encoding": SENTENCE_ENCODING, "seq_len": d.seq_len,
            "packing": d.packing, "num_shards": d.num_shards, "seed": cfg.prep_seed,
            # only when set, so that shards prepared before the key existed keep their directory
            **({"short_seq_prob": d.short_seq_prob} if d.short_seq_prob else {}),
            **({"valid_by_source": True} if valid_by_source(cfg) else {})}



def data_dir(cfg: ExperimentConfig, corpus_fingerprint: str, tokenizer_sha256: str) -> Path:
    key = json.dumps({"corpus": corpus_fingerprint, "tokenizer": tokenizer_sha256, **settings(cfg)},
                     sort_keys=True)
    return cfg.run_path / "data" / hashlib.sha256(key.encode()).hexdigest()[:16]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def run_dir_lock(cfg: ExperimentConfig, log: Callable[[str], None] = print) -> Iterator[None]:
    """Holds `run_dir/.prepare.lock` while the tokenizer and shards are built or checked. Under torchrun every
    rank runs `make pretrain`: the first prepares, the others wait here and then find the data up to date,
    instead of writing the same files at once.

    Refused in a worker process that is importing the main script (a script without `if __name__ ==
    "__main__":`): it would wait here for its own parent forever; failing, it ends the parent's run with
    `workers.WorkerError` instead."""
    if getattr(mp.current_process(), "_inheriting", False):
        raise RuntimeError("data preparation was started while a worker process imported the main script: call it "
                           "under `if __name__ == \"__main__\":`")
    if cfg.run_path.exists() and not cfg.run_path.is_dir():  # mkdir would say "File exists"
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(cfg.run_path))
    cfg.run_path.mkdir(parents=True, exist_ok=True)
    lock = cfg.run_path / ".prepare.lock"
    with exclusive(lock, f"data: waiting for another process preparing {cfg.run_path} (holds {lock})", log):
        yield


def prepare_data(cfg: ExperimentConfig, force: bool = False, log: Callable[[str], None] = print) -> Path:
    """Build (or reuse) the experiment's shards; returns the path of their meta.json (of this slice's
    `meta-k-of-N.json` while other slices are missing). One process at a time per run_dir (`run_dir_lock`)."""
    with run_dir_lock(cfg, log):
        return _prepare_data(cfg, force, log)


def _prepare_data(cfg: ExperimentConfig, force: bool, log: Callable[[str], None]) -> Path:
    # 0) BERT's short phase first: its shards are then complete whenever the long ones' meta.json exists
    if cfg.data.short_seq_len:
        short_meta = _prepare_data(short_config(cfg), force, log).parent / META
    # 1) tokenizer and the content address
    tok_dir = tokenizer_dir(cfg)
    corpus = Corpus.of_experiment(cfg)
    fingerprint = corpus.fingerprint()
    if not (tok_dir / "tokenizer.json").is_file():
        train_tokenizer(cfg, log=log)
    elif _tokenizer_is_stale(tok_dir, cfg, fingerprint):
        log(f"data: warning: {tok_dir} was trained on another corpus or with other tokenizer settings; using it "
            "as it is (`make tokenizer ARGS=--force` retrains it)")
    tok = load_tokenizer(tok_dir)
    tok_sha = sha256_file(tok_dir / "tokenizer.json")
    out = data_dir(cfg, fingerprint, tok_sha)
    d = cfg.data
    part_path = out / meta_name(d.shard_index, d.num_shards)
    names = {split: stem(split, d.shard_index, d.num_shards) for split in SPLITS}
    # where the short shards are, relative to this directory, so a run_dir can move
    short = {"seq_len": d.short_seq_len, "meta": os.path.relpath(short_meta, out)} if d.short_seq_len else None

    vocab_size = tok.get_vocab_size()
    dtype = token_dtype(vocab_size)
    ids = special_ids(tok)
    complete = {split: load_record(out, names[split]) for split in SPLITS}
    if not force and part_path.is_file() and all(complete.values()):
        expected = _meta(cfg, dtype, vocab_size, ids, tok_sha, fingerprint, complete)  # type: ignore[arg-type]
        found, problem = _read_own_meta(part_path, expected)
        if problem is None:
            log(f"data: {out} is up to date for this corpus, tokenizer and packing settings "
                "(delete it or pass --force to rebuild)")
            if short and found.get("short") != short:  # point reused shards at this config's short shards
                with naming(part_path):
                    write_json_atomic(part_path, {**found, "short": short})
            return _finish_slices(out, part_path, d.num_shards, log)
        log(f"data: {part_path} {problem}; its splits are complete, so it is written again")

    # 2) each split that is not complete yet
    records = {}
    for split in SPLITS:
        record = None if force else complete[split]
        if record is not None:
            log(f"data: {split}: reusing the complete {out / names[split]}.* from an earlier run")
        else:
            record = build_split(cfg, corpus, split, tok_dir / "tokenizer.json", out, names[split], dtype,
                                 ids, log, tok=tok)
        records[split] = record

    # 3) metadata, last and atomically
    meta = {**_meta(cfg, dtype, vocab_size, ids, tok_sha, fingerprint, records), **({"short": short} if short else {})}
    with naming(part_path):
        write_json_atomic(part_path, meta)
    log(format_report(meta, out))
    return _finish_slices(out, part_path, d.num_shards, log)


def _meta(cfg: ExperimentConfig, dtype: Any, vocab_size: int, ids: dict[str, int], tok_sha: str,
          fingerprint: str, records: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """This slice's meta.json, all but the `short` entry (which a later config may repoint)."""
    d = cfg.data
    counts = records["train"].get("sources")  # absent from split records written before sources were counted
    table = {"sources": mixture(source_entries(cfg), counts)} if counts else {}
    return {
        "format": FORMAT,
        "dtype": dtype.name,
        "vocab_size": vocab_size,
        "seq_len": d.seq_len,
        "packing": d.packing,
        "special_ids": ids,
        "tokenizer_sha256": tok_sha,
        "corpus_fingerprint": fingerprint,
        "sentence_encoding": SENTENCE_ENCODING,
        "settings": settings(cfg),
        "shard_index": d.shard_index,
        "num_shards": d.num_shards,
        "splits": records,
        **table,
    }


def source_entries(cfg: ExperimentConfig) -> list[dict[str, Any]]:
    """What meta.json says of each train source besides its counts."""
    return [{"name": s.label, "path": s.path, "weight": s.weight} for s in cfg.corpus.sources]


def _read_own_meta(path: Path, expected: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """(meta.json, None) when it is what this prepare would write beside these split records; else (_, what is
    wrong with it): unreadable, not JSON, or differing keys (a damaged, hand-edited or foreign file)."""
    try:
        found = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return {}, f"is unreadable ({type(e).__name__}: {e})"
    if not isinstance(found, dict):
        return {}, f"is not a JSON object ({type(found).__name__})"
    differ = [k for k, v in json.loads(json.dumps(expected)).items() if found.get(k) != v]
    if differ:
        return found, f"does not describe the shards beside it ({', '.join(differ)} differ)"
    return found, None


def short_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The experiment as its short phase sees it: everything equal but the block length."""
    d = cfg.data
    return dataclasses.replace(cfg, data=dataclasses.replace(d, seq_len=d.short_seq_len, short_seq_len=0))


def _tokenizer_is_stale(tok_dir: Path, cfg: ExperimentConfig, corpus_fingerprint: str) -> bool:
    try:
        trained_for = json.loads((tok_dir / "quality.json").read_text())["fingerprint"]
    except (OSError, ValueError, KeyError):
        return False  # not trained here (e.g. copied from a Hugging Face model): nothing to compare
    return trained_for != {"corpus": corpus_fingerprint, **tokenizer_settings(cfg)}


def _finish_slices(out: Path, part_path: Path, num_shards: int, log: Callable[[str], None]) -> Path:
    """With slices: write meta.json once every slice is there."""
    if num_shards == 1:
        return part_path
    meta = combine_parts(out)
    if meta is None:
        done = len(list(out.glob(f"meta-*-of-{num_shards:05d}.json")))
        log(f"data: {done} of {num_shards} slices are done; the last one to finish writes {out / META}")
        return part_path
    with naming(out / META):
        write_json_atomic(out / META, meta)
    log(f"data: all {num_shards} slices are done: {out / META}")
    return out / META


def format_report(meta: dict[str, Any], out: Path) -> str:
    lines = [f"data: wrote {out} ({meta['packing']}, seq_len {meta['seq_len']}, {meta['dtype']})",
             f"  {'split':6} {'documents':>10} {'sentences':>11} {'blocks':>10} {'tokens':>13} {'padding':>8} "
             f"{'MB read':>8} {'seconds':>8} {'MB/s':>6}"]
    for split, r in meta["splits"].items():
        mb = r["bytes_read"] / 1e6
        lines.append(f"  {split:6} {r['documents']:>10,} {r['sentences']:>11,} {r['num_blocks']:>10,} "
                     f"{r['num_tokens']:>13,} {r['padding_fraction']:>8.2%} {mb:>8.1f} {r['seconds']:>8.1f} "
                     f"{mb / max(r['seconds'], 1e-9):>6.1f}")
        if meta["packing"] in PAIR_PACKINGS:
            lost = r["stream_tokens"] - r["packed_tokens"]
            lines.append(f"         pairs: truncation dropped {lost:,} of {r['stream_tokens']:,} tokens; random B "
                         f"segments repeat {r.get('copied_tokens', 0):,} tokens of other documents")
    if len(meta.get("sources", [])) > 1 or any(s["weight"] != 1 for s in meta.get("sources", [])):
        lines.append(f"  {'train source':24} {'weight':>6} {'documents':>10} {'MB':>8} {'tokens':>13} {'share':>7}")
        for s in meta["sources"]:
            lines.append(f"  {short_label(s['name']):24} {s['weight']:>6g} {s['documents']:>10,} {s['bytes'] / 1e6:>8.1f} "
                         f"{s['tokens']:>13,} {s['share']:>7.2%}")
    worker = max((r.get("worker_peak_rss_mb", 0) for r in meta["splits"].values()), default=0)
    lines.append(f"  peak memory  {peak_rss_mb():.0f} MB (this process)"
                 + (f", {worker:.0f} MB (largest tokenizer worker)" if worker else ""))
    lines.append(f"  read with    data_prep.shards.open_split('{out / META}', 'train')")
    return "\n".join(lines)
