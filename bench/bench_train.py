"""Training throughput, side by side, in one run: this project against Hugging Face's recipe, and against itself.

Hugging Face's recipe is what `run_mlm.py` does: `transformers.RobertaForMaskedLM` (SDPA attention) +
`DataCollatorForLanguageModeling` + `Trainer` (AdamW, same betas/eps/decay, linear schedule; `bf16=True` for the
bf16 rows). Ours: `pretrain/` through Lightning (sparse MLM head, static shapes, unpadded attention). Each row
compares two configurations, A and B, run alternately in this process (A, B, A, B, ...) so that machine noise
hits both; the figures are medians of per-step times after warm-up, and the headline is the ratio B/A time.

Rows:
  ours vs HF      the same model, data and batch at fp32, and at bf16-mixed on both sides; ours as it ships
                  (`trainer.retain_host_memory` on: pretrain/training/host_memory.py), HF as run_mlm.py runs (glibc's default);
  fp32-retained   the same, with HF given our host-memory setting too: what the rest of ours is worth;
  compiled        ours with `trainer.compile: true` vs eager (the first step's time, mostly compilation, reported);
  unpadded        ours on DOC-SENTENCES (rows end at document ends, so batches are padded) with
                  `trainer.unpad` on vs off;
  last-layer      ours with `trainer.last_layer_subset` on vs off (the last layer at the MLM targets only).

MFU: the MLM objective's FLOPs (LM head on the masked share) x tokens/s over the peak of the row's dtype: the best
matmul FLOP/s torch reaches here on a CPU, the datasheet figure on a GPU. Ours counts what its step computes (the
last layer at the targets, `trainer.last_layer_subset`); HF is given the same count with the whole last layer, though
its dense head does several times the head's work.

    python bench/bench_train.py                                # small (4x256, vocab 50265, 32x128) rows, then base
    python bench/bench_train.py --sizes small --rows fp32,bf16
    python bench/bench_train.py --device cuda                  # base, seq 512, bf16: eager, compiled, HF (SDPA)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import hf_mlm_model, hf_training_args

from data_prep.config import load_config
from data_prep.prepare import prepare_data
from data_prep.shards import open_split

ROOT = Path(__file__).resolve().parent.parent

SIZES = {
    # name: (layers, hidden, heads, ffn, seq_len, micro batch, measured steps per round)
    "small": (4, 256, 4, 1024, 128, 32, 12),
    "base": (12, 768, 12, 3072, 512, 4, 6),
}
GPU_SIZES = {"base": (12, 768, 12, 3072, 512, 32, 30)}
WARMUP = 3
ROWS = {
    # name: (precision, A, B): a side is "hf" or ours with overrides
    "fp32": ("32-true", "hf", ()),
    "fp32-retained": ("32-true", "hf-retained", ()),
    "bf16": ("bf16-mixed", "hf", ()),
    "compiled": ("32-true", (), ("--trainer.compile=true",)),
    "compiled-bf16": ("bf16-mixed", (), ("--trainer.compile=true",)),
    "unpadded": ("32-true", ("--trainer.unpad=false",), ()),
    "last-layer": ("32-true", ("--trainer.last_layer_subset=false",), ()),
}
ROW_LABEL = {"fp32": "ours vs HF, fp32", "fp32-retained": "ours vs HF with our host-memory setting, fp32",
             "bf16": "ours vs HF, bf16-mixed", "compiled": "ours compiled vs eager, fp32",
             "compiled-bf16": "ours compiled vs eager, bf16-mixed",
             "unpadded": "ours DOC-SENTENCES unpadded vs padded, fp32",
             "last-layer": "ours last layer at the targets vs whole, fp32"}


def model_flops_per_token(layers: int, hidden: int, ffn: int, seq: int, vocab: int, mask_p: float = 0.15,
                          last_layer_subset: bool = False) -> float:
    from pretrain.model.config import RobertaConfig
    from pretrain.training.throughput import flops_per_token

    cfg = RobertaConfig(vocab_size=vocab, hidden_size=hidden, num_layers=layers, num_heads=1, intermediate_size=ffn,
                        max_position_embeddings=seq + 2)
    return flops_per_token(cfg, seq, mask_p, last_layer_subset)


class StepTimer:
    """Per optimizer-step wall times (device synchronised, in this benchmark only) and the first step's time."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.ends: list[float] = []
        self.start = time.perf_counter()

    def end(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.ends.append(time.perf_counter())

    def step_times(self) -> list[float]:
        return [b - a for a, b in zip(self.ends[WARMUP - 1:], self.ends[WARMUP:], strict=False)]

    def first_step(self) -> float:
        return self.ends[0] - self.start


def run_ours(cfg, meta: Path, steps: int, cuda: bool) -> tuple[StepTimer, int]:
    import pytorch_lightning as pl

    from pretrain.training.train import fit

    timer, tokens = StepTimer(cuda), []

    class Timing(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            tokens.append(batch["num_tokens"])
            if (batch_idx + 1) % trainer.accumulate_grad_batches == 0:
                timer.end()

    cfg.trainer.max_steps = WARMUP + steps
    timer.start = time.perf_counter()
    fit(cfg, meta, resume=False, callbacks=[Timing()], enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, logger=False, limit_val_batches=0)
    return timer, int(statistics.median(tokens))


def run_hf(cfg, meta: Path, steps: int, tokenizer_dir: Path, cuda: bool) -> tuple[StepTimer, int]:
    from transformers import AutoTokenizer, DataCollatorForLanguageModeling, Trainer, TrainerCallback

    split = open_split(meta, "train")
    n = (WARMUP + steps) * cfg.batch.micro_size
    blocks = [{"input_ids": split.block(i % split.num_blocks).astype("int64").tolist()} for i in range(n)]
    model = hf_mlm_model(cfg, json.loads(Path(meta).read_text()))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    timer = StepTimer(cuda)

    class Timing(TrainerCallback):
        def on_step_end(self, *args, **kwargs):
            timer.end()

    with tempfile.TemporaryDirectory() as out:
        args = hf_training_args(cfg, out, WARMUP + steps, cuda)  # global = micro here: no accumulation
        collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=cfg.masking.probability)
        timer.start = time.perf_counter()
        Trainer(model=model, args=args, train_dataset=blocks, data_collator=collator, processing_class=tokenizer,
                callbacks=[Timing()]).train()
    return timer, cfg.batch.micro_size * cfg.data.seq_len


def experiment(size: tuple, work: str, corpus: str, precision: str, cuda: bool, packing: str, extra=()):
    layers, hidden, heads, ffn, seq, micro, _ = size
    return load_config(None, [
        f"--run_dir={work}", f"--corpus.train={corpus}", "--corpus.valid_fraction=0.01",
        "--tokenizer.vocab_size=50265", f"--data.seq_len={seq}", f"--data.packing={packing}",
        f"--model.num_layers={layers}", f"--model.hidden_size={hidden}", f"--model.num_heads={heads}",
        f"--model.intermediate_size={ffn}", f"--batch.global_size={micro}", f"--batch.micro_size={micro}",
        "--batch.num_workers=1", "--optim.warmup_steps=1", f"--trainer.accelerator={'gpu' if cuda else 'cpu'}",
        "--trainer.devices=1", f"--trainer.precision={precision}", "--logger.wandb=null", *extra,
    ])


def write_results(results: dict, out: Path, cuda: bool) -> None:
    """train.json and train.md (train-cuda.* on a GPU) under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    name = "train-cuda" if cuda else "train"
    (out / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["| row | size | B tokens/s | A tokens/s | B / A | B MFU | A MFU | B first step | A first step |"
             + (" peak memory B / A |" if cuda else ""), "|---|---|---|---|---|---|---|---|---|" + ("---|" if cuda else "")]
    for r in results["rows"]:
        A, B = r["A"], r["B"]
        label = r["label"] + (f" ({r['padding']:.1%} padding)" if "padding" in r else "")
        lines.append(f"| {label} | {r['size']} ({r['layers']}x{r['hidden']}, seq {r['seq_len']}, micro "
                     f"{r['micro_batch']}) | {B['tokens_per_s']:,} | {A['tokens_per_s']:,} | {r['ratio']}x | "
                     f"{B['mfu']:.1%} | {A['mfu']:.1%} | {B['first_step_s']} s | {A['first_step_s']} s |"
                     + (f" {B['peak_gib']} / {A['peak_gib']} GiB |" if "peak_gib" in B else ""))
    table = "\n".join(lines) + "\n\nB is the first-named side (ours), A the second; tokens/s are real tokens " \
        "(no padding); medians of per-step times after 3 warm-up steps, sides alternating. MFU counts the MLM " \
        "objective's FLOPs (LM head on masked tokens; ours: the last layer at the targets, as its step computes) " \
        "over the peak of the row's dtype " \
        f"({'datasheet' if cuda else 'best matmul FLOP/s measured here'}); {results['machine']}.\n"
    (out / f"{name}.md").write_text(table)
    print(table)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default=str(ROOT.parent / "shared" / "corpus" / "kernel_docs.txt"))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--sizes", default=None, help="comma-separated; default small,base (cuda: base)")
    parser.add_argument("--rows", default=None, help=f"comma-separated of {','.join(ROWS)}; default all "
                        "(cuda: bf16,compiled-bf16)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of (A, B) per row")
    parser.add_argument("--work", default=str(ROOT / "runs" / "bench"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cuda = args.device == "cuda"
    sizes_table = GPU_SIZES if cuda else SIZES
    sizes = (args.sizes or ",".join(sizes_table)).split(",")
    rows = (args.rows or ("bf16,compiled-bf16" if cuda else ",".join(ROWS))).split(",")
    corpus = args.corpus if Path(args.corpus).exists() else "builtin:python-docs"
    from pretrain.training import host_memory
    from pretrain.training.throughput import measure_matmul_flops, peak_flops, precision_dtype

    device = torch.device("cuda" if cuda else "cpu")
    results = {"machine": {"device": torch.cuda.get_device_name() if cuda else "cpu",
                           "threads": torch.get_num_threads()}, "corpus": corpus, "rows": []}
    for size_name in sizes:
        size = sizes_table[size_name]
        layers, hidden, heads, ffn, seq, micro, steps = size
        for row in rows:
            precision, a, b = ROWS[row]
            packing = "doc_sentences" if row == "unpadded" else "full_sentences"
            work = f"{args.work}/{size_name}-{packing}"
            base_cfg = experiment(size, work, corpus, precision, cuda, packing)
            meta = prepare_data(base_cfg)
            # measured afresh on a CPU (not the cached figure): the machine's load now is the load of the row
            peak, source = peak_flops(device, precision) if cuda else (
                measure_matmul_flops(device, precision_dtype(precision)), "measured")
            times: dict[str, list[float]] = {"A": [], "B": []}
            tokens: dict[str, list[int]] = {"A": [], "B": []}
            first: dict[str, list[float]] = {"A": [], "B": []}
            memory: dict[str, list[float]] = {"A": [], "B": []}
            for _ in range(args.rounds):
                for side, spec in (("A", a), ("B", b)):
                    if cuda:
                        torch.cuda.reset_peak_memory_stats()
                    if spec in ("hf", "hf-retained"):
                        # glibc's settled default, or ours (which our side's runs set and undo themselves: train.py)
                        host_memory.retain(spec == "hf-retained")
                        timer, n = run_hf(base_cfg, meta, steps, base_cfg.run_path / "tokenizer", cuda)
                        host_memory.retain(False)
                    else:
                        timer, n = run_ours(experiment(size, work, corpus, precision, cuda, packing, spec), meta,
                                            steps, cuda)
                    times[side] += timer.step_times()
                    tokens[side].append(n)
                    first[side].append(timer.first_step())
                    if cuda:
                        memory[side].append(torch.cuda.max_memory_allocated() / 2**30)
            r = {"row": row, "label": ROW_LABEL[row], "size": size_name, "layers": layers, "hidden": hidden,
                 "seq_len": seq, "micro_batch": micro, "vocab": 50265, "precision": precision, "packing": packing,
                 "steps_measured": len(times["A"]), "peak_tflops": round(peak / 1e12, 4), "peak_source": source}
            for side in ("A", "B"):
                s = statistics.median(times[side])
                rate = statistics.median(tokens[side]) / s
                spec = a if side == "A" else b
                name = spec if isinstance(spec, str) else ("ours_" + side)
                subset = not isinstance(spec, str) and "--trainer.last_layer_subset=false" not in spec
                flops = model_flops_per_token(layers, hidden, ffn, seq, 50265, last_layer_subset=subset)
                r[side] = {"who": name, "tokens_per_s": round(rate), "mfu": round(rate * flops / peak, 4),
                           "first_step_s": round(statistics.median(first[side]), 2),
                           **({"peak_gib": round(max(memory[side]), 2)} if memory[side] else {})}
            r["ratio"] = round(r["B"]["tokens_per_s"] / r["A"]["tokens_per_s"], 3)
            if packing == "doc_sentences":  # the share of the padded batches' positions that are padding
                r["padding"] = round(1 - statistics.median(tokens["B"]) / (micro * seq), 4)
            results["rows"].append(r)
            print(json.dumps(r), flush=True)
    write_results(results, Path(args.out), cuda)
    return 0


if __name__ == "__main__":
    sys.exit(main())
