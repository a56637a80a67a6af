"""Corpus specs resolved into sources: globs and directories expanded, `hf:` specs checked, content addressed.

- directories (searched recursively) and globs of .txt, .jsonl, .parquet files (optionally .gz), in sorted order,
  never the run's own outputs (a glob `data/**/*.txt` with the run_dir under data/ would otherwise train on its
  tokenizer's merges.txt);
- `hf:NAME[/CONFIG][:SPLIT]`: a local folder or a name in the hub's grammar; anything else is refused before any
  request (a missing `./dir` would be looked up on the hub);
- `builtin:python-docs` passes through.

`fingerprint` is the cheap content address of resolved sources that names the prepared data. Apart from the
readers (readers.py: how a source is read) and the corpus (corpus.py: which documents go where).
"""

from __future__ import annotations

import functools
import glob
import hashlib
import os
import re
from collections.abc import Iterable
from pathlib import Path

from .readers import TEXT_SUFFIXES, CorpusError, base_suffix


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
                str(f) for f in p.rglob("*") if f.is_file() and base_suffix(f) in TEXT_SUFFIXES and not mine(f)
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
            if base_suffix(p) not in TEXT_SUFFIXES:
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
