"""tiktoken's BPE core as the encoder of `make data`, for a tokenizer that is RoBERTa's byte-level BPE: the same ids as
`tokenizers`, 2-3x faster per core.

Why the same ids. Both split text with GPT-2's regex (the same pattern, checked on every code point in
`tests/test_encode_tiktoken.py`: oniguruma in `tokenizers` and fancy-regex in tiktoken agree on which characters
are letters, numbers and whitespace) and then apply BPE inside each piece, repeatedly merging the adjacent pair of
highest priority, leftmost first on ties. `tokenizers` ranks a pair by the position of its merge in merges.txt and
merges only listed pairs; tiktoken ranks a pair by the id of the token the two make together and merges any pair
whose concatenation is a token. With `tiktoken_refusal`'s conditions the priorities are the same (a merge's result
has a larger id than its parts and than every earlier merge's result; no two merges make the same token; every
token but the 256 bytes is some merge's result; added tokens are left out, so a literal "<mask>" in the text is
text, as `encode_special_tokens` makes it in `tokenizers`). One difference is left that no static check rules out:
tiktoken also merges two adjacent tokens that make a third along a path merges.txt does not list (merges "b c",
"a b", "ab c": on "abc" `tokenizers` stops at "a" "bc", tiktoken goes on to "abc"). A trainer never learns such
a merge list, we believe (it merges the pieces it sees, in the order it then encodes them), and 119,924 dictionary
documents (issue 33) and kernel_docs' 5,428 gave the same ids; still, every `make data` encodes a sample of its
corpus both ways first (`choose_encoder`) and uses `tokenizers` if any id differs. bench/bench_data.py compares
whole shards.

The self-check runs in a thread of the parent while the workers already encode with tiktoken (encode.py's
`EncoderChoice`): its cost, about 1% of the split's encoding with `tokenizers`, is off the critical path, and
nothing the workers encoded is used before it has passed.

Apart from encode.py, which cuts a document's tokens into sentences and runs the workers whatever encodes the
text; this module only provides the text -> ids function it calls (`tiktoken_texts`) and the choice.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from .encode import (
    EncoderChoice,
    EncoderSpec,
    SentenceEncoder,
    TextsEncoder,
    sentence_batches,
    splittable,
    tokenizers_spec,
    tokenizers_texts,
    tokenizers_texts_of,
)
from .typed_config import ConfigError

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
"""The ByteLevel pre-tokenizer's regex (tokenizers' `byte_level.rs`), written as tokenizers writes it."""



def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: the printable character that stands for each byte in vocab.json and merges.txt
    (printable Latin-1 stands for itself; the other 68 bytes are U+0100 onwards, in byte order)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(others)}}


def _model(tok: Tokenizer) -> dict[str, Any]:
    return json.loads(tok.to_str())["model"]


NOT_ROBERTA_PIPELINE = "the tokenizer is not RoBERTa's byte-level BPE pipeline (normalizer, prefix space, dropout, ...)"


def tiktoken_refusal(tok: Tokenizer, model: dict[str, Any] | None = None) -> str | None:
    """None when tiktoken's BPE gives `tok`'s ids (module docstring); else why not, in a few words. `model`: the
    "model" of `tok`'s JSON, when the caller has it."""
    if not splittable(tok):
        return NOT_ROBERTA_PIPELINE
    model = model or _model(tok)
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix") or model.get("byte_fallback") \
            or model.get("ignore_merges"):
        return "its BPE model has a subword prefix or suffix, byte fallback or ignore_merges"
    alphabet = byte_decoder()
    added = {t.content for t in tok.get_added_tokens_decoder().values()}
    vocab: dict[str, int] = {t: i for t, i in model["vocab"].items() if t not in added}
    if any(c not in alphabet for t in vocab for c in t):
        return "a token is not written in the byte-level alphabet"
    if not set(alphabet) <= set(vocab):
        return "the vocabulary lacks some of the 256 bytes"
    merges = [m.split(" ") if isinstance(m, str) else m for m in model["merges"]]
    last = -1
    results = set()
    for a, b in merges:
        made = vocab.get(a + b)
        if made is None or vocab.get(a, made) >= made or vocab.get(b, made) >= made:
            return f"merge {a!r} {b!r} makes no token with a larger id than its parts"
        if a + b in results:
            return "two merges make the same token"
        if made <= last:
            return f"merge {a!r} {b!r} makes a token with a smaller id than an earlier merge's (ids out of merge order)"
        last = made
        results.add(a + b)
    if len(results) + len(alphabet) != len(vocab):
        return "a token is neither a byte nor a merge's result"
    return None


def mergeable_ranks(tok: Tokenizer, model: dict[str, Any] | None = None) -> dict[bytes, int]:
    """tiktoken's table for `tok` (call `tiktoken_refusal` first): each token's bytes ranked by its id, so that
    tiktoken's ids are `tok`'s ids; added tokens left out (their text is text)."""
    added = {t.content for t in tok.get_added_tokens_decoder().values()}
    return _ranks((model or _model(tok))["vocab"], added)


def _ranks(vocab: dict[str, int], added: set[str]) -> dict[bytes, int]:
    to_latin1 = str.maketrans({c: chr(b) for c, b in byte_decoder().items()})  # then .encode("latin-1"): the bytes
    return {t.translate(to_latin1).encode("latin-1"): i for t, i in vocab.items() if t not in added}


def tiktoken_encoding(tok: Tokenizer | None, ranks: dict[bytes, int] | None = None) -> Any:
    """`tok` as a `tiktoken.Encoding` with `mergeable_ranks` (given, or made here), GPT-2's regex, no specials."""
    import tiktoken

    return tiktoken.Encoding(name="roberta-byte-level-bpe", pat_str=GPT2_PATTERN,
                             mergeable_ranks=ranks or mergeable_ranks(tok), special_tokens={})  # type: ignore[arg-type]


def tiktoken_texts_of(ranks: dict[bytes, int]) -> TextsEncoder:
    """encode.py's text -> ids function with tiktoken: `encode_ordinary`, one call per text on this thread
    (tiktoken's own batch helper starts a thread pool per call, slow on many small texts; parallelism comes from
    the worker processes). Not `encode_to_numpy`, which goes through the special-token path and took ~1.4x the
    time of `encode_ordinary` plus the list's conversion to numpy (2026-12-06, kernel_docs, one core)."""
    encoding = tiktoken_encoding(None, ranks)
    return lambda texts: [encoding.encode_ordinary(t) for t in texts]


def tiktoken_texts(tok: Tokenizer) -> TextsEncoder:
    """`tiktoken_texts_of` for `tok` (call `tiktoken_refusal` first)."""
    return tiktoken_texts_of(mergeable_ranks(tok))


def tiktoken_texts_of_file(tokenizer_json: str) -> TextsEncoder:
    """What a worker runs first: `tiktoken_texts_of` the tokenizer saved at `tokenizer_json`, its table made from
    the file here, while the main process checks whether tiktoken qualifies (`choose_encoder`). A file it cannot
    make a table of gets `tokenizers` (the same ids by definition); the check has then failed too, and nothing
    encoded before the verdict is used."""
    try:
        with open(tokenizer_json, encoding="utf-8") as f:
            data = json.load(f)
        return tiktoken_texts_of(_ranks(data["model"]["vocab"], {t["content"] for t in data.get("added_tokens", [])}))
    except Exception:  # noqa: BLE001 - the verdict will say why; this worker still gives correct ids meanwhile
        return tokenizers_texts_of(tokenizer_json)


def first_difference(ours: SentenceEncoder, reference: SentenceEncoder, sample: Iterable[list[str]]) -> str | None:
    """None when both encoders give the same sentences' ids for `sample`'s documents; else where they first differ."""
    for lines, first in sentence_batches(sample, 4096):
        got, want = ours(lines, first), reference(lines, first)
        if not (np.array_equal(got.tokens, want.tokens) and np.array_equal(got.lengths, want.lengths)):
            ends = np.cumsum(want.lengths)
            at = next((i for i, (x, y) in enumerate(zip(got.tokens.tolist(), want.tokens.tolist(), strict=False))
                       if x != y), min(len(got.tokens), len(want.tokens)))
            line = lines[min(int(np.searchsorted(ends, at, side="right")), len(lines) - 1)]
            return f"tiktoken and tokenizers give different ids for the sample's line {line[:60]!r}"
    return None


def self_check(tok: Tokenizer, sample: Iterable[list[str]], dtype: np.dtype,
               texts: Callable[[Tokenizer], TextsEncoder] = tiktoken_texts) -> str | None:
    """`first_difference` between `texts`' encoder and `tokenizers`' for `tok`."""
    return first_difference(SentenceEncoder.of(tok, dtype, texts), SentenceEncoder.of(tok, dtype), sample)


def choose_encoder(tok: Tokenizer, setting: str, sample: list[list[str]], dtype: np.dtype,
                   log: Callable[[str], None] = print, tokenizer_json: str | Path | None = None) -> EncoderChoice:
    """The encoder of a split for `data.encoder` = `setting` (auto | tiktoken | tokenizers): tiktoken when `tok`
    qualifies (`tiktoken_refusal`) and the sample's ids agree (the self-check). Only the pipeline is looked at
    here; the rest runs beside the work, in a thread (`EncoderChoice.final()` has its verdict). With auto,
    otherwise `tokenizers` and one line saying why; a forced tiktoken that cannot give the same ids is a
    ConfigError (at once for another pipeline, else from `final()`, before anything is written).
    `tokenizer_json`: where `tok` is saved, which workers load (without it, the choice serves this process)."""
    reference = tokenizers_spec(tok, dtype, tokenizer_json)
    if setting == "tokenizers":
        return EncoderChoice(reference)

    def refuse(problem: str) -> EncoderSpec:
        if setting == "tiktoken":
            raise ConfigError(f"data.encoder=tiktoken: {problem}, so its shards would differ; set data.encoder to "
                              "auto or tokenizers")
        log(f"data: encoding with tokenizers, not tiktoken: {problem}")
        return reference

    if not splittable(tok):
        return EncoderChoice(refuse(NOT_ROBERTA_PIPELINE))
    # the workers start with tiktoken (building its table from the file themselves) while the checks run here
    candidate = EncoderSpec("tiktoken", functools.partial(tiktoken_texts_of_file, str(tokenizer_json))
                            if tokenizer_json is not None else functools.partial(tiktoken_texts, tok),
                            reference.dtype, reference.starts_line)

    def check() -> EncoderSpec:
        model = _model(tok)
        problem = tiktoken_refusal(tok, model)
        if problem is None:
            ours = SentenceEncoder(tiktoken_texts_of(mergeable_ranks(tok, model)), np.dtype(dtype), reference.starts_line)
            tokenizers_encoder = SentenceEncoder(tokenizers_texts(tok), np.dtype(dtype), reference.starts_line)
            problem = first_difference(ours, tokenizers_encoder, sample)
        return candidate if problem is None else refuse(problem)

    return EncoderChoice(candidate, check)


def sample_bytes(split_bytes: int | None) -> int:
    """Text the self-check encodes both ways: 1% of the split (its cost, about 1% of encoding it with
    `tokenizers`), at least 64 KB and at most 1 MB."""
    return min(1 << 20, max(1 << 16, (split_bytes or 1 << 30) // 100))
