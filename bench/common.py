"""What the benchmarks share: running one side in its own process and measuring that process tree's peak memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED_CORPUS = ROOT.parent / "shared" / "corpus" / "kernel_docs.txt"


def tree_rss_mb(pid: int) -> float:
    """Resident memory of `pid` and its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(d))
            except (OSError, IndexError, ValueError):
                pass
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo.extend(children.get(p, []))
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            pass
    return total / 2**20


def run_side(script: str | Path, side: str, argv: list[str]) -> dict:
    """Run `script --_side SIDE ARGV...` in a fresh process; its last stdout line is a JSON result, to which
    `peak_rss_mb` is added: the peak of the summed resident sets of its process tree, sampled every 50 ms."""
    proc = subprocess.Popen([sys.executable, str(script), "--_side", side, *argv], stdout=subprocess.PIPE,
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    peak = [0.0]
    if os.path.isdir("/proc"):
        def sample() -> None:
            while proc.poll() is None:
                peak[0] = max(peak[0], tree_rss_mb(proc.pid))
                time.sleep(0.05)

        threading.Thread(target=sample, daemon=True).start()
    out, _ = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"{Path(script).name}: the {side} side failed (exit {proc.returncode})")
    result = json.loads(out.decode().strip().splitlines()[-1])
    result["peak_rss_mb"] = round(peak[0], 1) if peak[0] else None
    return result


def default_corpus(path: str) -> str:
    """`path` when it exists, else the embedded corpus file (built on first use), so a fresh clone can bench."""
    if Path(path).is_file():
        return str(Path(path).resolve())
    from data_prep.default_corpus import python_docs_path

    print(f"{path} does not exist; using the embedded corpus")
    return str(python_docs_path())


def repeated_corpus(path: str, copies: int) -> str:
    """A `--corpus.train=` value reading `path` `copies` times over: a corpus that many times larger with the
    same statistics (the benchmarks' memory-flatness runs)."""
    return "[" + ",".join([json.dumps(path)] * max(1, copies)) + "]"


def mixture_sources(corpus: str, copies: int, work: Path) -> list[dict]:
    """`corpus` cut into three pieces at blank lines near its thirds, each piece a source made of `copies`
    links to it; the --corpus.train entries of a weighted mixture (weights 1, 2.0, 0.5)."""
    data = Path(corpus).read_bytes()
    cuts = [0] + [data.find(b"\n\n", len(data) * k // 3) + 2 for k in (1, 2)] + [len(data)]
    entries = []
    for k, (name, weight) in enumerate((("first", 1.0), ("second", 2.0), ("third", 0.5))):
        piece = work / f"{name}.txt"
        piece.write_bytes(data[cuts[k] : cuts[k + 1]])
        for i in range(copies):
            (work / f"{name}-{i:02d}.txt").symlink_to(piece)
        entries.append({"path": str(work / f"{name}-*.txt"), "weight": weight, "name": name})
    return entries


def write_results(out: str | Path, name: str, report: dict, markdown: list[str]) -> None:
    """bench/results/NAME.json and NAME.md."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{name}.md").write_text("\n".join(markdown) + "\n")
    print(f"wrote {out / f'{name}.json'} and {out / f'{name}.md'}")


def time_to_reach(points: list[tuple[float, float]], target: float) -> float | None:
    """The first time a loss curve, (seconds, loss) points joined by straight lines, is at or below `target`;
    None when it never is."""
    points = sorted(points)
    for i, (t, loss) in enumerate(points):
        if loss <= target:
            if i == 0:
                return t
            t0, l0 = points[i - 1]
            return t0 + (t - t0) * (l0 - target) / (l0 - loss)
    return None


def hf_mlm_model(cfg, meta: dict, **config_kwargs):
    """Hugging Face's model for `run_mlm.py`'s recipe: a fresh `transformers.RobertaForMaskedLM` (SDPA attention)
    of the experiment's architecture (`pretrain.hf.convert.model_config`), initialised from the experiment's seed."""
    import torch
    import transformers

    from pretrain.hf.convert import model_config

    torch.manual_seed(cfg.seed)
    hf_config = transformers.RobertaConfig(**model_config(cfg, meta).hf_config_kwargs(), attn_implementation="sdpa",
                                           **config_kwargs)
    return transformers.RobertaForMaskedLM(hf_config)


def hf_training_args(cfg, output_dir: str | Path, max_steps: int, cuda: bool, **overrides):
    """`transformers.TrainingArguments` for `run_mlm.py`'s recipe with the experiment's optimiser, batch
    (micro-batches of batch.micro_size, accumulated to batch.global_size), precision, workers and seed; linear
    warmup and decay; no logging, saving or progress bar. `overrides` replace any argument (max_grad_norm, ...)."""
    from transformers import TrainingArguments

    o, b = cfg.optim, cfg.batch
    kwargs = dict(
        output_dir=str(output_dir), per_device_train_batch_size=b.micro_size,
        gradient_accumulation_steps=b.global_size // b.micro_size, max_steps=max_steps,
        learning_rate=o.peak_lr, adam_beta1=o.betas[0], adam_beta2=o.betas[1], adam_epsilon=o.eps,
        weight_decay=o.weight_decay, warmup_steps=o.warmup_steps, lr_scheduler_type="linear",
        max_grad_norm=0.0, report_to=[], save_strategy="no", logging_strategy="no", use_cpu=not cuda,
        bf16=cfg.trainer.precision.startswith("bf16"), dataloader_num_workers=b.num_workers,
        seed=cfg.seed, disable_tqdm=True,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)
