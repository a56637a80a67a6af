"""The prepared GPU check (bench/bench_gpu.py) runs: its `--device cpu --smoke` mode takes every part through the
project's own code at toy sizes (the CUDA-only kernel assertions excepted), so a session with a GPU spends its
minutes measuring, not debugging the script."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from .conftest import make_documents, write_txt

ROOT = Path(__file__).resolve().parent.parent


def test_smoke_mode_runs_every_part_and_records_it(tmp_path: Path) -> None:
    corpus = write_txt(tmp_path / "c.txt", make_documents(300, seed=5))
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "bench/bench_gpu.py", "--device", "cpu", "--smoke", "--steps", "1", f"--corpus={corpus}",
         f"--work={tmp_path / 'work'}", f"--out={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu-smoke-cpu.json").read_text())
    parts = report["parts"]
    assert set(parts) == {"ours-eager", "ours-compiled", "hf", "kernels", "fsdp", "fp32-validation"}
    assert {k: v["status"] for k, v in parts.items()} == dict.fromkeys(parts, "ok")
    for side in ("ours-eager", "ours-compiled", "hf"):
        assert parts[side]["tokens_per_s"] > 0 and parts[side]["steps_timed"] == 1
    assert set(report["ratios"]) == {"ours-eager / hf", "ours-compiled / hf", "ours-compiled / ours-eager"}
    kernels = parts["kernels"]  # on a CPU the last layer's SDPA calls are seen, their device kernels are not checked
    assert kernels["sdpa"]["calls"] > 0 and kernels["math_fallback_calls"] == 0 and kernels["checked"].startswith("no")
    assert parts["fsdp"]["steps"] == 2 and parts["fsdp"]["strategy_class"] == "ShardedStrategy"
    assert parts["fp32-validation"]["steps"] == 4 and math.isfinite(parts["fp32-validation"]["val_loss"])
    table = (out / "gpu-smoke-cpu.md").read_text()
    assert "| kernels | ok |" in table and "| fsdp | ok |" in table
