"""`python -m data_prep {tokenizer,data} --config FILE [--section.key=value ...]`."""

from __future__ import annotations

import argparse
import sys

from .cli import run_command
from .config import describe_config, load_config
from .tokenizer import train_tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep",
        description="Corpus -> byte-level BPE tokenizer -> packed shards.",
        epilog="Config keys (override any with --section.key=value):\n" + describe_config(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=["tokenizer", "data"], help="what to build")
    parser.add_argument("--config", default=None, help="experiment YAML (default: built-in defaults)")
    parser.add_argument("--force", action="store_true", help="rebuild even when the output is up to date")
    args, overrides = parser.parse_known_args(argv)

    def build() -> None:
        cfg = load_config(args.config, overrides)
        if args.command == "tokenizer":
            train_tokenizer(cfg, force=args.force)
        elif args.command == "data":
            from .prepare import prepare_data

            prepare_data(cfg, force=args.force)

    return run_command(build)


if __name__ == "__main__":
    sys.exit(main())
