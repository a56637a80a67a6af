"""One reader per corpus format, each streaming documents (lists of sentences) and counting what it decoded.

A *document* is a list of non-empty lines; each line is one *sentence* (the unit FULL-SENTENCES packing keeps
whole). Formats (`read_source` takes one resolved source, see specs.py):

- `.txt` (documents separated by blank lines), `.jsonl` and `.parquet` (one document per record, the
  `text_field` split into lines), each optionally gzip-compressed (`.gz`);
- `hf:NAME[/CONFIG][:SPLIT]`: a `datasets` dataset, streamed from the hub, or a local folder (a `save_to_disk`
  directory, a folder of data files);
- `builtin:python-docs`: the embedded default corpus (see `default_corpus.py`).

Memory stays constant whatever the corpus size: files are read line by line, lines longer than
`max_line_bytes` are cut into pieces, Parquet is read in record batches and hub datasets are streamed.
Invalid UTF-8 is replaced (U+FFFD) and counted, and so is a lone surrogate (a JSON escape `\ud800` without its
pair: text no UTF-8 can hold); NUL bytes are dropped and counted. A file that cannot be read as its format
(damaged gzip, JSON nested too deeply for the parser, a Parquet text column that holds numbers) is a
`CorpusError` naming the file and the line or row.

Apart from corpus.py (which documents of which split) so that each format reads on its own; `CorpusError` and
`CorpusStats` live here, at the bottom, because every reader raises and fills them.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import re
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
GZIP_ERRORS = (gzip.BadGzipFile, EOFError, zlib.error)  # damaged, truncated, damaged deflate data


class CorpusError(ValueError):
    """A problem with the corpus: the message names the file or source at fault."""


@dataclass
class CorpusStats:
    """What a pass over the corpus saw; filled in while documents are yielded."""

    documents: int = 0
    sentences: int = 0
    bytes: int = 0
    replaced_bytes: int = 0  # invalid UTF-8 bytes, each run replaced by U+FFFD; lone surrogates, one each
    nul_bytes: int = 0  # NUL bytes dropped
    split_lines: int = 0  # lines longer than max_line_bytes, cut into pieces

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------------------
# Decoding: never fatal, always counted


def decode_line(raw: bytes, stats: CorpusStats) -> str:
    """UTF-8 decode with U+FFFD for invalid bytes (same result as errors="replace"), counting what was replaced."""
    if b"\x00" in raw:
        stats.nul_bytes += raw.count(b"\x00")
        raw = raw.replace(b"\x00", b"")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    parts, pos = [], 0
    while True:
        try:
            parts.append(raw[pos:].decode("utf-8"))
            return "".join(parts)
        except UnicodeDecodeError as e:
            parts.append(raw[pos : pos + e.start].decode("utf-8") + "\ufffd")
            stats.replaced_bytes += e.end - e.start
            pos += e.end


def _clean_text(text: str, stats: CorpusStats) -> str:
    if "\x00" in text:
        stats.nul_bytes += text.count("\x00")
        text = text.replace("\x00", "")
    return text


_SURROGATE = re.compile("[\ud800-\udfff]")


def _without_surrogates(text: str, stats: CorpusStats) -> str:
    """`text` with each lone surrogate (JSON's `"\\ud800"` decodes to one; a pair decodes to its character) replaced
    by U+FFFD and counted: no UTF-8 holds it, so the tokenizer could not encode the text."""
    text, n = _SURROGATE.subn("\ufffd", text)
    stats.replaced_bytes += n
    return text


def _utf8_size(text: str, stats: CorpusStats) -> tuple[str, int]:
    """(`text` without lone surrogates, its size in UTF-8); the encode that measures it finds them for free."""
    try:
        return text, len(text.encode("utf-8"))
    except UnicodeEncodeError:
        text = _without_surrogates(text, stats)
        return text, len(text.encode("utf-8"))


def _read_lines(f: BinaryIO, max_bytes: int, stats: CorpusStats) -> Iterator[tuple[bytes, bool]]:
    """(line, complete) without the newline; a line longer than `max_bytes` comes out in pieces cut at UTF-8
    boundaries, all but the last with complete=False."""
    carry = b""
    in_long_line = False
    while True:
        chunk = f.readline(max_bytes - len(carry))
        if not chunk:
            if carry:
                yield carry, True
            return
        chunk = carry + chunk
        carry = b""
        if chunk.endswith(b"\n"):
            in_long_line = False
            yield chunk.rstrip(b"\r\n"), True
            continue
        if len(chunk) < max_bytes:  # the file ends without a newline
            yield chunk, True
            continue
        # A piece of an overlong line: back off to a character boundary so no character is split.
        if not in_long_line:
            stats.split_lines += 1
            in_long_line = True
        cut = len(chunk)
        i = cut - 1
        while i >= max(0, cut - 3) and (chunk[i] & 0xC0) == 0x80:  # continuation bytes
            i -= 1
        if i >= 0 and chunk[i] >= 0xC0:  # lead byte: is its character complete?
            need = 2 if chunk[i] < 0xE0 else 3 if chunk[i] < 0xF0 else 4
            if cut - i < need:
                cut = i
        carry = chunk[cut:]
        yield chunk[:cut], False


def _open_binary(path: Path) -> BinaryIO:
    if path.suffix == ".gz":
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


def base_suffix(path: Path) -> str:
    return Path(path.stem).suffix if path.suffix == ".gz" else path.suffix


# ---------------------------------------------------------------------------------------------------------------
# Readers, one per format; each yields documents and updates stats.bytes / decoding counters.


def _text_to_document(text: str, max_bytes: int, stats: CorpusStats) -> list[str]:
    doc = []
    for line in _clean_text(text, stats).splitlines():
        line = line.rstrip()
        if not line.strip():
            continue
        if len(line) * 4 > max_bytes and len(line.encode("utf-8")) > max_bytes:
            stats.split_lines += 1
            raw = line.encode("utf-8")
            for piece, _ in _read_lines(io.BytesIO(raw), max_bytes, CorpusStats()):
                doc.append(piece.decode("utf-8"))
        else:
            doc.append(line)
    return doc


def _read_txt(path: Path, max_bytes: int, stats: CorpusStats, block: int = 1 << 20) -> Iterator[list[str]]:
    """Documents of a .txt file, a block at a time, each decoded whole where it can be (no NUL, valid UTF-8, no
    line of max_bytes or more), else line by line (`add`): the same lines and counts either way, bytes included."""
    lines, doc, carry = 0, [], b""

    def add(raw: bytes, complete: bool) -> list[str] | None:  # one line; returns the document it ends
        nonlocal lines, doc
        lines += complete
        stats.bytes += len(raw) + complete
        line = decode_line(raw, stats)
        if complete:  # trailing whitespace of a line goes; inside an overlong line nothing is dropped
            line = line.rstrip()
        if line.strip():
            doc.append(line)
        elif doc:
            done, doc = doc, []
            return done
        return None

    with _open_binary(path) as f, _gzip_damage(path, lambda: lines):
        while data := f.read1(block):  # one read of the file at most: a damaged .gz fails after the lines before it
            data = carry + data
            body, carry = data[: (cut := data.rfind(b"\n") + 1)], data[cut:]
            newlines, text = np.flatnonzero(np.frombuffer(body, np.uint8) == 10), None
            if b"\x00" not in body and np.diff(newlines, prepend=-1).max(initial=0) <= max_bytes:
                with contextlib.suppress(UnicodeDecodeError):  # invalid UTF-8: line by line (counted)
                    text = body.decode("utf-8")
            if text is None:  # an overlong line in the pieces `_read_lines` cuts
                for raw in body.split(b"\n")[:-1]:
                    pieces = [(raw.rstrip(b"\r\n"), True)] if len(raw) < max_bytes else \
                        _read_lines(io.BytesIO(raw + b"\n"), max_bytes, stats)
                    yield from filter(None, (add(*piece) for piece in pieces))
            else:  # bytes as `add` counts them: each line without its trailing "\r"s, plus one
                cr = [len(raw) - len(raw.rstrip(b"\r")) for raw in body.split(b"\n")[:-1]] if b"\r\n" in body else 0
                base, ends = stats.bytes, (newlines + 1 - np.cumsum(cr)).tolist()
                for i, line in enumerate(text.split("\n")[:-1]):
                    if line := line.rstrip():
                        doc.append(line)
                    elif doc:
                        stats.bytes, done, doc = base + ends[i], doc, []
                        yield done
                lines, stats.bytes = lines + len(ends), base + (ends[-1] if ends else 0)
            if len(carry) >= max_bytes:  # an overlong line in the making: read on to its end line by line
                yield from filter(None, (add(*piece) for piece in _read_lines(_Prefixed(carry, f), max_bytes, stats)))
                carry = b""
        if carry and (done := add(carry, True)) is not None:  # the last line, without a newline
            yield done
        if doc:
            yield doc


class _Prefixed:
    """One line, as `readline` gives it: `prefix` (holding no newline), then the file `f` up to its next newline."""

    def __init__(self, prefix: bytes, f: BinaryIO):
        self.prefix, self.f, self.ended = prefix, f, False

    def readline(self, n: int) -> bytes:
        head, self.prefix = self.prefix[:n], self.prefix[n:]
        line = b"" if self.ended else head + self.f.readline(n - len(head)) if len(head) < n else head
        self.ended = line.endswith(b"\n")
        return line


def _read_jsonl(path: Path, text_field: str, max_bytes: int, stats: CorpusStats) -> Iterator[list[str]]:
    lineno = 0
    with _open_binary(path) as f, _gzip_damage(path, lambda: lineno):
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            stats.bytes += len(raw)
            try:
                record = json.loads(decode_line(raw, stats))
            except json.JSONDecodeError as e:
                raise CorpusError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            except RecursionError:  # the parser recurses per level: [[[[... a million deep
                raise CorpusError(f"{path}:{lineno}: JSON nested too deeply to read (a damaged or hostile line); "
                                  "remove the line") from None
            text = _field(record, text_field, f"{path}:{lineno}")
            if b"\\u" in raw:  # only a \u escape makes a lone surrogate
                text = _without_surrogates(text, stats)
            doc = _text_to_document(text, max_bytes, stats)
            if doc:
                yield doc


def _field(record: Any, text_field: str, where: str) -> str:
    if not isinstance(record, dict) or text_field not in record:
        keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
        raise CorpusError(f"{where}: no field {text_field!r} (has: {keys}); set corpus.text_field")
    text = record[text_field]
    if text is None:
        return ""
    if not isinstance(text, str):
        raise CorpusError(f"{where}: field {text_field!r} is {type(text).__name__}, not text")
    return text


def _read_parquet(path: Path, text_field: str, max_bytes: int, stats: CorpusStats) -> Iterator[list[str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(gzip.open(path, "rb") if path.suffix == ".gz" else path)
    except Exception as e:  # pyarrow raises several types for a file that is not Parquet
        raise CorpusError(f"{path}: not a readable Parquet file ({e})") from None
    if text_field not in pf.schema_arrow.names:
        raise CorpusError(
            f"{path}: no column {text_field!r} (has: {', '.join(pf.schema_arrow.names)}); set corpus.text_field"
        )
    kind = pf.schema_arrow.field(text_field).type
    if not _is_text(kind):
        text_columns = [f.name for f in pf.schema_arrow if _is_text(f.type)]
        raise CorpusError(f"{path}: column {text_field!r} holds {kind}, not text; set corpus.text_field to a text "
                          f"column (has: {', '.join(text_columns) or 'none'})")
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=1024, columns=[text_field]):
            for text in batch.column(0).to_pylist():
                row += 1
                if not text:
                    continue
                text, size = _utf8_size(text, stats)
                stats.bytes += size
                doc = _text_to_document(text, max_bytes, stats)
                if doc:
                    yield doc
    except pa.ArrowException as e:  # a damaged page or column chunk
        raise CorpusError(f"{path}: damaged Parquet data after row {row} ({e})") from None


def _is_text(kind: Any) -> bool:
    """A Parquet column type whose values `to_pylist` gives as str (or None)."""
    import pyarrow as pa

    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind) or (
        hasattr(pa.types, "is_string_view") and pa.types.is_string_view(kind))


def _read_datasets(spec: str, text_field: str, max_bytes: int, stats: CorpusStats) -> Iterator[list[str]]:
    """`hf:NAME[/CONFIG][:SPLIT]`, streamed (`load_dataset(..., streaming=True)`: records are read as they
    are needed, nothing is converted to Arrow or kept in the datasets cache). NAME may also be a local directory:
    a `save_to_disk` directory (already Arrow, read from disk), or a folder of data files / a clone of a dataset
    repository, streamed exactly as the hub would stream it."""
    import datasets

    body = spec[len("hf:") :]
    name, _, split = body.partition(":")
    split = split or "train"
    local = Path(name)
    if local.is_dir() and _saved_to_disk(local):
        try:
            ds = datasets.load_from_disk(name)
        except Exception as e:
            raise CorpusError(f"{spec}: not a `datasets` directory ({e})") from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise CorpusError(f"{spec}: no split {split!r} (has: {', '.join(ds)})")
            ds = ds[split]
        records: Iterable[dict[str, Any]] = ds.to_iterable_dataset()
        columns = ds.column_names
    else:
        if local.is_dir():
            path, config = name, ""
        else:
            # NAME/CONFIG as in `load_dataset(NAME, CONFIG)`; a hub name with an owner is owner/name/config.
            parts = name.split("/")
            path, config = ("/".join(parts[:2]), "/".join(parts[2:])) if len(parts) > 2 else (parts[0], "/".join(parts[1:]))
        try:
            ds = datasets.load_dataset(path, config or None, split=split, streaming=True)
        except Exception as e:
            where = "from its files" if local.is_dir() else "from the hub"
            raise CorpusError(f"{spec}: cannot load {where} ({type(e).__name__}: {e})") from None
        records = ds
        columns = list(ds.column_names or [])
    if columns and text_field not in columns:
        raise CorpusError(f"{spec}: no column {text_field!r} (has: {', '.join(columns)}); set corpus.text_field")
    for i, record in enumerate(records):
        text, size = _utf8_size(_field(record, text_field, f"{spec} record {i}"), stats)
        stats.bytes += size
        doc = _text_to_document(text, max_bytes, stats)
        if doc:
            yield doc


def _saved_to_disk(directory: Path) -> bool:
    """A directory `Dataset.save_to_disk` / `DatasetDict.save_to_disk` wrote."""
    return (directory / "state.json").is_file() or (directory / "dataset_dict.json").is_file()


def read_source(source: str, text_field: str, max_bytes: int, stats: CorpusStats) -> Iterator[list[str]]:
    """Documents of one resolved source."""
    if source.startswith("hf:"):
        yield from _read_datasets(source, text_field, max_bytes, stats)
        return
    if source == "builtin:python-docs":
        from .default_corpus import python_docs_path

        source = str(python_docs_path())
    path = Path(source)
    suffix = base_suffix(path)
    with _gzip_damage(path):
        if suffix == ".txt":
            yield from _read_txt(path, max_bytes, stats)
        elif suffix in (".jsonl", ".json"):
            yield from _read_jsonl(path, text_field, max_bytes, stats)
        else:
            yield from _read_parquet(path, text_field, max_bytes, stats)


@contextlib.contextmanager
def _gzip_damage(path: Path, lines_read: Callable[[], int] | None = None) -> Iterator[None]:
    """A damaged or truncated .gz (bad header, damaged deflate data, a CRC or length that does not match, an end
    before its end) as one CorpusError naming the file, and the lines read before it when known."""
    try:
        yield
    except GZIP_ERRORS as e:
        at = "" if lines_read is None else f" after line {lines_read()}" if lines_read() else " at its start"
        raise CorpusError(f"{path}: corrupt gzip file{at} ({type(e).__name__}: {e}); replace the file "
                          "(`gzip -t` checks one)") from None
