"""Tokenizer training, side by side: `make tokenizer`'s trainer against calling `tokenizers` directly.

    python bench/bench_tokenizer.py [--corpus ../shared/corpus/kernel_docs.txt] [--vocab_size 50265] [--rounds 3]

Both sides train the same byte-level BPE (RoBERTa's pre-tokenizer, special tokens, vocabulary size and minimum
frequency) on the same text file, each in its own process, alternating (ours, direct, ours, direct, ...) so that
machine noise hits both:
- ours: `data_prep.tokenizer_training.train_tokenizer`, the streaming corpus reader feeding `train_from_iterator`, timed
  to the end of training (the quality report on the validation text, which `tokenizers` does not make, is not
  timed; its validation text is one line here);
- direct: `Tokenizer.train([file], BpeTrainer(...))`, the Rust reader, what a user of `tokenizers` would write.
Reports median seconds, the ratio (direct / ours: above 1 means ours is faster), and peak memory (the process
tree's resident set), also on the corpus read `--scale` times over: BPE training holds word counts, not text,
so memory should stay flat as the corpus grows. Writes bench/results/tokenizer.json and tokenizer.md.

With `--cap_mb` (default 4), one more pair of rows: ours with `tokenizer.max_train_bytes` on a three-source
weighted mixture (the corpus cut into three pieces at document boundaries, weights 1, 2 and 0.5), at 1x and at
10x the corpus (each piece ten times over): time and peak memory should be the same at both sizes, since the
sample reads only what it keeps. `--rounds 0` runs only those rows (written to tokenizer-capped.{json,md}).
"""

from __future__ import annotations

import argparse
import json
import os
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


def side_ours(args: argparse.Namespace) -> dict:
    from data_prep.config import load_config
    from data_prep.tokenizer_training import train_tokenizer

    with tempfile.TemporaryDirectory() as run:
        valid = Path(run) / "valid.txt"
        valid.write_text("A line of validation text.\n")
        cfg = load_config(None, [f"--run_dir={run}", f"--corpus.train={repeated_corpus(args.corpus, args._copies)}",
                                 f"--corpus.valid=[{valid}]",
                                 f"--tokenizer.vocab_size={args.vocab_size}",
                                 f"--tokenizer.min_frequency={args.min_frequency}"])
        out = train_tokenizer(cfg, force=True, log=lambda _: None)
        report = json.loads((out / "quality.json").read_text())
    return {"seconds": report["train_seconds"], "vocab_size": report["vocab_size"]}


def side_read(args: argparse.Namespace) -> dict:
    """What `make tokenizer` spends outside the trainer: the same documents, read and batched as
    `train_tokenizer` feeds them to `train_from_iterator` (`training_documents`, `_batches`), not trained on."""
    from data_prep.config import load_config
    from data_prep.corpus import Corpus
    from data_prep.readers import CorpusStats
    from data_prep.tokenizer_training import _batches, training_documents

    cfg = load_config(None, [f"--run_dir={args.run_dir}", f"--corpus.train={repeated_corpus(args.corpus, args._copies)}",
                             "--corpus.valid_fraction=0"])
    start = time.perf_counter()
    stats = CorpusStats()

    class Bar:
        def update(self, _: int) -> None:
            pass

    chars = sum(len(t) for batch in _batches(training_documents(Corpus.of_experiment(cfg), 0, stats, []), stats, Bar())
                for t in batch)
    return {"seconds": time.perf_counter() - start, "chars": chars}


def side_capped(args: argparse.Namespace) -> dict:
    from data_prep.config import load_config
    from data_prep.tokenizer_training import train_tokenizer

    # the pieces outside the run_dir: a corpus glob never matches what the run writes (Corpus.of_experiment)
    with tempfile.TemporaryDirectory() as run, tempfile.TemporaryDirectory() as work:
        pieces = Path(work)
        valid = Path(run) / "valid.txt"
        valid.write_text("A line of validation text.\n")
        train = json.dumps(mixture_sources(args.corpus, args._copies, pieces))
        cfg = load_config(None, [f"--run_dir={run}", f"--corpus.train={train}", f"--corpus.valid=[{valid}]",
                                 f"--tokenizer.vocab_size={args.vocab_size}",
                                 f"--tokenizer.min_frequency={args.min_frequency}",
                                 f"--tokenizer.max_train_bytes={int(args.cap_mb * 1e6)}"])
        out = train_tokenizer(cfg, force=True, log=lambda _: None)
        report = json.loads((out / "quality.json").read_text())
    return {"seconds": report["train_seconds"], "vocab_size": report["vocab_size"],
            "train_bytes": report["train_bytes"], "bytes_read": report["bytes_read"],
            "read": {r["name"]: r["bytes"] for r in report["sources"]}}


def capped_rows(args: argparse.Namespace, argv: list[str], report: dict) -> list[str]:
    """The capped mixture at 1x and 10x: its markdown table; the figures go into `report["capped"]`."""
    mb = Path(args.corpus).stat().st_size / 1e6
    rows = {}
    for copies in (1, 10):
        rows[copies] = run_side(__file__, "capped", [*argv, f"--cap_mb={args.cap_mb}", f"--_copies={copies}"])
    report["capped"] = {"cap_mb": args.cap_mb, "weights": {"first": 1.0, "second": 2.0, "third": 0.5},
                        "rows": {f"{c}x": r for c, r in rows.items()}}
    table = ["| corpus (3 sources, weights 1 / 2 / 0.5) | cap | s | peak MB | MB read | MB kept (first / second / third) |",
             "|---|---|---|---|---|---|"]
    for c, r in rows.items():
        kept = " / ".join(f"{b / 1e6:.2f}" for b in r["read"].values())
        table.append(f"| {c}x ({c * mb:.0f} MB) | {args.cap_mb:g} MB | {r['seconds']} | {r['peak_rss_mb']} | "
                     f"{r['bytes_read'] / 1e6:.1f} | {kept} |")
    return ["", f"`tokenizer.max_train_bytes` on a weighted mixture, vocab {args.vocab_size}:", "", *table]


def side_direct(args: argparse.Namespace) -> dict:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    start = time.perf_counter()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=args.vocab_size - 1, min_frequency=args.min_frequency,
                                  special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train([args.corpus] * args._copies, trainer=trainer)
    tok.add_special_tokens([AddedToken("<mask>", lstrip=True, special=True)])
    return {"seconds": time.perf_counter() - start, "vocab_size": tok.get_vocab_size()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default=str(SHARED_CORPUS), help="raw text file")
    p.add_argument("--vocab_size", type=int, default=50265)
    p.add_argument("--min_frequency", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="alternating (ours, direct) rounds on the corpus")
    p.add_argument("--scale", type=int, default=4, help="one more round on the corpus this many times over; 0: skip")
    p.add_argument("--cap_mb", type=float, default=4.0, help="the capped mixture rows' tokenizer.max_train_bytes "
                   "in MB; 0: skip them")
    p.add_argument("--out", default=str(ROOT / "bench/results"))
    p.add_argument("--run_dir", default=str(ROOT / "runs/bench-tokenizer"), help="scratch run_dir of the read side")
    p.add_argument("--_side", choices=["ours", "direct", "capped", "read"], help=argparse.SUPPRESS)
    p.add_argument("--_copies", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._side:
        sides = {"ours": side_ours, "direct": side_direct, "capped": side_capped, "read": side_read}
        print(json.dumps(sides[args._side](args)))
        return
    args.corpus = default_corpus(args.corpus)
    argv = [f"--corpus={args.corpus}", f"--vocab_size={args.vocab_size}", f"--min_frequency={args.min_frequency}"]
    if args.rounds == 0:  # only the capped rows, into their own files so the side-by-side results stay
        report = {"corpus": args.corpus, "vocab_size": args.vocab_size, "cpus": os.cpu_count()}
        md = capped_rows(args, argv, report)[1:]
        print("\n".join(md))
        write_results(args.out, "tokenizer-capped", report, md)
        return
    runs: dict[str, list[dict]] = {"ours": [], "direct": []}
    for _ in range(args.rounds):
        for side in runs:
            runs[side].append(run_side(__file__, side, argv))
    mb = Path(args.corpus).stat().st_size / 1e6
    report = {"corpus": args.corpus, "corpus_mb": round(mb, 2), "vocab_size": args.vocab_size,
              "cpus": os.cpu_count(), "sides": {}}
    for side, rs in runs.items():
        report["sides"][side] = {"median_seconds": round(statistics.median(r["seconds"] for r in rs), 2),
                                 "all_seconds": [round(r["seconds"], 2) for r in rs],
                                 "peak_rss_mb": max(r["peak_rss_mb"] or 0 for r in rs),
                                 "vocab_size": rs[0]["vocab_size"]}
    if args.scale > 1:
        for side in runs:
            r = run_side(__file__, side, [*argv, f"--_copies={args.scale}"])
            report["sides"][side].update(scaled_seconds=round(r["seconds"], 2), scaled_peak_rss_mb=r["peak_rss_mb"])
        report["scale"] = args.scale
    ours, direct = report["sides"]["ours"], report["sides"]["direct"]
    report["ratio"] = round(direct["median_seconds"] / ours["median_seconds"], 3)
    # where make tokenizer's time goes: reading and batching the text, the rest is the trainer (counting + merges)
    reads = {c: run_side(__file__, "read", [*argv, f"--_copies={c}"])["seconds"]
             for c in sorted({1, max(1, args.scale)})}
    trained = {1: ours["median_seconds"], **({args.scale: ours["scaled_seconds"]} if args.scale > 1 else {})}
    report["breakdown"] = {f"{c}x": {"read_seconds": round(reads[c], 2), "total_seconds": trained[c],
                                     "trainer_share": round(1 - reads[c] / trained[c], 3)} for c in trained}
    table = ["| side | median s | peak MB | " + (f"s at x{args.scale} | peak MB at x{args.scale} |" if args.scale > 1
                                                 else ""),
             "|---|---|---|" + ("---|---|" if args.scale > 1 else "")]
    for name, r in (("ours (make tokenizer)", ours), ("tokenizers direct", direct)):
        row = f"| {name} | {r['median_seconds']} | {r['peak_rss_mb']} |"
        if args.scale > 1:
            row += f" {r['scaled_seconds']} | {r['scaled_peak_rss_mb']} |"
        table.append(row)
    md = [f"Byte-level BPE training on {Path(args.corpus).name} ({mb:.1f} MB), vocab {args.vocab_size}, "
          f"{os.cpu_count()} CPUs, {args.rounds} alternating rounds.", "", *table, "",
          f"Speed ratio direct / ours: **{report['ratio']:.2f}x** (target >= 1: no slower than `tokenizers`).", "",
          "Where `make tokenizer`'s time goes (reading and batching the corpus, timed alone; the rest is "
          "`tokenizers`' trainer: pre-tokenizing and counting words, then the merges):", "",
          "| corpus | make tokenizer s | reading s | trainer's share |", "|---|---|---|---|",
          *[f"| {c} ({mb * int(c[:-1]):.0f} MB) | {b['total_seconds']} | {b['read_seconds']} | "
            f"{b['trainer_share']:.0%} |" for c, b in report["breakdown"].items()]]
    if args.scale > 1:
        growth = ours["scaled_seconds"] / ours["median_seconds"]
        report["time_growth"] = round(growth, 3)
        md += ["", f"At x{args.scale} the corpus, `make tokenizer` takes x{growth:.2f} the time (memory "
               f"x{ours['scaled_peak_rss_mb'] / ours['peak_rss_mb']:.2f}): without a cap the trainer's cost grows "
               "with the text; `tokenizer.max_train_bytes` bounds it (below)."]
    if args.cap_mb:
        md += capped_rows(args, argv, report)
    print("\n".join(md))
    write_results(args.out, "tokenizer", report, md)


if __name__ == "__main__":
    main()
