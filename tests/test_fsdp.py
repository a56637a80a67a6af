"""FSDP2 (`trainer.strategy=fsdp`, sharding.py) for real: 2 CPU ranks over gloo, as DDP's tests run (test_elastic.py).

Every run here trains the same tiny config with dropout on, and with a NaN planted in step 6's data on rank 1
(the rollback restores step 4 and skips that data), so one uninterrupted FSDP run serves as the reference for
all of them: DDP's run of the config (equal within float tolerance: the same data, masks and dropout on each
rank), a run killed with SIGKILL and resumed (bitwise), and a run resharded 2 -> 1 -> 2 ranks through
`torch.distributed.checkpoint` (equal within float tolerance; data position, schedule and rollback record kept).
The FSDP runs recompute each layer's activations in backward (`trainer.activation_checkpointing`), DDP's does
not: equal results show that the recomputation draws the same dropout and that it composes with the sharding.
Gradients are clipped (`optim.grad_clip`), so the norm over all shards must be the norm DDP sees.
The runs that can start together do (the module's fixture), since each process launch costs seconds.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pretrain.training.checkpoint import load_full, probe, resumable_checkpoint

from .test_elastic import EVERY, ROOT, STEPS, assert_close, cli
from .test_train import QUIET, config, corpus_file, shards  # noqa: F401 - fixtures

CLIP = "--optim.grad_clip=1.0"  # the gradient's norm over all shards decides (the norms here are about 2)
FSDP = ("--trainer.devices=2", "--trainer.strategy=fsdp", "--trainer.activation_checkpointing=true", CLIP)
DDP = ("--trainer.devices=2", "--trainer.strategy=ddp", CLIP)

SCRIPT = '''
import json, sys
from pathlib import Path

import torch

from pretrain.__main__ import main
from pretrain.training.module import MLMModule
from pretrain.training.sharding import local_numel
from pretrain.training.steps import data_step

original = MLMModule._losses

def losses(self, batch):  # the data of step 6 gives a NaN loss, on rank 1 only
    out = original(self, batch)
    if self.training and self.global_rank == 1 and data_step(self.global_step, self.rollbacks.skipped_data) == 6:
        out["mlm_sum"] = out["mlm_sum"] * float("nan")
    return out

def on_train_end(self):  # what this rank holds at the end: its shard (FSDP) or everything (DDP)
    params = list(self.parameters())
    states = [v for s in self.trainer.optimizers[0].state.values() for v in s.values() if v.ndim > 0]
    record = {"params": local_numel(params), "total": sum(p.numel() for p in params),
              "optimizer": local_numel(states),
              "tied": self.model.lm_head.decoder.weight is self.model.embeddings.word.weight}
    Path(self.cfg.run_path, "logs", f"rank-{self.global_rank}.json").write_text(json.dumps(record))

MLMModule._losses = losses
MLMModule.on_train_end = on_train_end
if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
'''


def launch(script: Path, command: str, run: Path, corpus: Path, *extra: str) -> subprocess.Popen:
    args = cli(command, run, corpus, *extra)[3:]  # without `python -m pretrain`
    return subprocess.Popen([sys.executable, str(script), *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"})


def finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-4000:]
    return out


def state_of(path: Path) -> dict:
    return load_full(path) if path.is_dir() else torch.load(path, map_location="cpu", weights_only=True)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return {k.removeprefix("model."): v for k, v in state_of(path)["state_dict"].items()}


def rollbacks(state: dict) -> tuple:
    """The rollback record, its events' losses (NaN here, never equal to itself) left out."""
    record = state["rollbacks"]
    return record["skipped_data"], [{k: v for k, v in e.items() if k != "loss"} for e in record["events"]]


def losses(run: Path, metric: str = "train/loss") -> dict[int, float]:
    with open(run / "logs" / "metrics.csv") as f:
        return {int(r["step"]): float(r[metric]) for r in csv.DictReader(f) if r.get(metric)}


@pytest.fixture(scope="module")
def runs(shards, corpus_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:  # noqa: F811
    """Started together: the FSDP reference, DDP's run, and an FSDP run and a DDP run each killed (SIGKILL, both
    ranks) once its step-4 checkpoint is in place, then resumed."""
    tmp = tmp_path_factory.mktemp("fsdp")
    script = tmp / "planted.py"
    script.write_text(SCRIPT)
    paths = {name: tmp / name for name in ("fsdp", "ddp", "killed", "killed-ddp")}
    prepared, _ = shards
    for run in paths.values():  # the tokenizer and shards the runs' config names, found up to date
        for part in ("tokenizer", "data"):
            shutil.copytree(prepared / part, run / part)
    args = {"fsdp": FSDP, "ddp": DDP, "killed": FSDP, "killed-ddp": DDP}
    procs = {name: launch(script, "fit", paths[name], corpus_file, *args[name]) for name in paths}
    deadline, pending = time.monotonic() + 240, ["killed", "killed-ddp"]
    while pending:  # each killed as soon as its step-4 checkpoint is in place
        for name in [n for n in pending if (paths[n] / "checkpoints" / "step-0000004.ckpt").exists()]:
            pending.remove(name)
            killed = procs.pop(name)
            os.killpg(killed.pid, signal.SIGKILL)  # both ranks, at once
            killed.communicate(timeout=60)
            found = resumable_checkpoint(paths[name] / "checkpoints")  # last.ckpt, or step-4 if killed before it
            assert found is not None and 4 <= found[1] < STEPS
            procs[f"resumed-{name}"] = launch(script, "resume", paths[name], corpus_file, *args[name])
        for name in pending:
            assert procs[name].poll() is None, "training ended early: " + procs[name].communicate()[0][-3000:]
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.05)
    outs = {name: finish(proc) for name, proc in procs.items()}
    return {"script": script, "paths": paths, "outs": outs}


def test_fsdp_equals_ddp_shards_one_over_w_and_rolls_back_a_nan_on_one_rank(runs, shards, corpus_file: Path,  # noqa: F811
                                                                         tmp_path: Path) -> None:
    """Also DDP's rollback law (it was test_elastic's own 2-rank run): a NaN on rank 1 alone, both ranks see it in
    the step's summed loss, restore step 4 and skip step 6's data in the same process, and end where one process
    told to skip that data ends."""
    from pretrain.training import train
    from pretrain.training.rollback import RollbackState

    fsdp, ddp = runs["paths"]["fsdp"], runs["paths"]["ddp"]
    for out in (runs["outs"]["fsdp"], runs["outs"]["ddp"]):  # a NaN on rank 1 only: both ranks roll back together, and finish
        assert "rollback 1/3: loss nan at step 6 (seen at step 6); resuming from step 4" in out, out[-3000:]
        assert f"done: {STEPS} of {STEPS} steps" in out
    last = fsdp / "checkpoints" / "last.ckpt"
    assert last.is_dir() and sorted(p.name for p in last.iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]  # Lightning's ModelParallelStrategy layout
    # the same steps: every logged loss, gradient norm (before clipping: the clipped norm's input) and validation
    # loss, and every weight (gathered from the shards), within float tolerance
    for metric in ("train/loss", "train/grad_norm", "val/loss"):
        expected, got = losses(ddp, metric), losses(fsdp, metric)
        assert sorted(got) == sorted(expected) and len(got) >= (1 if metric == "val/loss" else STEPS)
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-6), metric
    sharded, plain = state_of(last), state_of(ddp / "checkpoints" / "last.ckpt")
    assert_close(weights(ddp / "checkpoints" / "last.ckpt"), weights(last))
    assert rollbacks(sharded) == rollbacks(plain) and sharded["rollbacks"]["skipped_data"] == [[6, 1]]
    told = train._fit_once(config(tmp_path / "told", corpus_file, *EVERY, CLIP), shards[1], None,
                           RollbackState([[6, 1]], []), None, dict(QUIET))
    assert_close({k: v.detach() for k, v in told.lightning_module.model.state_dict().items()}, weights(ddp / "checkpoints" / "last.ckpt"))
    # the decoder stays tied to the word embeddings under fully_shard: one tensor, saved under both names
    w = sharded["state_dict"]
    assert torch.equal(w["model.lm_head.decoder.weight"], w["model.embeddings.word.weight"])
    # each FSDP rank holds about half of the parameters and of AdamW's two moments; each DDP rank all of them
    ranks = {kind: [json.loads((runs["paths"][kind] / "logs" / f"rank-{r}.json").read_text()) for r in (0, 1)]
             for kind in ("fsdp", "ddp")}
    total = ranks["ddp"][0]["total"]
    for record in ranks["fsdp"]:
        assert record["tied"] and record["total"] == total
        assert 0.45 * total <= record["params"] <= 0.55 * total, record
        assert record["optimizer"] == 2 * record["params"]
    assert sum(r["params"] for r in ranks["fsdp"]) == total
    assert all(r["params"] == total and r["optimizer"] == 2 * total for r in ranks["ddp"])


@pytest.mark.parametrize(("reference", "killed"), [("fsdp", "killed"), ("ddp", "killed-ddp")])
def test_sigkill_and_resume_is_bitwise_equal(runs, reference: str, killed: str) -> None:
    """Killed once its step-4 checkpoint was in place, resumed from the newest complete one (the fixture): FSDP2
    and DDP (with dropout on: each rank's masks are a function of the step, test_elastic.py)."""
    assert f"done: {STEPS} of {STEPS} steps" in runs["outs"][f"resumed-{killed}"]
    assert_close(weights(runs["paths"][reference] / "checkpoints" / "last.ckpt"),
                 weights(runs["paths"][killed] / "checkpoints" / "last.ckpt"), exact=True)


def test_a_sharded_checkpoint_exports_on_one_process_without_a_process_group(runs, corpus_file: Path,  # noqa: F811
                                                                            tmp_path: Path) -> None:
    """export gathers the shards (load_full) into the stock Hugging Face model and runs its parity check
    (transformers' logits against this project's model) on a process that never joined a process group."""
    from safetensors.torch import load_file

    from pretrain.hf.convert import to_hf_state_dict
    from pretrain.hf.export import export

    assert not torch.distributed.is_initialized()
    run = runs["paths"]["fsdp"]
    out = export(config(run, corpus_file, *EVERY), run / "checkpoints" / "last.ckpt", tmp_path / "hf",
                 log=lambda *_: None)
    exported = load_file(out / "model.safetensors")
    expected = to_hf_state_dict(weights(run / "checkpoints" / "last.ckpt"), num_layers=2)
    for name, tensor in exported.items():
        assert torch.equal(tensor, expected[name]), name
    assert probe(run / "checkpoints" / "last.ckpt") == (STEPS, None)


def test_a_sharded_checkpoint_resumes_on_one_device_without_fsdp(runs, shards, corpus_file: Path,  # noqa: F811
                                                                 tmp_path: Path) -> None:
    """The 2-rank step-8 directory, gathered by the checkpoint IO (AdamW's state by index), resumed on one device
    under the default strategy: the uninterrupted run's weights within float summation order, and its record."""
    from pretrain.training.train import fit

    _, meta = shards
    reference = runs["paths"]["fsdp"]
    run = tmp_path / "gathered"
    shutil.copytree(reference, run, ignore=shutil.ignore_patterns("last.ckpt", "step-0000012.ckpt", "rank-*.json"))
    one = fit(config(run, corpus_file, *EVERY, CLIP), meta, resume=True, **QUIET)
    assert one.global_step == STEPS and not torch.distributed.is_initialized()
    got = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert rollbacks(got) == rollbacks(state_of(reference / "checkpoints" / "last.ckpt"))
    assert_close(weights(reference / "checkpoints" / "last.ckpt"), weights(run / "checkpoints" / "last.ckpt"))


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
def test_resharded_resume_two_one_two_ranks_equals_the_uninterrupted_run(runs, shards, corpus_file: Path,  # noqa: F811
                                                                         tmp_path: Path) -> None:
    """From the 2-rank step-8 checkpoint (after the rollback) on 1 process to step 10, then on 2 ranks to the
    end: torch.distributed.checkpoint reshards the weights and AdamW's moments each time; the sampler continues at
    the step's data, the schedule at the step's rate, the rollback record goes on (step 6's data stays skipped)."""
    from pretrain.training.train import fit

    _, meta = shards
    reference = runs["paths"]["fsdp"]
    run = tmp_path / "resharded"
    shutil.copytree(reference, run, ignore=shutil.ignore_patterns("last.ckpt", "step-0000012.ckpt", "rank-*.json"))
    environ, threads = dict(os.environ), torch.get_num_threads()
    try:  # one process, in this one: Lightning sets the launch's environment and joins a process group of 1
        one = fit(config(run, corpus_file, *EVERY, *FSDP[1:]), meta, resume=True, max_steps=10, **QUIET)
        assert one.global_step == 10 and one.world_size == 1
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(environ)
        torch.set_num_threads(threads)
    middle = state_of(run / "checkpoints" / "step-0000010.ckpt")
    assert middle["geometry"]["world_size"] == 1 and middle["rollbacks"]["skipped_data"] == [[6, 1]]
    assert len(list((run / "checkpoints" / "step-0000010.ckpt").glob("*.distcp"))) == 1

    # with checkpoint.export_hf: the final save's weights, gathered from the shards onto rank 0, exported too
    out = finish(launch(runs["script"], "resume", run, corpus_file, *FSDP, "--checkpoint.export_hf=true"))
    assert f"done: {STEPS} of {STEPS} steps" in out and "rollback" not in out and "failed" not in out
    got, expected = state_of(run / "checkpoints" / "last.ckpt"), state_of(reference / "checkpoints" / "last.ckpt")
    assert got["global_step"] == STEPS and got["geometry"]["world_size"] == 2
    assert rollbacks(got) == rollbacks(expected)
    assert got["lr_schedulers"][0]["last_epoch"] == expected["lr_schedulers"][0]["last_epoch"] == STEPS
    assert got["lr_schedulers"][0]["_last_lr"] == pytest.approx(expected["lr_schedulers"][0]["_last_lr"])
    assert_close(weights(reference / "checkpoints" / "last.ckpt"), weights(run / "checkpoints" / "last.ckpt"))
    moments = got["optimizer_states"][0]["state"], expected["optimizer_states"][0]["state"]
    assert moments[0].keys() == moments[1].keys()
    for name, state in moments[1].items():
        torch.testing.assert_close(moments[0][name]["exp_avg_sq"], state["exp_avg_sq"], rtol=1e-4, atol=1e-9)
    from safetensors.torch import load_file

    from pretrain.hf.convert import to_hf_state_dict

    exported, final = load_file(run / "hf" / "model.safetensors"), to_hf_state_dict(weights(run / "checkpoints" / "last.ckpt"), 2)
    assert exported and all(torch.equal(tensor, final[name]) for name, tensor in exported.items())
    # the losses of every step after the resharding, as the uninterrupted run logged them
    later = {s: v for s, v in losses(run).items() if s > 8}
    assert later and later == pytest.approx({s: losses(reference)[s] for s in later}, rel=1e-5, abs=1e-6)


def test_cpu_offload_is_refused_without_fsdp_or_on_cpus(corpus_file: Path, tmp_path: Path) -> None:  # noqa: F811
    from data_prep.config import ConfigError

    for extra in (("--trainer.strategy=ddp",), ("--trainer.strategy=fsdp", "--trainer.accelerator=cpu")):
        with pytest.raises(ConfigError, match=r"trainer.fsdp_cpu_offload=true .* needs trainer.strategy=fsdp"):
            config(tmp_path, corpus_file, *extra, "--trainer.fsdp_cpu_offload=true")
    with pytest.raises(ConfigError, match=r"trainer.precision='16-mixed' does not run with trainer.strategy=fsdp"):
        config(tmp_path, corpus_file, "--trainer.strategy=fsdp", "--trainer.precision=16-mixed")
