"""Training throughput, side by side: this project vs Hugging Face's recipe, same architecture, data and batch.

Hugging Face's recipe is what `run_mlm.py` does: `transformers.RobertaForMaskedLM` + `DataCollatorForLanguageModeling`
+ `Trainer` (AdamW, same betas/eps/decay, linear schedule). Ours: `pretrain/` through Lightning, with the sparse
MLM head. Both run in this process, alternating (ours, HF, ours, HF, ...) so that machine noise hits both
sides; the figures are medians of per-step times after warm-up, and the headline is the ratio.

Also reported: model FLOP/s as a fraction of the best fp32 matmul FLOP/s torch reaches here, and the share
of our step time spent waiting for data.

    python bench/bench_train.py                       # tiny (2x128, vocab 50265, seq 128, micro 32) and base
    python bench/bench_train.py --sizes tiny --steps 30
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

from data_prep.config import load_config
from data_prep.prepare import prepare_data
from data_prep.shards import open_split

ROOT = Path(__file__).resolve().parent.parent

SIZES = {
    # name: (layers, hidden, heads, ffn, seq_len, micro batch, measured steps)
    "tiny": (2, 128, 2, 512, 128, 32, 20),
    "base": (12, 768, 12, 3072, 512, 4, 3),
}
WARMUP = 3


def best_matmul_flops(n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = 0.0
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


def model_flops_per_token(layers: int, hidden: int, ffn: int, seq: int, vocab: int, mask_p: float = 0.15) -> float:
    """Training FLOPs per token of the MLM objective (forward + backward = 3x forward): the encoder's matmuls
    and attention, plus the LM head on the masked share only (the work the objective needs)."""
    per_layer = 2 * (4 * hidden * hidden + 2 * hidden * ffn) + 2 * 2 * seq * hidden
    head = mask_p * 2 * (hidden * hidden + hidden * vocab)
    return 3 * (layers * per_layer + head)


class StepTimer:
    """Per optimizer-step wall times and the time spent between steps waiting for the next batch."""

    def __init__(self) -> None:
        self.ends: list[float] = []
        self.waits: list[float] = []
        self._start: float | None = None

    def begin(self) -> None:
        now = time.perf_counter()
        if self.ends:
            self.waits.append(now - self.ends[-1])
        self._start = now

    def end(self) -> None:
        self.ends.append(time.perf_counter())

    def step_times(self) -> list[float]:
        return [b - a for a, b in zip(self.ends[WARMUP - 1 :], self.ends[WARMUP:], strict=False)]


def run_ours(cfg, meta: Path, steps: int) -> StepTimer:
    import pytorch_lightning as pl

    from pretrain.train import fit

    timer = StepTimer()

    class Timing(pl.Callback):
        def on_train_batch_start(self, *args) -> None:
            timer.begin()

        def on_train_batch_end(self, *args) -> None:
            timer.end()

    cfg.trainer.max_steps = WARMUP + steps
    fit(cfg, meta, resume=False, callbacks=[Timing()], enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, logger=False, limit_val_batches=0)
    return timer


def run_hf(cfg, meta: Path, steps: int, tokenizer_dir: Path) -> StepTimer:
    import transformers
    from transformers import (
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        RobertaForMaskedLM,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from pretrain.module import model_config

    split = open_split(meta, "train")
    n = (WARMUP + steps) * cfg.batch.micro_size
    blocks = [{"input_ids": split.block(i % split.num_blocks).astype("int64").tolist()} for i in range(n)]
    meta_dict = json.loads(Path(meta).read_text())
    arch = model_config(cfg, meta_dict)
    torch.manual_seed(cfg.seed)
    model = RobertaForMaskedLM(transformers.RobertaConfig(**arch.hf_config_kwargs()))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    timer = StepTimer()

    class Timing(TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            timer.begin()

        def on_step_end(self, *args, **kwargs):
            timer.end()

    o = cfg.optim
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=cfg.batch.micro_size, max_steps=WARMUP + steps,
            learning_rate=o.peak_lr, adam_beta1=o.betas[0], adam_beta2=o.betas[1], adam_epsilon=o.eps,
            weight_decay=o.weight_decay, warmup_steps=o.warmup_steps, lr_scheduler_type="linear",
            max_grad_norm=0.0, report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
            dataloader_num_workers=cfg.batch.num_workers, seed=cfg.seed, disable_tqdm=True,
        )
        collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=cfg.masking.probability)
        Trainer(model=model, args=args, train_dataset=blocks, data_collator=collator, processing_class=tokenizer,
                callbacks=[Timing()]).train()
    return timer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default=str(ROOT.parent / "shared" / "corpus" / "kernel_docs.txt"))
    parser.add_argument("--sizes", default="tiny,base")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of (ours, HF) per size")
    parser.add_argument("--work", default=str(ROOT / "runs" / "bench"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    corpus = args.corpus if Path(args.corpus).exists() else "builtin:python-docs"
    peak = best_matmul_flops()
    results = {"machine": {"threads": torch.get_num_threads(), "best_fp32_matmul_gflops": round(peak / 1e9, 1)},
               "corpus": corpus, "sizes": {}}
    for size in args.sizes.split(","):
        layers, hidden, heads, ffn, seq, micro, steps = SIZES[size]
        cfg = load_config(None, [
            f"--run_dir={args.work}/{size}", f"--corpus.train={corpus}", "--corpus.valid_fraction=0.01",
            "--tokenizer.vocab_size=50265", f"--data.seq_len={seq}", f"--model.num_layers={layers}",
            f"--model.hidden_size={hidden}", f"--model.num_heads={heads}", f"--model.intermediate_size={ffn}",
            f"--batch.global_size={micro}", f"--batch.micro_size={micro}", "--batch.num_workers=1",
            "--optim.warmup_steps=10", "--trainer.accelerator=cpu", "--trainer.devices=1",
            "--trainer.precision=32-true", "--logger.wandb=null",
        ])
        meta = prepare_data(cfg)
        ours_t, hf_t, waits = [], [], []
        for _ in range(args.rounds):
            t = run_ours(cfg, meta, steps)
            ours_t += t.step_times()
            waits += t.waits[WARMUP:]
            hf_t += run_hf(cfg, meta, steps, cfg.run_path / "tokenizer").step_times()
        tokens = micro * seq
        ours_s, hf_s = statistics.median(ours_t), statistics.median(hf_t)
        flops = model_flops_per_token(layers, hidden, ffn, seq, 50265) * tokens
        results["sizes"][size] = {
            "layers": layers, "hidden": hidden, "seq_len": seq, "micro_batch": micro, "vocab": 50265,
            "steps_measured": len(ours_t),
            "ours_tokens_per_s": round(tokens / ours_s), "hf_tokens_per_s": round(tokens / hf_s),
            "speedup": round(hf_s / ours_s, 2),
            "ours_mfu": round(flops / ours_s / peak, 3), "hf_mfu": round(flops / hf_s / peak, 3),
            "data_wait_share": round(statistics.median(waits) / ours_s, 4) if waits else None,
        }
        print(json.dumps({size: results["sizes"][size]}), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["| size | ours tokens/s | HF tokens/s | speedup | ours MFU | HF MFU | data wait |", "|---|---|---|---|---|---|---|"]
    for size, r in results["sizes"].items():
        lines.append(f"| {size} ({r['layers']}x{r['hidden']}, seq {r['seq_len']}, micro {r['micro_batch']}) | "
                     f"{r['ours_tokens_per_s']:,} | {r['hf_tokens_per_s']:,} | {r['speedup']}x | "
                     f"{r['ours_mfu']:.1%} | {r['hf_mfu']:.1%} | {r['data_wait_share']:.2%} |")
    table = "\n".join(lines) + f"\n\nBest fp32 matmul: {results['machine']['best_fp32_matmul_gflops']} GFLOP/s " \
        f"on {results['machine']['threads']} threads. MFU counts the MLM objective's FLOPs (LM head on masked tokens).\n"
    (out / "train.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
