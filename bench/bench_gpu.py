"""One prepared GPU check (issue 32): what a session with a GPU runs first, as one script, in under 8 minutes.

The CPU benches cannot tell what the GPU paths do: the variable-length flash kernel, SDPA's fused kernels,
compile at bf16, FSDP2 with NCCL. Here, at base size (configs/roberta-base.yaml's model, seq 512, vocabulary
50265, micro-batch 32, bf16-mixed), parts that each record their figures or their one-line error:

  ours-eager, ours-compiled, hf   tokens/s, MFU and peak memory (`torch.cuda.max_memory_allocated`), the three
                                  sides alternating over `--rounds` (medians of per-step times after warm-up;
                                  bench_train.py's run_ours and run_hf: HF is RobertaForMaskedLM with SDPA,
                                  DataCollatorForLanguageModeling and Trainer with bf16=True);
  kernels                         a profiled training step of ours, DOC-SENTENCES (padded rows) without attention
                                  dropout: every varlen attention call (torch.nn.attention.varlen) must run a
                                  flash kernel, and every `scaled_dot_product_attention` call (the last layer's
                                  short queries against all keys, `at_rows`) a fused kernel (flash, memory-efficient
                                  or cuDNN), never SDPA's math fallback; kernel names from torch.profiler;
  fsdp                            2 optimizer steps with `trainer.strategy: fsdp` (FSDP2) on the one GPU;
  fp32-validation                 `trainer.precision: 32-true` on padded rows through a validation run.

A part that fails is recorded as failed with its error's last line and the others still run; a part that would
start past `--budget` seconds is skipped, and an alarm at the budget interrupts the part in flight. Results are
rewritten after every part (bench/results/gpu.{json,md}, or --out), so a cut-off run still leaves what it did.
`--device cpu --smoke` runs every part at toy sizes on a CPU in seconds (tests/test_bench_gpu.py): the kernel
assertions, CUDA-only, are then reported as not checked.

    python bench/bench_gpu.py                              # on a machine with a GPU (see docs/benchmarks.md)
    python bench/bench_gpu.py --device cpu --smoke --out /tmp/gpu-smoke
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from bench_train import WARMUP, model_flops_per_token, run_hf, run_ours
from common import ROOT, SHARED_CORPUS, write_results

from data_prep.config import load_config
from data_prep.prepare import prepare_data

BASE_CONFIG = ROOT / "configs" / "roberta-base.yaml"
SMOKE_MODEL = ("--model.num_layers=2", "--model.hidden_size=32", "--model.num_heads=2", "--model.intermediate_size=64",
               "--tokenizer.vocab_size=400", "--data.seq_len=64")
PARTS = ("ours-eager", "ours-compiled", "hf", "kernels", "fsdp", "fp32-validation")
ESTIMATE_S = {"ours-eager": 25, "ours-compiled": 90, "hf": 30, "kernels": 30, "fsdp": 30, "fp32-validation": 30}
"""Seconds a part may take on one GPU (compile's first round most): the guard skips one that would end past the budget."""
FUSED = ("flash", "fmha", "cudnn", "efficient")
"""Name fragments of SDPA's fused backends (flash, memory-efficient/cutlass fmha, cuDNN), in a call's device kernels
or the aten ops it dispatched to (`aten::_efficient_attention_forward`, ...); the math fallback matches none."""


class Budget(Exception):
    """The global time guard's alarm, raised in the part in flight."""


def experiment(args: argparse.Namespace, *extra: str):
    """configs/roberta-base.yaml on one device, this bench's batch and data (and toy sizes with --smoke)."""
    micro = args.micro_batch
    return load_config(BASE_CONFIG, [
        f"--run_dir={args.work}", f"--corpus.train={args.corpus}", "--corpus.valid_fraction=0.01",
        f"--batch.global_size={micro}", f"--batch.micro_size={micro}", f"--batch.num_workers={args.workers}",
        "--optim.warmup_steps=1", f"--trainer.accelerator={'gpu' if args.cuda else 'cpu'}", "--trainer.devices=1",
        "--trainer.strategy=auto", "--trainer.precision=bf16-mixed", "--trainer.log_every_n_steps=1",
        "--logger.wandb=null", *(SMOKE_MODEL if args.smoke else ()), *extra,
    ])


def peak_memory_reset(args) -> None:
    torch.cuda.reset_peak_memory_stats() if args.cuda else None


def peak_memory_gib(args) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if args.cuda else None


def throughput(args, meta: Path, rounds: int) -> dict[str, dict]:
    """ours-eager, ours-compiled and hf alternating for `rounds`: each side's medians, MFU and peak memory."""
    from pretrain.training.throughput import peak_flops

    cfg = experiment(args)
    sides = [p for p in ("ours-eager", "ours-compiled", "hf") if p in args.parts]
    times: dict[str, list[float]] = {s: [] for s in sides}
    tokens: dict[str, list[int]] = {s: [] for s in sides}
    first: dict[str, list[float]] = {s: [] for s in sides}
    memory: dict[str, list[float]] = {s: [] for s in sides}
    errors: dict[str, str] = {}
    for _ in range(rounds):
        for side in sides:
            if side in errors or not args.time_left(ESTIMATE_S[side] if not first[side] else 0.3 * ESTIMATE_S[side]):
                errors.setdefault(side, "skipped: time guard")
                continue
            peak_memory_reset(args)
            try:
                if side == "hf":
                    timer, n = run_hf(experiment(args), meta, args.steps, cfg.run_path / "tokenizer", args.cuda)
                else:
                    extra = ("--trainer.compile=true",) if side == "ours-compiled" else ()
                    with traced_only(args.smoke and side == "ours-compiled"):
                        timer, n = run_ours(experiment(args, *extra), meta, args.steps, args.cuda)
            except Exception as e:  # noqa: BLE001 - recorded, and the other parts run
                errors[side] = one_line(e)
                if isinstance(e, Budget):
                    raise
                continue
            times[side] += timer.step_times()
            tokens[side].append(n)
            first[side].append(timer.first_step())
            if args.cuda:
                memory[side].append(peak_memory_gib(args))
    device = torch.device("cuda" if args.cuda else "cpu")
    peak, source = peak_flops(device, cfg.trainer.precision)
    m = cfg.model
    out = {}
    for side in sides:
        if not times[side]:
            out[side] = {"status": "failed" if not errors.get(side, "").startswith("skipped") else "skipped",
                         "error": errors.get(side, "no step timed")}
            continue
        rate = statistics.median(tokens[side]) / statistics.median(times[side])
        flops = model_flops_per_token(m.num_layers, m.hidden_size, m.intermediate_size, cfg.data.seq_len,
                                      cfg.tokenizer.vocab_size, last_layer_subset=side != "hf")
        out[side] = {"status": "ok", "tokens_per_s": round(rate), "mfu": round(rate * flops / peak, 4),
                     "first_step_s": round(statistics.median(first[side]), 2), "steps_timed": len(times[side]),
                     "peak_memory_gib": max(memory[side]) if memory[side] else None,
                     "peak_tflops": round(peak / 1e12, 3), "peak_source": source,
                     **({"error_in_a_round": errors[side]} if side in errors else {})}
    return out


@contextlib.contextmanager
def traced_only(enabled: bool):
    """--smoke: `torch.compile` through dynamo's eager backend, which traces the objective (graph breaks and
    tracing errors show) but generates no code: inductor's first compile takes minutes on a loaded CPU."""
    real = torch.compile
    if enabled:
        torch.compile = lambda fn=None, **kw: real(fn, backend="eager", dynamic=kw.get("dynamic"))
    try:
        yield
    finally:
        torch.compile = real


def one_line(e: BaseException) -> str:
    return (f"{type(e).__name__}: {e}".strip().splitlines() or [type(e).__name__])[-1][:300]


def train(cfg, meta: Path, callbacks=()):
    """The project's fit, quiet, no checkpoints or logger; the trainer."""
    from pretrain.training.train import fit

    return fit(cfg, meta, resume=False, callbacks=list(callbacks), enable_progress_bar=False,
               enable_checkpointing=False, logger=False)


def metric(trainer, name: str) -> float | None:
    value = trainer.callback_metrics.get(name)
    return round(float(value), 4) if value is not None else None


def attention_calls(events) -> dict:
    """What a profile's attention calls ran: per call kind, the count, the ops SDPA dispatched to and the device
    kernels under them (the call's own and its descendants')."""

    def below(evt):
        todo, ops, kernels = [evt], [], []
        while todo:
            e = todo.pop()
            ops.append(e.name)
            kernels += [k.name for k in getattr(e, "kernels", [])]
            todo += e.cpu_children
        return ops, kernels

    calls = {"varlen": [], "sdpa": []}
    for evt in events:  # torch_attn::_varlen_attn (torch.nn.attention.varlen's op), SDPA's public op
        op = evt.name.split("::")[-1]
        kind = "varlen" if op.lstrip("_") == "varlen_attn" else "sdpa" if op == "scaled_dot_product_attention" else None
        if kind and not any(p.name == evt.name for p in parents(evt)):
            calls[kind].append(below(evt))
    summary = {}
    for kind, found in calls.items():
        summary[kind] = {
            "calls": len(found),
            "calls_with_fused_kernel": sum(bool(ks) and any(f in name.lower() for name in ks + ops for f in FUSED)
                                           for ops, ks in found),
            "ops": dict(Counter(op for ops, _ in found for op in ops if op.startswith(("aten::_", "torch_attn::")))),
            "kernels": dict(Counter(k for _, ks in found for k in ks).most_common(8)),
        }
    summary["math_fallback_calls"] = sum(e.name == "aten::_scaled_dot_product_attention_math" for e in events)
    return summary


def parents(evt):
    p = evt.cpu_parent
    while p is not None:
        yield p
        p = p.cpu_parent


def kernels_part(args, meta_doc: Path) -> dict:
    """One profiled optimizer step (the third) of ours on padded rows without attention dropout."""
    import pytorch_lightning as pl
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.cuda else [])
    prof = profile(activities=activities)

    class Profile(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if batch_idx == 2:
                prof.start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if batch_idx == 2:
                if args.cuda:
                    torch.cuda.synchronize()
                prof.stop()

    cfg = experiment(args, "--data.packing=doc_sentences", "--model.attention_dropout=0", "--trainer.max_steps=3")
    train(cfg, meta_doc, [Profile()])
    calls = attention_calls(prof.events())
    result = {"status": "ok", **calls}
    if not args.cuda:
        result["checked"] = "no: the flash and fused-kernel assertions are CUDA-only"
        return result
    problems = []
    v, s = calls["varlen"], calls["sdpa"]
    if v["calls"] == 0 or v["calls_with_fused_kernel"] != v["calls"]:
        problems.append(f"varlen: {v['calls_with_fused_kernel']} of {v['calls']} calls ran a flash kernel")
    if s["calls"] == 0 or s["calls_with_fused_kernel"] != s["calls"]:
        problems.append(f"sdpa: {s['calls_with_fused_kernel']} of {s['calls']} calls ran a fused kernel")
    if calls["math_fallback_calls"]:
        problems.append(f"{calls['math_fallback_calls']} SDPA calls took the math fallback")
    result["checked"] = "yes"
    if problems:
        result.update(status="failed", error="; ".join(problems))
    return result


def fsdp_part(args, meta: Path) -> dict:
    """2 optimizer steps of FSDP2 on the one device."""
    cfg = experiment(args, "--trainer.strategy=fsdp", "--trainer.max_steps=2", "--trainer.limit_val_batches=0")
    started = time.perf_counter()
    peak_memory_reset(args)
    trainer = train(cfg, meta)
    return {"status": "ok", "steps": trainer.global_step, "strategy_class": type(trainer.strategy).__name__,
            "train_loss": metric(trainer, "train/loss"), "seconds": round(time.perf_counter() - started, 1),
            "peak_memory_gib": peak_memory_gib(args)}


def fp32_part(args, meta_doc: Path) -> dict:
    """fp32 on padded rows (DOC-SENTENCES) for 4 steps with a validation run after the second and the fourth."""
    cfg = experiment(args, "--trainer.precision=32-true", "--data.packing=doc_sentences", "--trainer.max_steps=4",
                     "--trainer.val_check_interval=2", "--trainer.limit_val_batches=4")
    trainer = train(cfg, meta_doc)
    val = metric(trainer, "val/loss")
    ok = trainer.global_step == 4 and val is not None and val == val and val < float("inf")
    return {"status": "ok" if ok else "failed", "steps": trainer.global_step, "val_loss": val,
            "train_loss": metric(trainer, "train/loss"),
            **({} if ok else {"error": f"no finite val/loss after {trainer.global_step} steps"})}


def markdown(report: dict) -> list[str]:
    parts = report["parts"]
    lines = [f"{report['device']}, torch {report['torch']}, transformers {report['transformers']}; "
             f"{report['model']}, micro-batch {report['micro_batch']}, {report['steps']} timed steps after {WARMUP} "
             f"warm-up, {report['rounds']} alternating round(s); {report['seconds']} s in all.", "",
             "| part | status | tokens/s | MFU | peak memory (GiB) | first step (s) | notes |", "|---|---|---|---|---|---|---|"]
    for name in PARTS:
        p = parts.get(name)
        if p is None:
            continue
        note = p.get("error") or p.get("error_in_a_round") or ""
        if name == "kernels" and "varlen" in p:
            note = note or (f"varlen {p['varlen']['calls_with_fused_kernel']}/{p['varlen']['calls']} flash; sdpa "
                            f"{p['sdpa']['calls_with_fused_kernel']}/{p['sdpa']['calls']} fused; math fallback "
                            f"{p['math_fallback_calls']}; checked: {p['checked']}")
        elif name == "fsdp" and p.get("status") == "ok":
            note = f"{p['steps']} steps ({p['strategy_class']}), loss {p['train_loss']}"
        elif name == "fp32-validation" and "val_loss" in p:
            note = note or f"{p['steps']} steps, val loss {p['val_loss']}"
        lines.append(f"| {name} | {p['status']} | {cell(p, 'tokens_per_s', '{:,}')} | {cell(p, 'mfu', '{:.1%}')} | "
                     f"{cell(p, 'peak_memory_gib')} | {cell(p, 'first_step_s')} | {note} |")
    if report.get("ratios"):
        lines += ["", "Ratios of tokens/s: " + ", ".join(f"{k} {v}x" for k, v in report["ratios"].items()) + "."]
    kernels = parts.get("kernels", {})
    for kind in ("varlen", "sdpa"):
        if kernels.get(kind, {}).get("kernels"):
            lines.append(f"- {kind} kernels: " + ", ".join(f"`{k[:90]}` x{n}" for k, n in kernels[kind]["kernels"].items()))
    return lines


def cell(part: dict, key: str, fmt: str = "{}") -> str:
    return fmt.format(part[key]) if part.get(key) is not None else ""


def guarded(args, report: dict, name: str, fn, *fn_args) -> None:
    """Run one part into report["parts"][name]: its result, or failed with one line, or skipped."""
    if name not in args.parts:
        return
    started = time.perf_counter()
    if not args.time_left(ESTIMATE_S.get(name, 30)):
        result = {"status": "skipped", "error": "skipped: time guard"}
    else:
        try:
            result = fn(*fn_args)
        except Exception as e:  # noqa: BLE001 - recorded, and the other parts run
            result = {"status": "failed", "error": one_line(e) if not isinstance(e, Budget) else "time guard: "
                      "the budget ran out in this part"}
    report["parts"][name] = {**result, "part_seconds": round(time.perf_counter() - started, 1)}
    print(f"{name}: {json.dumps(report['parts'][name])}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--smoke", action="store_true", help="toy sizes: every part in seconds (cpu or cuda)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated of {','.join(PARTS)}")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds: no part starts that would end later")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds of the sides (default 2; --smoke 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per side (default 30; --smoke 2)")
    parser.add_argument("--micro-batch", type=int, default=None, help="sequences per step (default 32; --smoke 4)")
    parser.add_argument("--workers", type=int, default=None, help="loader workers (default 4; --smoke 0)")
    parser.add_argument("--corpus", default=str(SHARED_CORPUS), help="a text file; when missing, the embedded corpus")
    parser.add_argument("--work", default=str(ROOT / "runs" / "bench" / "gpu"))
    parser.add_argument("--out", default=None, help="default bench/results (--smoke: the work directory)")
    args = parser.parse_args()
    args.cuda = args.device == "cuda"
    if args.cuda and not torch.cuda.is_available():
        print("error: --device cuda, but torch sees no GPU here: use --device cpu --smoke to check the script",
              file=sys.stderr)
        return 2
    smoke = args.smoke
    args.out = args.out or (args.work if smoke else str(ROOT / "bench" / "results"))
    args.rounds = args.rounds or (1 if smoke else 2)
    args.steps = args.steps or (2 if smoke else 30)
    args.micro_batch = args.micro_batch or (4 if smoke else 32)
    args.workers = args.workers if args.workers is not None else (0 if smoke else 4)
    args.parts = args.parts.split(",")
    if smoke and not args.cuda:  # toy tensors: a second thread only waits (on a loaded machine, spinning)
        torch.set_num_threads(1)
    args.corpus = str(Path(args.corpus).resolve()) if Path(args.corpus).is_file() else "builtin:python-docs"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    began = time.monotonic()
    args.time_left = lambda need: time.monotonic() - began + need <= args.budget

    def alarm(*_):
        raise Budget("time guard")

    signal.signal(signal.SIGALRM, alarm)
    signal.alarm(max(1, int(args.budget)))
    import transformers

    cfg = experiment(args)
    report = {"device": torch.cuda.get_device_name() if args.cuda else "cpu", "torch": torch.__version__,
              "transformers": transformers.__version__, "smoke": smoke, "corpus": args.corpus,
              "model": f"{cfg.model.num_layers}x{cfg.model.hidden_size}, seq {cfg.data.seq_len}, vocab "
              f"{cfg.tokenizer.vocab_size}, {cfg.trainer.precision}", "micro_batch": args.micro_batch,
              "steps": args.steps, "rounds": args.rounds, "parts": {}, "seconds": 0}

    def save() -> None:
        report["seconds"] = round(time.monotonic() - began, 1)
        write_results(args.out, "gpu" if not smoke else f"gpu-smoke-{args.device}", report, markdown(report))

    try:
        meta = prepare_data(cfg)
        meta_doc = prepare_data(experiment(args, "--data.packing=doc_sentences"))
        if any(p in args.parts for p in ("ours-eager", "ours-compiled", "hf")):
            try:
                report["parts"].update(throughput(args, meta, args.rounds))
            except Budget:
                report["parts"]["throughput"] = {"status": "failed", "error": "time guard: the budget ran out"}
        rates = {k: v.get("tokens_per_s") for k, v in report["parts"].items()}
        for a, b in (("ours-eager", "hf"), ("ours-compiled", "hf"), ("ours-compiled", "ours-eager")):
            if rates.get(a) and rates.get(b):
                report.setdefault("ratios", {})[f"{a} / {b}"] = round(rates[a] / rates[b], 3)
        save()
        for name, fn, data in (("kernels", kernels_part, meta_doc), ("fp32-validation", fp32_part, meta_doc),
                               ("fsdp", fsdp_part, meta)):  # FSDP last: its process group outlives its run
            guarded(args, report, name, fn, args, data)
            save()
    except Budget:
        report["parts"]["data"] = {"status": "failed", "error": "time guard: the budget ran out preparing data"}
    finally:
        signal.alarm(0)
        save()
    failed = [k for k, v in report["parts"].items() if v.get("status") != "ok"]
    print("\n".join(markdown(report)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
