"""A run's tokenizer: RoBERTa's byte-level BPE in Hugging Face's layout; how it is built, loaded, saved, measured.

Special tokens have fixed ids, as in RoBERTa: `<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3 and `<mask>` the last id.
Byte-level BPE has 256 byte symbols in its alphabet, so no text ever maps to `<unk>` and every string decodes
back exactly. The post-processor wraps inputs as `<s> A </s>` and `<s> A </s></s> B </s>`.

Written to `run_dir/tokenizer/`: `tokenizer.json` (the `tokenizers` pipeline), `vocab.json` + `merges.txt` (the
BPE model, what the Python `RobertaTokenizer` reads), `tokenizer_config.json` and `special_tokens_map.json`
(what `transformers.AutoTokenizer` reads), and `quality.json` (the training report, plus the fingerprint of the
corpus and settings it was trained from, used to skip retraining).

Training from the corpus is tokenizer_training.py (`train_tokenizer`, `make tokenizer`); continued pretraining
(`model.init_from`) takes a pretrained model's tokenizer instead, in tokenizer_hf.py. Both write through `install`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from .config import ExperimentConfig

SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")  # ids 0..3; <mask> is added last
MASK = "<mask>"
FORMAT_VERSION = 2  # 2: trained on whole documents, newlines included (was: line by line)
FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
RESAVE = "save it again with the fast tokenizer's `save_pretrained(DIR)`"  # the fix for a tokenizer one brought


class TokenizerError(ValueError):
    """A missing or unusable tokenizer directory."""


def tokenizer_dir(cfg: ExperimentConfig) -> Path:
    return cfg.run_path / "tokenizer"


def special_ids(tok: Tokenizer) -> dict[str, int]:
    ids = {name: tok.token_to_id(t) for name, t in zip(("bos", "pad", "eos", "unk"), SPECIALS, strict=True)}
    ids["mask"] = tok.token_to_id(MASK)
    return ids


def load_tokenizer(directory: str | Path, fix: str = "delete it and run `make tokenizer` again") -> Tokenizer:
    """The tokenizer of `directory`/tokenizer.json, checked for RoBERTa's special ids; a missing, damaged or foreign
    file is a TokenizerError naming it and `fix` (for a file the user brought, say how to make it again)."""
    path = Path(directory) / "tokenizer.json"
    if not path.is_file():
        raise TokenizerError(f"{path} does not exist: run `make tokenizer` first")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # `tokenizers` raises a plain Exception for any file it cannot parse
        if (error := _os_error(e, path)) is not None:
            raise error from None  # unreadable, not damaged: the operating system's one line
        raise TokenizerError(f"{path}: not a tokenizer file ({_first_line(e)}); {fix}") from None
    ids = special_ids(tok)
    if ids["bos"] != 0 or ids["pad"] != 1 or ids["eos"] != 2 or ids["unk"] != 3 or ids["mask"] is None:
        raise TokenizerError(f"{path}: special tokens are not RoBERTa's (<s>=0, <pad>=1, </s>=2, <unk>=3, <mask>)")
    return tok


def build_untrained() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def finalize(tok: Tokenizer) -> Tokenizer:
    """Add `<mask>` as the last id and RoBERTa's post-processor."""
    tok.add_special_tokens([AddedToken(MASK, lstrip=True, rstrip=False, normalized=False, special=True)])
    # positional: the second argument is named `cls` in some `tokenizers` releases and `cls_token` in others
    tok.post_processor = processors.RobertaProcessing(
        ("</s>", tok.token_to_id("</s>")), ("<s>", tok.token_to_id("<s>")), True, False
    )
    return tok



def document_texts(docs: Iterator[list[str]], size: int) -> Iterator[str]:
    """Each document as the shards encode it: its lines joined by "\n" (data_prep/encode.py encodes every line
    after a document's first as "\n" + line). A document longer than `size` characters comes in pieces cut
    between lines, so no item is larger than about `size` + one line (lines are at most max_line_bytes)."""
    for doc in docs:
        piece: list[str] = []
        chars = 0
        for line in doc:
            piece.append(line)
            chars += len(line) + 1
            if chars >= size:
                yield "\n".join(piece)
                piece, chars = [], 0
        if piece:
            yield "\n".join(piece)



def install(tok: Tokenizer, report: dict[str, Any], out: Path, model_max_length: int) -> None:
    """Write the tokenizer into a fresh directory beside `out`, every file flushed to disk, and swap it in: `out`
    is then complete or absent (or the old one), whatever stops the write (a full disk, a kill, a power cut). A
    failed write removes the fresh directory and keeps the old one."""
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save(tok, tmp, model_max_length=model_max_length)
        _write_file(tmp / "quality.json", json.dumps(report, indent=2) + "\n")  # last: up to date (`up_to_date`)
        _fsync(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(out.name + f".old{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    _fsync(out.parent)


_OS_ERROR = re.compile(r"\(os error (\d+)\)$")  # how Rust's std::io::Error ends its message


def _os_error(e: Exception, path: Path) -> OSError | None:
    """`tokenizers`' plain Exception for a failed read or write ("No space left on device (os error 28)") as the
    OSError (naming `path`) that Python's own I/O would raise; None when it is no OS error."""
    m = _OS_ERROR.search(str(e))
    return OSError(int(m[1]), os.strerror(int(m[1])), str(path)) if m else None


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _rust_write(path: Path, write: Callable[[], Any]) -> None:
    """A `tokenizers` save; its OS errors become OSErrors naming `path`, so the command ends with one line."""
    try:
        write()
    except Exception as e:
        if (error := _os_error(e, path)) is None:
            raise
        raise error from None


def _write_file(path: Path, text: str) -> None:
    """`text` into `path`, flushed to disk; a failed write names the file (a Python `write()` error does not)."""
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        if e.filename is None:
            e.filename = str(path)
        raise


def _fsync(path: Path) -> None:
    """Flush a directory's files (`tokenizers` writes without fsync) and then its entries to disk."""
    try:
        for p in [*path.iterdir(), path] if path.is_dir() else [path]:
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    except OSError as e:
        if e.filename is None:
            e.filename = str(path)
        raise



def up_to_date(out: Path, key: str, fingerprint: dict[str, Any]) -> bool:
    """All files present and quality.json records `fingerprint` under `key`; a damaged quality.json is not."""
    report = out / "quality.json"
    if not report.is_file() or not all((out / f).is_file() for f in FILES):
        return False
    try:
        found = json.loads(report.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError):
        return False
    return isinstance(found, dict) and found.get(key) == fingerprint


def save(tok: Tokenizer, directory: Path, model_max_length: int) -> None:
    """Write the five files `transformers` needs to load this as a RoBERTa tokenizer offline."""
    directory.mkdir(parents=True, exist_ok=True)
    _rust_write(directory / "tokenizer.json", lambda: tok.save(str(directory / "tokenizer.json")))
    _rust_write(directory / "vocab.json", lambda: tok.model.save(str(directory)))  # and merges.txt
    mask = {"content": MASK, "lstrip": True, "rstrip": False, "normalized": False, "single_word": False,
            "special": True}
    special_map = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "sep_token": "</s>",
                   "pad_token": "<pad>", "cls_token": "<s>", "mask_token": mask}
    added = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "rstrip": False, "normalized": False,
                                       "single_word": False, "special": True} for t in SPECIALS}
    added[str(tok.token_to_id(MASK))] = mask
    config = {
        "tokenizer_class": "RobertaTokenizer",
        "add_prefix_space": False,
        "trim_offsets": True,
        "errors": "replace",
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": added,
        **special_map,
        "mask_token": MASK,  # a plain string here; its lstrip lives in tokenizer.json and added_tokens_decoder
    }
    _write_file(directory / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
    _write_file(directory / "special_tokens_map.json", json.dumps(special_map, indent=2) + "\n")


def evaluate(tok: Tokenizer, docs: Iterator[list[str]], max_bytes: int = 4_000_000) -> dict[str, Any]:
    """Bytes per token, tokens per word and the share of text that decodes back exactly, on the first
    `max_bytes` of validation documents as the shards encode them (lines joined by "\n")."""
    n_bytes = n_tokens = n_words = exact_bytes = 0
    texts: list[str] = []
    total = 0
    for text in document_texts(docs, 1 << 20):
        texts.append(text)
        total += len(text)
        if total >= max_bytes:
            break
    for start in range(0, len(texts), 64):
        batch = texts[start : start + 64]
        encs = tok.encode_batch(batch, add_special_tokens=False)
        decoded = tok.decode_batch([e.ids for e in encs], skip_special_tokens=False)
        for text, enc, back in zip(batch, encs, decoded, strict=True):
            size = len(text.encode("utf-8"))
            n_bytes += size
            n_tokens += len(enc.ids)
            n_words += len(text.split())
            exact_bytes += size if back == text else 0
    return {
        "valid_bytes": n_bytes,
        "bytes_per_token": round(n_bytes / max(n_tokens, 1), 3),
        "tokens_per_word": round(n_tokens / max(n_words, 1), 3),
        "exact_roundtrip": round(exact_bytes / max(n_bytes, 1), 6) if n_bytes else None,
    }
