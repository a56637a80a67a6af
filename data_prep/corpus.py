"""Stream documents (lists of sentences) from text files, JSON lines, Parquet, `datasets` and the embedded corpus.

A *document* is a list of non-empty lines; each line is one *sentence* (the unit FULL-SENTENCES packing keeps
whole). Sources:

- `.txt` (documents separated by blank lines), `.jsonl` and `.parquet` (one document per record, the
  `text_field` split into lines), each optionally gzip-compressed (`.gz`);
- directories (searched recursively) and globs of those files, in sorted order, never the run's own outputs (a
  glob `data/**/*.txt` with the run_dir under data/ would otherwise train on its tokenizer's merges.txt);
- `hf:NAME[/CONFIG][:SPLIT]`: a `datasets` dataset, streamed from the hub, or a local folder (a `save_to_disk`
  directory, a folder of data files); a spec that is neither an existing folder nor a name in the hub's grammar
  is refused before any request (a missing `./dir` would be looked up on the hub);
- `builtin:python-docs`: the embedded default corpus (see `default_corpus.py`).

Memory stays constant whatever the corpus size: files are read line by line, lines longer than
`max_line_bytes` are cut into pieces, Parquet is read in record batches and hub datasets are streamed.
Invalid UTF-8 is replaced (U+FFFD) and counted, and so is a lone surrogate (a JSON escape `\ud800` without its
pair: text no UTF-8 can hold); NUL bytes are dropped and counted. A file that cannot be read as its format
(damaged gzip, JSON nested too deeply for the parser, a Parquet text column that holds numbers) is a
`CorpusError` naming the file and the line or row.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import gzip
import hashlib
import io
import json
import math
import os
import re
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal, NamedTuple

from .config import CorpusConfig, ExperimentConfig

TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
Split = Literal["train", "valid"]
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


def _base_suffix(path: Path) -> str:
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


def _read_txt(path: Path, max_bytes: int, stats: CorpusStats) -> Iterator[list[str]]:
    lines = 0
    with _open_binary(path) as f, _gzip_damage(path, lambda: lines):
        doc: list[str] = []
        for raw, complete in _read_lines(f, max_bytes, stats):
            lines += complete
            stats.bytes += len(raw) + complete
            line = decode_line(raw, stats)
            if complete:  # trailing whitespace of a line goes; inside an overlong line nothing is dropped
                line = line.rstrip()
            if line.strip():
                doc.append(line)
            elif doc:
                yield doc
                doc = []
        if doc:
            yield doc


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


# ---------------------------------------------------------------------------------------------------------------
# Source resolution


def resolve_sources(specs: list[str], key: str = "corpus.train", exclude: Iterable[str | Path] = ()) -> list[str]:
    """Expand globs and directories into a sorted list of files, leaving out every file under a directory of
    `exclude` (the run's own outputs: `Corpus.of_experiment`); hf: specs are checked (`check_hf_spec`),
    builtin: specs pass through. A file named explicitly is taken wherever it is."""
    out: list[str] = []
    given = [os.path.abspath(os.path.expanduser(d)) for d in exclude]
    roots = [os.path.realpath(d) for d in given]
    outside = f" outside this run's outputs ({', '.join(roots)})" if roots else ""
    prefixes = tuple(set(given + roots))
    real_dirs = functools.lru_cache(maxsize=4096)(os.path.realpath)  # one resolve per directory, not per file

    def mine(f: Path) -> bool:
        if not roots:
            return False
        path = os.path.abspath(f)
        real = os.path.join(real_dirs(os.path.dirname(path)), f.name)  # under a root through a symlink, too
        return any(p == r or p.startswith(r + os.sep) for p in (path, real) for r in prefixes)

    for spec in specs:
        if spec.startswith("hf:"):
            out.append(check_hf_spec(spec, key))
            continue
        if spec.startswith("builtin:"):
            if spec != "builtin:python-docs":
                raise CorpusError(f"{key}: unknown built-in corpus {spec!r} (known: builtin:python-docs)")
            out.append(spec)
            continue
        p = Path(os.path.expanduser(spec))
        if p.is_dir():
            files = sorted(
                str(f) for f in p.rglob("*") if f.is_file() and _base_suffix(f) in TEXT_SUFFIXES and not mine(f)
            )
            if not files:
                raise CorpusError(f"{key}: directory {spec} holds no .txt, .jsonl or .parquet files{outside}")
            out.extend(files)
        elif any(c in spec for c in "*?["):
            files = sorted(f for f in glob.glob(os.path.expanduser(spec), recursive=True)
                           if Path(f).is_file() and not mine(Path(f)))
            if not files:
                raise CorpusError(f"{key}: no file matches {spec}{outside}")
            out.extend(files)
        elif p.is_file():
            if _base_suffix(p) not in TEXT_SUFFIXES:
                raise CorpusError(f"{key}: {spec} is not a .txt, .jsonl or .parquet file (optionally .gz)")
            out.append(str(p))
        else:
            raise CorpusError(f"{key}: {spec} does not exist")
    return out


_HF_CONFIG = re.compile(r"[\w.+=-]*\w[\w.+=-]*")  # a `datasets` config name: wikitext-103-raw-v1, 20231101.en


def check_hf_spec(spec: str, key: str = "corpus.train") -> str:
    """`hf:NAME[/CONFIG][:SPLIT]` as `read_source` takes it (a local folder's `~` expanded), once NAME is an
    existing folder or a hub dataset in the hub's grammar (`NAME`, `NAME/CONFIG`, `OWNER/NAME/CONFIG`). Anything
    else is refused here, offline: `datasets` would look a missing relative folder up on the hub, and took
    `hf:/abs/missing` for the dataset "/abs" with the config "missing" (a scan of a foreign directory)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    name, colon, split = spec[len("hf:") :].partition(":")
    local = Path(name).expanduser()
    if name and local.is_dir():
        return f"hf:{local}{colon}{split}"
    parts = name.split("/")
    repo, config = ("/".join(parts[:2]), parts[2:]) if len(parts) > 2 else (parts[0], parts[1:])
    try:
        validate_repo_id(repo)
        hub = len(parts) <= 3 and all(_HF_CONFIG.fullmatch(c) for c in config)
    except HFValidationError:
        hub = False
    if hub:
        return spec
    if name.startswith(("/", ".", "~")) or "\\" in name:
        raise CorpusError(f"{key}: {spec}: {local} is not a directory (hf: takes a `save_to_disk` directory, a "
                          "folder of data files, or a hub dataset name)")
    raise CorpusError(f"{key}: {spec}: {name!r} is neither a directory nor a hub dataset name (hf:NAME, "
                      "hf:NAME/CONFIG or hf:OWNER/NAME/CONFIG: letters, digits, '-', '_' and '.'); write a local "
                      "folder as ./DIR or /abs/DIR")


def read_source(source: str, text_field: str, max_bytes: int, stats: CorpusStats) -> Iterator[list[str]]:
    """Documents of one resolved source."""
    if source.startswith("hf:"):
        yield from _read_datasets(source, text_field, max_bytes, stats)
        return
    if source == "builtin:python-docs":
        from .default_corpus import python_docs_path

        source = str(python_docs_path())
    path = Path(source)
    suffix = _base_suffix(path)
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


def fingerprint(sources: list[str]) -> str:
    """A cheap content address of resolved sources: path, size and modification time of each file."""
    h = hashlib.sha256()
    for source in sources:
        h.update(source.encode())
        if source == "builtin:python-docs":
            from .default_corpus import python_docs_path

            source = str(python_docs_path())
        if not source.startswith("hf:"):
            st = Path(source).stat()
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        elif Path(source[3:].partition(":")[0]).is_dir():
            for f in sorted(Path(source[3:].partition(":")[0]).rglob("*")):
                if f.is_file():
                    st = f.stat()
                    h.update(f"{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# The split-aware corpus


def _mix64(x: int) -> int:
    """splitmix64 finalizer: a counter-based hash, so the split of document i depends on (seed, i) only."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def held_out(seed: int, doc_index: int, fraction: float) -> bool:
    return _mix64(_mix64(seed) ^ doc_index) < fraction * 2.0**64


def kept(seed: int, source: str, doc_index: int, fraction: float) -> bool:
    """Whether document `doc_index` of the source `source` (its path spec) is in a weight's fractional pass: a
    pure function of (seed, source, index), so every slice and every rerun keeps the same documents."""
    key = int.from_bytes(hashlib.sha256(source.encode()).digest()[:8], "little")
    return _mix64(_mix64(seed ^ key) ^ doc_index) < fraction * 2.0**64


class Doc(NamedTuple):
    """A document with where it came from: `source` indexes corpus.train (corpus.valid for an explicit
    validation set), `bytes` is what was read for it (the separator before it included)."""

    source: int
    bytes: int
    lines: list[str]


class Corpus:
    """Train and valid documents of an experiment's corpus section.

    With no `valid` sources, document i of `train` goes to valid when hash(seed, i) < valid_fraction: a
    seeded, streaming, document-level split that never holds the corpus in memory. i counts the documents of
    all train sources in order, once each, whatever their weights.

    Weights apply to the train split only (`sources.py`): source k is read ceil(weight) times in a row; pass p
    keeps its documents j that are not held out and, in the last pass of a fractional weight, those with
    `kept(seed, path, j, weight - p)`. Copies of a document are a whole pass apart, never in one block, and
    with every weight 1 the stream is exactly the unweighted one.
    """

    def __init__(self, cfg: CorpusConfig, seed: int = 0, exclude: Iterable[str | Path] = ()):
        self.cfg = cfg
        self.seed = seed
        self.sources = cfg.sources
        exclude = list(exclude)
        self.source_files = [resolve_sources([s.path], "corpus.train", exclude) for s in self.sources]
        self.train_sources = [f for files in self.source_files for f in files]
        self.valid_files = [resolve_sources([v.path], "corpus.valid", exclude) for v in cfg.valid_entries]
        self.valid_sources = [f for files in self.valid_files for f in files]

    @classmethod
    def of_experiment(cls, cfg: ExperimentConfig) -> Corpus:
        """The experiment's corpus, with the prep seed; its globs and directories never match what the run
        writes (run_dir, and data.cache_dir where remote shards are kept)."""
        outputs = [cfg.run_path] + ([cfg.data.cache_dir] if cfg.data.cache_dir else [])
        return cls(cfg.corpus, cfg.prep_seed, exclude=outputs)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update(fingerprint(self.train_sources).encode())
        h.update(fingerprint(self.valid_sources).encode())
        h.update(json.dumps([self.seed, self.cfg.valid_fraction, self.cfg.text_field, self.cfg.max_line_bytes]).encode())
        if any(s.weight != 1 for s in self.sources):  # only then, so unweighted corpora keep their address
            h.update(json.dumps([[s.path, s.weight] for s in self.sources]).encode())
        return h.hexdigest()

    def documents(self, split: Split, stats: CorpusStats | None = None) -> Iterator[list[str]]:
        for doc in self.records(split, stats):
            yield doc.lines

    def records(self, split: Split, stats: CorpusStats | None = None) -> Iterator[Doc]:
        """The split's documents as `Doc`s, in corpus order (train: weighted)."""
        stats = stats if stats is not None else CorpusStats()
        if split == "valid" and self.valid_sources:
            docs = (Doc(k, n, doc) for k, files in enumerate(self.valid_files) for n, doc in self._read(files, stats))
            yield from self._count(docs, stats, "corpus.valid")
            return
        seeded = not self.valid_sources and self.cfg.valid_fraction > 0
        if split == "valid" and not seeded:
            return
        yield from self._count(self._weighted(split == "valid", seeded, stats), stats,
                               "corpus.train" if split == "train" else None)

    def _weighted(self, want_valid: bool, seeded: bool, stats: CorpusStats) -> Iterator[Doc]:
        base = 0  # documents of the sources before this one: the global index of its document 0
        for k, (source, files) in enumerate(zip(self.sources, self.source_files, strict=True)):
            passes = 1 if want_valid else max(1, math.ceil(source.weight))
            count = 0
            for p in range(passes):
                share = 1.0 if want_valid else min(1.0, source.weight - p)
                if share <= 0 and not seeded:
                    break  # nothing to keep, and no global index to count
                for j, (n, doc) in enumerate(self._read(files, stats)):
                    count += p == 0
                    if seeded and held_out(self.seed, base + j, self.cfg.valid_fraction) != want_valid:
                        continue
                    if share < 1.0 and not kept(self.seed, source.path, j, share):
                        continue
                    yield Doc(k, n, doc)
            base += count

    def sample(self, max_bytes: int, shares: list[float], stats: CorpusStats) -> Iterator[Doc]:
        """Whole train documents of at most `max_bytes` in all (the tokenizer's sample): source k's budget is the
        bytes left times shares[k] / (the shares of k and the sources after it), so what a small source leaves
        goes to the next ones; each source is read from its start and left at the first document that does not
        fit its budget, so no more is read than the sample needs.

        Held-out documents are skipped by their global index while it is known, i.e. while every earlier source
        was read to its end; after a source was left early, a per-source draw at the same rate stands in for
        it (an explicit corpus.valid makes the separation exact)."""
        seeded = not self.valid_sources and self.cfg.valid_fraction > 0
        left, base = max_bytes, 0
        for k, files in enumerate(self.source_files):
            rest = sum(shares[k:])
            budget = left * shares[k] / rest if rest > 0 else 0
            taken, count, whole = 0, 0, True
            for j, (n, doc) in enumerate(self._read(files, stats) if budget > 0 else ()):
                count += 1
                if seeded:
                    index, seed = (base + j, self.seed) if base is not None else (j, _mix64(self.seed ^ k))
                    if held_out(seed, index, self.cfg.valid_fraction):
                        continue
                if taken + n > budget:
                    whole = False
                    break
                taken += n
                yield Doc(k, n, doc)
            left -= taken
            base = base + count if base is not None and whole and budget > 0 else None

    def _read(self, files: list[str], stats: CorpusStats) -> Iterator[tuple[int, list[str]]]:
        """(bytes read for it, document) of each document of `files`."""
        for source in files:
            before = stats.bytes
            for doc in read_source(source, self.cfg.text_field, self.cfg.max_line_bytes, stats):
                yield stats.bytes - before, doc
                before = stats.bytes

    @staticmethod
    def _count(docs: Iterator[Doc], stats: CorpusStats, key: str | None) -> Iterator[Doc]:
        n = 0
        for doc in docs:
            n += 1
            stats.documents += 1
            stats.sentences += len(doc.lines)
            yield doc
        if n == 0 and key is not None:
            raise CorpusError(f"{key}: the corpus holds no text (empty files, or only blank lines and NUL bytes)")
