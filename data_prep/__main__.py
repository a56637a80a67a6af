"""`python -m data_prep {tokenizer,data} --config FILE [--section.key=value ...]`;
`python -m data_prep upload --config FILE [URL]`: the config's shards (prepared first when missing) to URL
(default: data.shards_url), from where `make pretrain` with data.shards_url=URL fetches them (fetch.py);
`python -m data_prep fetch --config FILE`: that download alone, into this node's cache (before a launch)."""

from __future__ import annotations

import argparse
import sys

from .cli import run_command
from .config import ConfigError, ExperimentConfig, describe_config, load_config
from .tokenizer import tokenizer_dir
from .tokenizer_training import train_tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep",
        description="Corpus -> byte-level BPE tokenizer -> packed shards.",
        epilog="Config keys (override any with --section.key=value):\n" + describe_config(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=["tokenizer", "data", "upload", "fetch"],
                        help="what to build; upload: the shards to URL (s3://, gs://, hf://, file://); fetch: "
                        "data.shards_url's shards into this node's cache (data.cache_dir)")
    parser.add_argument("url", nargs="?", default=None, help="upload: where to (default: data.shards_url)")
    parser.add_argument("--config", default=None, help="experiment YAML (default: built-in defaults)")
    parser.add_argument("--force", action="store_true", help="rebuild even when the output is up to date")
    args, overrides = parser.parse_known_args(argv)
    # argparse leaves a URL given after an override (`upload --data.seq_len=128 s3://...`) among the unknowns
    strays = [a for a in overrides if not a.startswith("-")]
    overrides = [a for a in overrides if a.startswith("-")]
    if args.url is None and args.command == "upload" and len(strays) == 1:
        args.url, strays = strays[0], []
    if strays or (args.url is not None and args.command != "upload"):
        parser.error(f"unexpected argument(s) {' '.join(strays) or args.url} (a URL is for upload only, once)")

    def build() -> None:
        cfg = load_config(args.config, overrides)
        if args.command == "tokenizer":
            from .prepare import run_dir_lock

            with run_dir_lock(cfg):  # never beside a `make data` of this run_dir; a read-only run_dir fails at once
                train_tokenizer(cfg, force=args.force)
        elif args.command == "data":
            from .prepare import prepare_data

            prepare_data(cfg, force=args.force)
        elif args.command == "upload":
            upload(cfg, args.url, args.force)
        elif args.command == "fetch":
            from .fetch import fetch_shards

            if not cfg.data.shards_url:
                raise ConfigError("fetch needs data.shards_url (the URL `python -m data_prep upload` wrote to)")
            fetch_shards(cfg)

    return run_command(build, stop_on_sigterm=True)


def upload(cfg: ExperimentConfig, url: str | None, force: bool) -> None:
    from .prepare import prepare_data
    from .remote import upload_shards
    from .shards import META, ShardError

    url = url or cfg.data.shards_url
    if not url:
        raise ConfigError("upload needs a URL: `python -m data_prep upload --config FILE s3://bucket/path` "
                          "(or data.shards_url in the config)")
    meta = prepare_data(cfg, force=force)
    if meta.name != META:
        raise ShardError(f"{meta.parent}: not every slice is prepared yet ({meta.name} only): upload when "
                         f"{META} is there")
    upload_shards(meta.parent, url, cfg.data.storage_options, tokenizer=tokenizer_dir(cfg))


if __name__ == "__main__":
    sys.exit(main())
