"""Data preparation throughput: this project's tokenize + pack against Hugging Face's `run_mlm.py` recipe.

    python bench/bench_data.py [--corpus ../shared/corpus/kernel_docs.txt] [--seq_len 512] [--num_proc 0] [--rounds 3]

Both sides turn the same raw text file into blocks of `seq_len` tokens with the same tokenizer on the same cores:
- ours: `data_prep.build.build_split` (streaming reader, worker processes, packer, shard writer), FULL-SENTENCES,
  with `data.encoder: auto` (tiktoken's BPE core for this tokenizer) and again with `data.encoder: tokenizers`:
  the two must write the same shard bytes (their sha256 are compared; a difference fails the benchmark);
- run_mlm.py: `datasets.load_dataset("text")`, `map(tokenize_function, batched=True, num_proc=N)` with the fast
  tokenizer from `AutoTokenizer.from_pretrained(run_dir/tokenizer)`, then `map(group_texts, num_proc=N)`, with a
  fresh `datasets` cache, as the script does on a first run.
Each side runs in its own subprocess, so each peak memory is its own: the peak of the sum of the resident sets of
the side's process tree (workers included), sampled every 50 ms. The sides alternate for `--rounds` rounds and
the medians count. Two rows are the encoders' own ceilings over the same documents already in memory, each one
text, no packing and no I/O: `tokenizers`' `encode_batch` (its thread pool, one thread per core) and tiktoken's
`encode_ordinary`, one call per document, on one thread per core (chunks of 256 documents). Prints MB/s of
raw text for each, the ratio ours / run_mlm.py and ours' share of the ceiling, then runs our side again on the
corpus read `--scale` times over (10 by default) to show that its memory stays flat
as the corpus grows, and (`--mixture 1`) on a three-source weighted mixture (the corpus cut into three sources at
document boundaries, weights 1, 2 and 0.5) at 1x and `--scale`x; `--rounds 0` runs only the mixture rows
(bench/results/data-mixture.json and .md). Writes the figures to bench/results/data.json and data.md. The
tokenizer is trained first if the run_dir has none (not timed).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from common import (
    ROOT,
    SHARED_CORPUS,
    default_corpus,
    mixture_sources,
    repeated_corpus,
    run_side,
    write_results,
)


def config(args: argparse.Namespace, train: str | None = None, encoder: str = "auto"):
    from data_prep.config import load_config

    train = train or repeated_corpus(args.corpus, args._copies)
    return load_config(None, [f"--run_dir={args.run_dir}", f"--corpus.train={train}",
                              "--corpus.valid_fraction=0", f"--tokenizer.vocab_size={args.vocab_size}",
                              f"--data.seq_len={args.seq_len}", f"--data.num_proc={args.num_proc}",
                              f"--data.encoder={encoder}"])


def prep(cfg) -> tuple[dict, dict]:
    """`make data`'s train split of `cfg` into a temporary directory, timed with the tokenizer's loading: the
    side's figures, and the split's record."""
    from data_prep.build import build_split, num_workers
    from data_prep.corpus import Corpus
    from data_prep.manifest import token_dtype
    from data_prep.tokenizer import load_tokenizer, special_ids, tokenizer_dir

    start = time.perf_counter()
    tok = load_tokenizer(tokenizer_dir(cfg))
    with tempfile.TemporaryDirectory() as out:
        record = build_split(cfg, Corpus(cfg.corpus, cfg.seed), "train", tokenizer_dir(cfg) / "tokenizer.json",
                             Path(out), "train", token_dtype(tok.get_vocab_size()), special_ids(tok),
                             log=print, tok=tok)
        seconds = time.perf_counter() - start
        digests = {}  # not timed; streamed, so the peak memory stays the run's
        for name in ("train.tokens.bin", "train.offsets.bin"):
            with open(Path(out) / name, "rb") as f:
                digests[name] = hashlib.file_digest(f, "sha256").hexdigest()
    return {"seconds": seconds, "blocks": record["num_blocks"], "tokens": record["num_tokens"],
            "padding_fraction": record["padding_fraction"], "dropped_tokens": 0,
            "workers": num_workers(cfg.data.num_proc), "encoder": record["encoder"], "sha256": digests}, record


def side_ours(args: argparse.Namespace) -> dict:
    return prep(config(args))[0]


def side_tokenizers(args: argparse.Namespace) -> dict:
    """Ours with `data.encoder: tokenizers`: the path before tiktoken, and the reference its shards must equal."""
    return prep(config(args, encoder="tokenizers"))[0]


def side_mixture(args: argparse.Namespace) -> dict:
    """Ours on a three-source weighted mixture (weights 1, 2, 0.5; each source `_copies` times over)."""
    with tempfile.TemporaryDirectory() as work:
        result, record = prep(config(args, json.dumps(mixture_sources(args.corpus, args._copies, Path(work)))))
    return {**result, "sources": record["sources"]}


def side_ceiling(args: argparse.Namespace) -> dict:
    from data_prep.build import num_workers
    from data_prep.corpus import Corpus
    from data_prep.encode import load_encoder
    from data_prep.tokenizer import tokenizer_dir

    cfg = config(args)
    os.environ["RAYON_NUM_THREADS"] = str(num_workers(cfg.data.num_proc))  # read when its thread pool starts
    texts = ["\n".join(lines) for lines in Corpus(cfg.corpus, cfg.seed).documents("train")]  # not timed
    tok = load_encoder(tokenizer_dir(cfg) / "tokenizer.json")
    start = time.perf_counter()
    tokens = sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False))
    return {"seconds": time.perf_counter() - start, "blocks": 0, "tokens": tokens, "padding_fraction": 0.0,
            "dropped_tokens": 0, "workers": num_workers(cfg.data.num_proc)}


def side_tiktoken(args: argparse.Namespace) -> dict:
    """tiktoken's ceiling: `encode_ordinary` per document on one thread per core (it releases the GIL), chunks of
    256 documents; not its `encode_ordinary_batch`, which starts a thread pool per call."""
    from concurrent.futures import ThreadPoolExecutor

    from data_prep.build import num_workers
    from data_prep.corpus import Corpus
    from data_prep.encode import load_encoder
    from data_prep.encode_tiktoken import tiktoken_encoding
    from data_prep.tokenizer import tokenizer_dir

    cfg = config(args)
    texts = ["\n".join(lines) for lines in Corpus(cfg.corpus, cfg.seed).documents("train")]  # not timed
    encoding = tiktoken_encoding(load_encoder(tokenizer_dir(cfg) / "tokenizer.json"))
    workers = num_workers(cfg.data.num_proc)
    chunks = [texts[i : i + 256] for i in range(0, len(texts), 256)]
    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        tokens = sum(pool.map(lambda chunk: sum(len(encoding.encode_ordinary(t)) for t in chunk), chunks))
    return {"seconds": time.perf_counter() - start, "blocks": 0, "tokens": tokens, "padding_fraction": 0.0,
            "dropped_tokens": 0, "workers": workers}


def side_hf(args: argparse.Namespace) -> dict:
    from itertools import chain

    from data_prep.build import num_workers

    cfg = config(args)
    workers = num_workers(cfg.data.num_proc)
    L = args.seq_len
    with tempfile.TemporaryDirectory() as cache:
        os.environ["HF_DATASETS_CACHE"] = cache
        start = time.perf_counter()
        import datasets
        from transformers import AutoTokenizer

        datasets.disable_progress_bars()
        tokenizer = AutoTokenizer.from_pretrained(str(cfg.run_path / "tokenizer"))
        raw = datasets.load_dataset("text", data_files={"train": str(args.corpus)}, cache_dir=cache)

        # run_mlm.py, line_by_line=False
        def tokenize_function(examples):
            return tokenizer(examples["text"], return_special_tokens_mask=True)

        tokenized = raw.map(tokenize_function, batched=True, num_proc=workers, remove_columns=["text"])

        def group_texts(examples):
            concatenated = {k: list(chain(*examples[k])) for k in examples}
            total = len(concatenated[next(iter(examples))])
            total = (total // L) * L
            return {k: [t[i : i + L] for i in range(0, total, L)] for k, t in concatenated.items()}

        grouped = tokenized.map(group_texts, batched=True, num_proc=workers)
        seconds = time.perf_counter() - start
        stream = sum(len(x) for x in tokenized["train"]["input_ids"])
        blocks = len(grouped["train"])
    return {"seconds": seconds, "blocks": blocks, "tokens": blocks * L, "padding_fraction": 0.0,
            "dropped_tokens": stream - blocks * L, "workers": workers}


def mixture_rows(args: argparse.Namespace, argv: list[str], report: dict) -> list[str]:
    """Ours on the weighted three-source mixture at 1x and `--scale`x: its markdown table (figures into
    `report["mixture"]`). MB packed counts the text of the documents kept: a weight-2 source twice, a weight-0.5
    source's seeded half once; MB/s is of that text."""
    rows = {}
    for copies in sorted({1, max(1, args.scale)}):
        r = run_side(__file__, "mixture", [*argv, f"--_copies={copies}"])
        r["mb_packed"] = sum(src["bytes"] for src in r["sources"]) / 1e6
        r["mb_per_s"] = round(r["mb_packed"] / r["seconds"], 3)
        rows[copies] = r
    report["mixture"] = {"weights": {"first": 1.0, "second": 2.0, "third": 0.5},
                         "rows": {f"{c}x": r for c, r in rows.items()}}
    table = ["| corpus (3 sources, weights 1 / 2 / 0.5) | MB packed | MB/s | seconds | tokens | tokens per source "
             "(first / second / third) | peak memory (MB) |", "|---|---|---|---|---|---|---|"]
    for c, r in rows.items():
        per = " / ".join(f"{src['tokens']:,}" for src in r["sources"])
        table.append(f"| {c}x | {r['mb_packed']:.1f} | {r['mb_per_s']:.2f} | {r['seconds']:.1f} | {r['tokens']:,} | "
                     f"{per} | {r['peak_rss_mb']} |")
    md = ["", f"`make data` on a weighted mixture (the corpus cut into three sources at document boundaries, "
          f"weights 1, 2 and 0.5; at x{max(rows)} each source is read {max(rows)} times over), seq_len "
          f"{args.seq_len}, {rows[1]['workers']} worker(s):", "", *table]
    if len(rows) > 1 and rows[1]["peak_rss_mb"] and rows[max(rows)]["peak_rss_mb"]:
        growth = rows[max(rows)]["peak_rss_mb"] / rows[1]["peak_rss_mb"]
        report["mixture"]["memory_growth"] = round(growth, 3)
        md += ["", f"Peak memory for the mixture x{max(rows)}: x{growth:.2f} of the 1x run."]
    return md


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default=str(SHARED_CORPUS), help="raw text file (default: the embedded corpus when absent)")
    p.add_argument("--run_dir", default=str(ROOT / "runs/bench-data"), help="where the tokenizer lives")
    p.add_argument("--vocab_size", type=int, default=50265)
    p.add_argument("--seq_len", type=int, default=512)
    p.add_argument("--num_proc", type=int, default=0, help="processes for both sides; 0: all cores")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of (ours, ours with tokenizers, "
                   "run_mlm.py, the two ceilings); the medians count")
    p.add_argument("--scale", type=int, default=10,
                   help="also run ours on the corpus this many times over, to compare peak memory; 0: skip")
    p.add_argument("--mixture", type=int, default=1, help="also run ours on a three-source weighted mixture at 1x "
                   "and --scale x; 0: skip. With --rounds 0, only those rows (into data-mixture.json and .md)")
    p.add_argument("--out", default=str(ROOT / "bench/results"))
    p.add_argument("--_side", choices=["ours", "tokenizers", "hf", "ceiling", "tiktoken", "mixture"],
                   help=argparse.SUPPRESS)
    p.add_argument("--_copies", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._side:
        sides = {"ours": side_ours, "tokenizers": side_tokenizers, "hf": side_hf, "ceiling": side_ceiling,
                 "tiktoken": side_tiktoken, "mixture": side_mixture}
        print(json.dumps(sides[args._side](args)))
        return

    from data_prep.tokenizer import tokenizer_dir
    from data_prep.tokenizer_training import train_tokenizer

    args.corpus = default_corpus(args.corpus)
    cfg = config(args)
    if not (tokenizer_dir(cfg) / "tokenizer.json").is_file():
        train_tokenizer(cfg)
    argv = [f"--corpus={args.corpus}", f"--run_dir={args.run_dir}", f"--vocab_size={args.vocab_size}",
            f"--seq_len={args.seq_len}", f"--num_proc={args.num_proc}"]
    if args.rounds == 0:  # only the mixture rows, into their own files so the side-by-side results stay
        report = {"corpus": args.corpus, "seq_len": args.seq_len, "cpus": os.cpu_count()}
        md = mixture_rows(args, argv, report)[1:]
        print("\n".join(md))
        write_results(args.out, "data-mixture", report, md)
        return
    mb = Path(args.corpus).stat().st_size / 1e6
    load_before = os.getloadavg()[0]  # other work on the machine: the ratios are only as good as it is quiet
    runs: dict[str, list[dict]] = {"ours": [], "tokenizers": [], "hf": [], "ceiling": [], "tiktoken": []}
    for _ in range(args.rounds):  # alternating, so a slow spell of a shared machine hits every side
        for side, side_runs in runs.items():
            side_runs.append(run_side(__file__, side, argv))
    results = {}
    for side, side_runs in runs.items():
        median = statistics.median(r["seconds"] for r in side_runs)
        mid = min(side_runs, key=lambda r: abs(r["seconds"] - median))  # its other figures
        results[side] = {**mid, "seconds": median, "mb_per_s": round(mb / median, 3),
                         "all_seconds": [round(r["seconds"], 3) for r in side_runs]}
    ratio = results["ours"]["mb_per_s"] / results["hf"]["mb_per_s"]
    ceiling = "tiktoken" if results["ours"]["encoder"] == "tiktoken" else "ceiling"
    share = results["ours"]["mb_per_s"] / results[ceiling]["mb_per_s"]
    shards = {r["encoder"]: r["sha256"] for r in runs["ours"] + runs["tokenizers"]}
    identical = len({json.dumps(r["sha256"], sort_keys=True) for r in runs["ours"] + runs["tokenizers"]}) == 1
    report = {"corpus": args.corpus, "corpus_mb": round(mb, 2), "seq_len": args.seq_len,
              "workers": results["ours"]["workers"], "cpus": os.cpu_count(), "machine": platform.platform(),
              "python": platform.python_version(), "ours": results["ours"], "ours_tokenizers": results["tokenizers"],
              "run_mlm": results["hf"], "ceiling": results["ceiling"], "ceiling_tiktoken": results["tiktoken"],
              "share_of_ceiling": round(share, 3), "rounds": args.rounds, "ratio": round(ratio, 3),
              "ratio_tokenizers_path": round(results["tokenizers"]["mb_per_s"] / results["hf"]["mb_per_s"], 3),
              "target_ratio": 8.0, "shards_identical": identical, "shards_sha256": shards,
              "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
    if args.scale > 1:
        scaled = run_side(__file__, "ours", [*argv, f"--_copies={args.scale}"])
        scaled["mb_per_s"] = round(mb * args.scale / scaled["seconds"], 3)
        report["ours_scaled"] = {"copies": args.scale, **scaled}
    lines = [f"data prep, {mb:.1f} MB of text, seq_len {args.seq_len}, {report['workers']} worker(s), medians of "
             f"{args.rounds} alternating rounds:"]
    rows = [(f"ours (full_sentences, {results['ours']['encoder']})", results["ours"], mb),
            ("ours (full_sentences, tokenizers)", results["tokenizers"], mb),
            ("run_mlm.py (group_texts)", results["hf"], mb),
            ("tokenizers encode_batch only (ceiling)", results["ceiling"], mb),
            ("tiktoken encode_ordinary only (ceiling)", results["tiktoken"], mb)]
    if "ours_scaled" in report:
        rows.append((f"ours, corpus x{args.scale}", report["ours_scaled"], mb * args.scale))
    table = ["| side | MB of text | MB/s | seconds | blocks | padding | dropped tokens | peak memory (MB) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r, size in rows:
        lines.append(f"  {name:26} {r['mb_per_s']:7.2f} MB/s  {r['seconds']:7.2f} s  {r['blocks']:>9,} blocks  "
                     f"padding {r['padding_fraction']:.2%}  dropped {r['dropped_tokens']:,} tokens  "
                     f"peak {r['peak_rss_mb']} MB")
        table.append(f"| {name} | {size:.1f} | {r['mb_per_s']:.2f} | {r['seconds']:.1f} | {r['blocks']:,} | "
                     f"{r['padding_fraction']:.2%} | {r['dropped_tokens']:,} | {r['peak_rss_mb']} |")
    lines.append(f"  ratio {ratio:.2f}x (target >= 8x); ours at {share:.0%} of its encoder's ceiling; shards of "
                 f"both encoders identical: {identical}")
    if "ours_scaled" in report and report["ours_scaled"]["peak_rss_mb"] and results["ours"]["peak_rss_mb"]:
        growth = report["ours_scaled"]["peak_rss_mb"] / results["ours"]["peak_rss_mb"]
        report["memory_growth"] = round(growth, 3)
        lines.append(f"  peak memory x{growth:.2f} for a corpus x{args.scale} (flat: about x1)")
    print("\n".join(lines))
    md = [f"Data prep of {Path(args.corpus).name} ({mb:.1f} MB), seq_len {args.seq_len}, {report['workers']} "
          f"worker(s) on {os.cpu_count()} CPUs, same tokenizer (vocab {args.vocab_size}) on both sides.", "",
          f"Medians of {args.rounds} alternating rounds (seconds of each run in data.json); the machine's load "
          f"average (1 min) was {report['load_average'][0]} before the rounds and {report['load_average'][1]} after "
          f"({os.cpu_count()} CPUs: above that, other processes took part of the time of every side).", "",
          *table, "", f"Throughput ratio ours / run_mlm.py: **{ratio:.2f}x** (target >= 8x; with the `tokenizers` "
          f"encoder {report['ratio_tokenizers_path']:.2f}x); ours runs at {share:.0%} of its encoder alone on the same "
          "documents (no packing, no I/O).",
          f"Shards written with tiktoken and with `tokenizers`: {'identical' if identical else 'DIFFERENT'} "
          f"(sha256 of train.tokens.bin {next(iter(shards.values()))['train.tokens.bin'][:16]}...)."]
    if "memory_growth" in report:
        md.append(f"Peak memory for the corpus x{args.scale}: x{report['memory_growth']:.2f} of the 1x run.")
    if args.mixture:
        mixture = mixture_rows(args, argv, report)
        print("\n".join(mixture[1:]))
        md += mixture
    write_results(args.out, "data", report, md)
    if not identical:
        raise SystemExit(f"bench_data: the two encoders wrote different shards: {shards}")


if __name__ == "__main__":
    main()
