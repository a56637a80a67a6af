"""`python -m pretrain {fit,resume,export,finetune} --config FILE [--section.key=value ...]`.

`fit` runs the missing prerequisites first (tokenizer, shards), then trains, continuing from the run's last
checkpoint when there is one; `resume [--ckpt PATH]` insists on a checkpoint (the newest, or PATH); `export [--ckpt PATH] [--out DIR]` writes a
checkpoint (default: the newest) as a Hugging Face directory (default: run_dir/hf) and proves its parity;
`finetune --task configs/tasks/NAME.yaml [--finetune.key=value --task.key=value]` fine-tunes the export on a
labelled task and reports its validation metrics (pretrain/evaluation/finetune.py); `ablation --config
configs/ablation-NAME.yaml [--ablation.seeds=3]` runs the recipe ablation and writes its report (pretrain/ablation/run.py);
`evaluate [--ckpts "a b c" | DIR] [--out DIR]` scores checkpoints and exports on one held-out sample (fixed-mask loss,
pseudo-perplexity, probes) into a table and a plot (pretrain/evaluation/evaluate.py); `average --ckpts "a b c"
[--out DIR]` exports the mean of the weights of checkpoints of one run (pretrain/hf/average.py).
"""

from __future__ import annotations

import argparse
import sys

from data_prep.cli import naming, run_command
from data_prep.config import describe_config, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain",
        description="Pretrain a RoBERTa encoder with masked language modelling.",
        epilog="Config keys (override any with --section.key=value):\n" + describe_config(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=["fit", "resume", "export", "finetune", "ablation", "evaluate", "average"])
    parser.add_argument("--config", default=None, help="experiment YAML (default: built-in defaults)")
    parser.add_argument("--ckpt", default=None, help="export: the checkpoint (default: the run's newest); resume: "
                        "continue from this checkpoint, of this run or another (default: the run's newest)")
    parser.add_argument("--out", default=None, help="export, average: the output directory (default: run_dir/hf); "
                        "evaluate: the report's directory (default: run_dir/evaluate)")
    parser.add_argument("--ckpts", default=None, help="evaluate: checkpoints (.ckpt, sharded directories) and "
                        "exports, space-separated, or a directory of them (default: run_dir/checkpoints); "
                        "average: the checkpoints to average")
    parser.add_argument("--task", default=None, help="finetune: the task YAML (configs/tasks/NAME.yaml); "
                        "--finetune.key=value and --task.key=value override it")
    args, overrides = parser.parse_known_args(argv)
    if args.command == "finetune":
        return _finetune(args, overrides)
    if args.command == "ablation":
        return _ablation(args, overrides)
    if args.command == "evaluate":
        return _evaluate(args, overrides)

    from .hf.average import AverageError
    from .hf.export import ExportError
    from .training.train import NothingToResume, TrainingIncomplete

    return run_command(lambda: _fit_or_export(args, overrides),
                       {NothingToResume: 2, FloatingPointError: 2, ExportError: 2, TrainingIncomplete: 3,
                        AverageError: 2})


def _fit_or_export(args: argparse.Namespace, overrides: list[str]) -> None:
    from data_prep.prepare import run_dir_lock
    from data_prep.tokenizer_training import train_tokenizer

    from .hf.convert import check_init_from
    from .hf.export import ExportError, export
    from .training.throughput import Throughput
    from .training.train import NothingToResume, fit, plot_losses, training_data

    cfg = load_config(args.config, overrides)
    if args.command in ("export", "average"):
        if args.command == "average" and not args.ckpts:
            raise ExportError("average needs --ckpts \"a.ckpt b.ckpt ...\" (make average CKPTS=...), or use "
                              "make export ARGS=--checkpoint.average_last=N")
        with naming(args.out or cfg.run_path / "hf"):  # a write that fails for want of space names no file
            export(cfg, args.ckpt, args.out, average=args.ckpts.split() if args.command == "average" else None)
        return
    if cfg.model.init_from:
        check_init_from(cfg)  # one clear line before any data work
        with run_dir_lock(cfg):
            train_tokenizer(cfg)  # init_from's tokenizer (extended), or "up to date"
    if args.command == "resume" and not args.ckpt and not any((cfg.run_path / "checkpoints").glob("*.ckpt")):
        raise NothingToResume(f"{cfg.run_path}/checkpoints/last.ckpt does not exist: nothing to resume "
                              "(run `make pretrain`)")
    meta = training_data(cfg)  # data.shards_url's, fetched into the node's cache, or `make data`'s
    # a checkpoint or log write that fails for want of space names no file: it was under run_dir
    with naming(cfg.run_path):
        trainer = fit(cfg, meta, resume=args.command == "resume" or None,
                      ckpt=args.ckpt if args.command == "resume" else None)
    if trainer.global_rank == 0:
        logs = cfg.run_path / "logs"
        png = plot_losses(logs / "metrics.csv", logs / "loss.png")
        val = trainer.callback_metrics.get("val/loss")
        state = "done" if trainer.global_step >= trainer.max_steps else "stopped by a signal"
        print(f"\n{state}: {trainer.global_step} of {trainer.max_steps} steps" + (f", validation loss {float(val):.4f} nats" if val is not None else ""))
        speed = next((c.summary() for c in trainer.callbacks if isinstance(c, Throughput)), None)
        if speed:
            print(f"  throughput  {speed}")
        print(f"  checkpoint  {cfg.run_path / 'checkpoints' / 'last.ckpt'}")
        print(f"  logs        {logs / 'metrics.csv'}")
        if png:
            print(f"  loss curve  {png}")


def _finetune(args: argparse.Namespace, overrides: list[str]) -> int:
    from .evaluation.finetune import FinetuneError, finetune, load_task
    from .hf.export import ExportError

    task_overrides = [o for o in overrides if o.startswith(("--finetune.", "--task."))]

    def run() -> None:
        if args.task is None:
            raise FinetuneError("finetune needs --task configs/tasks/NAME.yaml (make finetune TASK=...)")
        cfg = load_config(args.config, [o for o in overrides if o not in task_overrides])
        finetune(cfg, load_task(args.task, task_overrides))

    return run_command(run, {FinetuneError: 2, ExportError: 2})


def _ablation(args: argparse.Namespace, overrides: list[str]) -> int:
    from .ablation.run import run_ablation
    from .evaluation.finetune import FinetuneError
    from .evaluation.yardstick import YardstickError
    from .hf.export import ExportError
    from .training.train import NothingToResume

    def run() -> None:
        if args.config is None:
            raise FileNotFoundError("ablation needs --config configs/ablation-NAME.yaml (make ablation CONFIG=...)")
        run_ablation(args.config, overrides)

    return run_command(run, {NothingToResume: 2, FloatingPointError: 2, ExportError: 2, FinetuneError: 2,
                             YardstickError: 2})


def _evaluate(args: argparse.Namespace, overrides: list[str]) -> int:
    from .evaluation.evaluate import EvaluateError, evaluate

    def run() -> None:
        cfg = load_config(args.config, overrides)
        paths = args.ckpts.split() if args.ckpts else None
        with naming(args.out or cfg.run_path / "evaluate"):
            evaluate(cfg, paths, args.out)

    return run_command(run, {EvaluateError: 2})


if __name__ == "__main__":
    sys.exit(main())
