"""`python -m pretrain {fit,resume} --config FILE [--section.key=value ...]`.

`fit` runs the missing prerequisites first (tokenizer, shards), then trains, continuing from the run's last
checkpoint when there is one; `resume` insists on a checkpoint.
"""

from __future__ import annotations

import argparse
import sys

from data_prep.__main__ import USER_ERRORS
from data_prep.config import describe_config, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pretrain",
        description="Pretrain a RoBERTa encoder with masked language modelling.",
        epilog="Config keys (override any with --section.key=value):\n" + describe_config(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=["fit", "resume"])
    parser.add_argument("--config", default=None, help="experiment YAML (default: built-in defaults)")
    args, overrides = parser.parse_known_args(argv)

    from data_prep.prepare import prepare_data

    from .train import NothingToResume, fit, plot_losses

    try:
        cfg = load_config(args.config, overrides)
        if args.command == "resume" and not (cfg.run_path / "checkpoints" / "last.ckpt").is_file():
            raise NothingToResume(f"{cfg.run_path}/checkpoints/last.ckpt does not exist: nothing to resume "
                                  "(run `make pretrain`)")
        meta = prepare_data(cfg)
        trainer = fit(cfg, meta, resume=args.command == "resume" or None)
    except (*USER_ERRORS, NothingToResume, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if trainer.global_rank == 0:
        logs = cfg.run_path / "logs"
        png = plot_losses(logs / "metrics.csv", logs / "loss.png")
        val = trainer.callback_metrics.get("val/loss")
        print(f"\ndone: {trainer.global_step} steps" + (f", validation loss {float(val):.4f} nats" if val is not None else ""))
        print(f"  checkpoint  {cfg.run_path / 'checkpoints' / 'last.ckpt'}")
        print(f"  logs        {logs / 'metrics.csv'}")
        if png:
            print(f"  loss curve  {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
