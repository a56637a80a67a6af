"""Memory per rank, DDP against FSDP2, on 2 CPU ranks (gloo), through the project's own `fit`.

What sharding buys is memory: AdamW keeps two fp32 moments per parameter, so DDP holds 16 bytes per parameter on
every rank (weights, gradients, two moments) and FSDP2 (`trainer.strategy: fsdp`, `fully_shard` per layer) about
16/W. This bench trains the same config both ways, a few optimizer steps each, and reads on every rank:

- the bytes of parameters + gradients + optimizer state the rank holds: the sum over its tensors of the *local*
  shard's numel x element size (a DTensor's `to_local()`), taken at the end of the last optimizer step, when the
  gradients of that step are still there;
- the rank's peak resident set (VmHWM of /proc/self/status; `getrusage` where there is no /proc), which adds to
  the states the interpreter and torch (~0.4 GB), activations, DDP's gradient buckets, FSDP2's all-gathered
  layers, and whatever the allocator keeps (`trainer.retain_host_memory`: on as shipped, and off, both measured);
  also after the model's setup (sharded, before the first step) and after each step, to show where the peak is.

Each (size, strategy) is one `fit` in a fresh process that Lightning makes 2 ranks of (its subprocess launcher runs
this script again as rank 1); every rank writes its figures to a JSON file at the end of training. A run whose
estimated need (`GUARD_BYTES_PER_PARAMETER` per parameter and rank, plus 0.5 GB) exceeds MemAvailable is skipped and
says so rather than have the kernel's OOM killer pick a victim on a shared machine.

    python bench/bench_memory.py                          # base (12x768) and large (24x1024), DDP and FSDP2
    python bench/bench_memory.py --sizes base --retain on --steps 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, SHARED_CORPUS, write_results

SIZES = {
    # name: (layers, hidden, heads, ffn): RoBERTa's base and large (Table 9)
    "base": (12, 768, 12, 3072),
    "large": (24, 1024, 16, 4096),
}
STRATEGIES = {"ddp": "DDP", "fsdp": "FSDP2"}
VOCAB = 50265
RANKS = 2
GUARD_BYTES_PER_PARAMETER, GUARD_OVERHEAD = 28, 0.5 * 2**30
"""The memory guard's need per rank: the peaks seen here were 25-30 bytes per parameter beyond the interpreter's
~0.4 GB, FSDP2's above DDP's (every rank builds the whole model before sharding it; see docs/benchmarks.md)."""


def experiment(work: str, corpus: str, size: str, strategy: str, seq_len: int, steps: int, retain: bool = True):
    from data_prep.config import load_config

    layers, hidden, heads, ffn = SIZES[size]
    return load_config(None, [
        f"--run_dir={work}", f"--corpus.train={corpus}", "--corpus.valid_fraction=0.01",
        f"--tokenizer.vocab_size={VOCAB}", f"--data.seq_len={seq_len}", f"--model.num_layers={layers}",
        f"--model.hidden_size={hidden}", f"--model.num_heads={heads}", f"--model.intermediate_size={ffn}",
        f"--batch.global_size={RANKS}", "--batch.micro_size=1", "--batch.num_workers=0", "--optim.warmup_steps=1",
        "--trainer.accelerator=cpu", f"--trainer.devices={RANKS}", f"--trainer.strategy={strategy}",
        "--trainer.precision=32-true", f"--trainer.max_steps={steps}", "--trainer.log_every_n_steps=1",
        f"--trainer.retain_host_memory={str(retain).lower()}", "--logger.wandb=null",
    ])


def parameter_count(size: str, seq_len: int) -> int:
    """Parameters of the project's model at `size` with the bench's vocabulary and positions (the tied decoder
    counted once), built on the meta device: no memory."""
    import torch

    from pretrain.model.config import RobertaConfig
    from pretrain.model.encoder import RobertaForMLM

    layers, hidden, heads, ffn = SIZES[size]
    with torch.device("meta"):
        model = RobertaForMLM(RobertaConfig(vocab_size=VOCAB, hidden_size=hidden, num_layers=layers, num_heads=heads,
                                            intermediate_size=ffn, max_position_embeddings=seq_len + 2))
    return sum(p.numel() for p in model.parameters())


def status_mb(field: str) -> float | None:
    """A memory line of /proc/self/status (VmHWM, VmRSS) in MiB, or None without /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def local_bytes(t) -> int:
    """Bytes of the part of `t` this rank holds: a DTensor's local shard, else the whole tensor."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        t = t.to_local()
    return t.numel() * t.element_size()


def held_state(module, optimizers) -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer state this rank holds (tied parameters counted once)."""
    import torch

    params = list({id(p): p for p in module.parameters()}.values())
    optim = sum(local_bytes(v) for opt in optimizers for state in opt.state.values() for v in state.values()
                if isinstance(v, torch.Tensor))
    return {"param_bytes": sum(local_bytes(p) for p in params),
            "grad_bytes": sum(local_bytes(p.grad) for p in params if p.grad is not None),
            "optimizer_bytes": optim,
            "param_numel": sum(local_bytes(p) // p.element_size() for p in params)}


def side(args: argparse.Namespace) -> int:
    """One (size, strategy) run; Lightning runs this function again as rank 1 (same argv, LOCAL_RANK set)."""
    import pytorch_lightning as pl

    from pretrain.training.train import fit, training_data

    size, strategy, retain = args._side.split(":")
    rss_start = status_mb("VmRSS")
    cfg = experiment(args.work, args.corpus, size, strategy, args.seq_len, args.steps, retain == "on")
    meta = training_data(cfg, log=lambda *_: None)  # built by the parent: a check here
    out = Path(args.side_out)
    state: dict[str, int] = {}
    peaks: list[float | None] = []  # VmHWM once the model is set up (sharded), then after each optimizer step
    started = time.perf_counter()

    class Measure(pl.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            peaks.append(status_mb("VmHWM"))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if (batch_idx + 1) % trainer.accumulate_grad_batches:
                return
            peaks.append(status_mb("VmHWM"))
            if trainer.global_step == trainer.max_steps:
                state.update(held_state(pl_module, trainer.optimizers))

        def on_train_end(self, trainer, pl_module) -> None:
            peak = status_mb("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            record = {"rank": trainer.global_rank, "world_size": trainer.world_size, "steps": trainer.global_step,
                      "strategy_class": type(trainer.strategy).__name__, "peak_rss_mb": round(peak, 1),
                      "rss_end_mb": status_mb("VmRSS"), "rss_start_mb": rss_start, "peak_rss_by_step_mb": peaks,
                      "seconds": round(time.perf_counter() - started, 1), **state}
            (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
            trainer.strategy.barrier("bench-memory-written")  # rank 0 returns once every rank's file is there

    fit(cfg, meta, resume=False, callbacks=[Measure()], enable_progress_bar=False, enable_checkpointing=False,
        logger=False, limit_val_batches=0)
    return 0


def mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def run_one(args: argparse.Namespace, size: str, strategy: str, retain: str) -> dict:
    """Both ranks' records of one (size, strategy, host-memory setting), or {"skipped"/"failed": why}."""
    params = parameter_count(size, args.seq_len)
    need = RANKS * (GUARD_BYTES_PER_PARAMETER * params + GUARD_OVERHEAD)
    available = mem_available()
    if available is not None and need > available:
        return {"skipped": f"needs about {need / 2**30:.1f} GB, {available / 2**30:.1f} GB available"}
    out = Path(args.work) / "memory" / f"{size}-{strategy}-{retain}"
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("rank*.json"):
        old.unlink()
    argv = [sys.executable, str(Path(__file__).resolve()), "--_side", f"{size}:{strategy}:{retain}", "--side-out", str(out),
            "--work", args.work, "--corpus", args.corpus, "--seq-len", str(args.seq_len), "--steps", str(args.steps)]
    started = time.perf_counter()
    proc = subprocess.run(argv, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    seconds = round(time.perf_counter() - started, 1)
    records = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"))]
    if proc.returncode or len(records) != RANKS:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"failed": f"exit {proc.returncode}, {len(records)} of {RANKS} ranks reported: {last}"[:400],
                "seconds": seconds}
    return {"ranks": sorted(records, key=lambda r: r["rank"]), "seconds": seconds, "parameters": params}


def state_bytes(rank: dict) -> int:
    return rank["param_bytes"] + rank["grad_bytes"] + rank["optimizer_bytes"]


def peak_rss(rank: dict) -> float:
    return rank["peak_rss_mb"]


def median(row: dict, key) -> float:
    """The median over a row's ranks of key(rank)."""
    values = sorted(key(r) for r in row["ranks"])
    return (values[(len(values) - 1) // 2] + values[len(values) // 2]) / 2


def markdown(report: dict) -> list[str]:
    lines = ["| size | strategy | host memory kept | peak RSS per rank (MB) | params + grads + AdamW per rank (MB) | of which params | "
             "state ratio FSDP2 / DDP | peak RSS ratio FSDP2 / DDP | peak RSS after setup, after step 1 (rank 0) | run time |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        label = f"{row['size']} ({row['layers']}x{row['hidden']}, {row['parameters'] / 1e6:.0f}M)"
        if "ranks" not in row:
            lines.append(f"| {label} | {row['strategy']} | {row['retain']} | "
                         f"{row.get('skipped') or 'failed: ' + row['failed']} | | | | | | |")
            continue
        rss = " / ".join(f"{r['peak_rss_mb']:,.0f}" for r in row["ranks"])
        states = " / ".join(f"{state_bytes(r) / 2**20:,.0f}" for r in row["ranks"])
        params = " / ".join(f"{r['param_bytes'] / 2**20:,.0f}" for r in row["ranks"])
        ratios = row.get("ratio_to_ddp", {})
        setup = ", ".join(f"{p:,.0f}" for p in row["ranks"][0]["peak_rss_by_step_mb"][:2])
        lines.append(f"| {label} | {row['strategy']} | {row['retain']} | {rss} | {states} | {params} | "
                     f"{ratios.get('state', '')}{'x' if ratios else ''} | {ratios.get('peak_rss', '')}"
                     f"{'x' if ratios else ''} | {setup} | {row['seconds']} s |")
    lines += ["", f"Rank 0 / rank 1; {RANKS} CPU ranks (gloo), fp32, seq {report['seq_len']}, micro-batch 1 per rank, "
              f"{report['steps']} optimizer steps, vocabulary {VOCAB}; {report['machine']}. States: the local shards' "
              "bytes at the end of the last step (`bench/bench_memory.py`); peak RSS: VmHWM, the interpreter and "
              "torch included; host memory kept: `trainer.retain_host_memory` (on as shipped: freed memory stays in the "
              "process). Ratios: medians over ranks, FSDP2 over DDP of the same size and host-memory setting."]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="base,large", help=f"comma-separated of {','.join(SIZES)}")
    parser.add_argument("--strategies", default="ddp,fsdp", help="comma-separated of ddp,fsdp")
    parser.add_argument("--retain", default="on,off", help="trainer.retain_host_memory settings: comma-separated "
                        "of on,off")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per run")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--corpus", default=str(SHARED_CORPUS))
    parser.add_argument("--work", default=str(ROOT / "runs" / "bench" / "memory"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--append", action="store_true", help="keep the rows of OUT/memory.json that this run does "
                        "not measure (e.g. add the large rows on a quieter machine)")
    parser.add_argument("--_side", help=argparse.SUPPRESS)
    parser.add_argument("--side-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args._side:
        return side(args)
    args.corpus = str(Path(args.corpus).resolve()) if Path(args.corpus).is_file() else "builtin:python-docs"
    from data_prep.prepare import prepare_data

    sizes, strategies = args.sizes.split(","), args.strategies.split(",")
    prepare_data(experiment(args.work, args.corpus, sizes[0], "ddp", args.seq_len, args.steps))  # shared by all runs
    import torch

    report = {"machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}", "seq_len": args.seq_len,
              "steps": args.steps, "corpus": args.corpus, "rows": []}
    for size in sizes:
        layers, hidden, _, _ = SIZES[size]
        for retain in args.retain.split(","):
            by_strategy = {}
            for strategy in strategies:
                row = {"size": size, "layers": layers, "hidden": hidden, "strategy": STRATEGIES[strategy],
                       "retain": retain, "parameters": parameter_count(size, args.seq_len),
                       **run_one(args, size, strategy, retain)}
                by_strategy[strategy] = row
                report["rows"].append(row)
                print(json.dumps(row), flush=True)
            ddp, fsdp = by_strategy.get("ddp"), by_strategy.get("fsdp")
            if ddp and fsdp and "ranks" in ddp and "ranks" in fsdp:
                fsdp["ratio_to_ddp"] = {"state": round(median(fsdp, state_bytes) / median(ddp, state_bytes), 3),
                                        "peak_rss": round(median(fsdp, peak_rss) / median(ddp, peak_rss), 3)}
    previous = Path(args.out) / "memory.json"
    if args.append and previous.is_file():
        measured = {(r["size"], r["strategy"], r["retain"]) for r in report["rows"]}
        kept = [r for r in json.loads(previous.read_text())["rows"] if (r["size"], r["strategy"], r["retain"])
                not in measured]
        report["rows"] = sorted(kept + report["rows"], key=lambda r: (list(SIZES).index(r["size"]),
                                                                      r["retain"] == "off", r["strategy"] != "DDP"))
    write_results(args.out, "memory", report, markdown(report))
    print("\n".join(markdown(report)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
