"""The entries of `corpus.train`: a path spec, or a mapping that adds a weight and a name.

    corpus:
      train:
        - data/wiki/*.txt.gz                          # weight 1, named by its path
        - {path: data/books/, weight: 2.0, name: books}
        - {path: "hf:cc_news", weight: 0.5, name: ccnews}

A weight is a number of passes over the source at prep time (`corpus.py`): 2.0 puts every document in the
training split twice, 0.5 a seeded half of them, 1.5 every document once and a seeded half again, 0 none (its
held-out documents still go to validation). A weight is at most `MAX_WEIGHT` (1000): the shards hold that many
copies of the source, so 1e9 would be a billion passes that fill the disk after hours of tokenizing; a weight
that large is a slip (a count or a percentage meant as a share), refused with the config. The YAML keeps what the
user wrote (plain strings stay strings, so configs and checkpoints without mappings are unchanged);
`CorpusConfig.sources` is the one normalised shape, a list of `Source`, that the rest of the code reads.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .typed_config import ConfigError, option

MAX_WEIGHT = 1000
"""The most passes over one source: its documents are copied that many times into the training shards."""
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # a name is also a metric key (val/loss/<name>) and a file stem


@dataclass
class Source:
    path: str = option("", "A file, glob, directory (.txt, .jsonl, .parquet, optionally .gz) or hf:NAME[/CONFIG][:SPLIT].")
    weight: float = option(1.0, "Passes over this source's documents at prep time, at most 1000 (2.0: each twice; "
                           "0.5: a seeded half; 1.5: each once and a seeded half again; 0: none, its held-out "
                           "documents still validate).")
    name: str | None = option(None, "A short name (letters, digits, _ . -) for make data's report, meta.json, the "
                              "model card and its own val/loss/<name> (when validation is held out of the train "
                              "sources); null: the path.")

    @property
    def label(self) -> str:
        return self.name or self.path

    @property
    def plain(self) -> bool:
        """What a plain string entry means: weight 1 and no name (today's concatenation)."""
        return self.weight == 1.0 and self.name is None


def normalise_sources(entries: list[str | Source], key: str = "corpus.train", weighted: bool = True) -> list[Source]:
    """`entries` as `Source`s, checked; every problem of every entry in one ConfigError line. `weighted=False`
    (corpus.valid): a weight other than 1 is refused, since validation text is read once."""
    sources = [Source(path=e) if isinstance(e, str) else e for e in entries]
    problems, names = [], {}
    for i, s in enumerate(sources):
        where = f"{key}[{i}]"
        if not s.path.strip():
            problems.append(f"{where}.path: missing (a file, glob, directory or hf:NAME)")
        if math.isnan(s.weight) or math.isinf(s.weight):
            problems.append(f"{where}.weight: {s.weight} must be a finite number")
        elif s.weight < 0:
            problems.append(f"{where}.weight: {s.weight:g} must be >= 0")
        elif s.weight > MAX_WEIGHT:
            problems.append(f"{where}.weight: {s.weight:g} must be at most {MAX_WEIGHT}: it is passes over the "
                            "source (each document copied that many times into the shards), not a proportion")
        elif not weighted and s.weight != 1:
            problems.append(f"{where}.weight: {s.weight:g}: validation text is not weighted (drop the key)")
        if s.name is not None:
            if not NAME.fullmatch(s.name):
                problems.append(f"{where}.name: {s.name!r} must be letters, digits, '_', '.' or '-' "
                                "(it names metrics and files)")
            elif s.name in names:
                problems.append(f"{where}.name: {s.name!r} is also the name of {key}[{names[s.name]}]")
            names.setdefault(s.name, i)
    if problems:
        raise ConfigError("; ".join(problems))
    if weighted and sources and not any(s.weight for s in sources):
        raise ConfigError(f"{key}: every weight is 0, so there is no training text; give one source a weight > 0")
    return sources


def mixture(sources: list[dict], counts: list[dict]) -> list[dict]:
    """The per-source table of meta.json: each source's {name, path, weight} with its counts (documents, bytes,
    tokens in the split, copies included) and its share of the split's tokens."""
    total = sum(c.get("tokens", 0) for c in counts)
    return [{**s, **c, "share": round(c.get("tokens", 0) / total, 6) if total else 0.0}
            for s, c in zip(sources, counts, strict=True)]


def add_counts(parts: list[list[dict]]) -> list[dict]:
    """Per-source counts of several slices, summed source by source."""
    return [{k: sum(p[i][k] for p in parts) for k in parts[0][i]} for i in range(len(parts[0]))]


def short_label(label: str, width: int = 24) -> str:
    """A source's name or path for a report column: a long path keeps its end, the part that tells sources apart."""
    return label if len(label) <= width else "..." + label[3 - width :]
