"""The `vidsearch` command line.

Each subcommand lives in its own module exposing ``configure(parser)`` and
``run(args, settings) -> int``; modules are imported only when their command
runs, so `vidsearch --help` stays fast and torch/ray load only when needed.
Errors surface as one line on stderr and a non-zero exit code.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from vidsearch.config import ConfigError, load_settings

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("vidsearch.synth_cli", "write a synthetic video dataset (mp4 + JSONL manifest)"),
    "config": ("vidsearch.config_cli", "print the effective settings (secrets masked)"),
    "ingest": ("vidsearch.services.ingest.producer_cli", "queue video files, a manifest or deletes for ingestion"),
    "ingest-worker": ("vidsearch.services.ingest.worker_cli", "consume the ingest topic: decode, encode, store"),
    "serve": ("vidsearch.services.query.serve_cli", "deploy the gRPC search service (ingress + reranker) to Ray Serve"),
    "search": ("vidsearch.services.query.search_cli", "search the running service and print the results"),
    "up": ("vidsearch.services.stack.up_cli", "run the whole stack on this machine (broker, store, Ray, worker, Serve)"),
    "demo": ("vidsearch.services.stack.demo_cli", "synthetic videos -> local stack -> Kafka ingest -> example searches"),
    "train": ("vidsearch.services.trainer.train_cli", "train, distil, evaluate, gate and publish a model version"),
    "models": ("vidsearch.services.trainer.models_cli", "list and show model versions; roll production back"),
    "reindex": ("vidsearch.services.trainer.reindex_cli", "build a version's index and flip the live alias to it"),
}

EXIT_USAGE = 2


class CommandError(Exception):
    """Raised by a command for a user-facing failure; printed as one line."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def build_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    parser = argparse.ArgumentParser(prog="vidsearch", description="Distributed text-to-video retrieval.")
    parser.add_argument("--config", help="YAML settings file (also VIDSEARCH_CONFIG)")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        # -h is added after configure(): otherwise the first, partial parse in main()
        # prints the command's help before its arguments exist.
        sub.add_parser(name, help=help_text, add_help=False)
    return parser, sub


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, sub = build_parser()
    head, _ = parser.parse_known_args(argv)
    if head.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    module = importlib.import_module(COMMANDS[head.command][0])
    module.configure(sub.choices[head.command])
    sub.choices[head.command].add_argument("-h", "--help", action="help", help="show this help message and exit")
    args = parser.parse_args(argv)
    from vidsearch.telemetry import configure_logging

    configure_logging(args.log_level)
    try:
        settings = load_settings(args.config)
        return int(module.run(args, settings) or 0)
    except ConfigError as exc:
        print(f"vidsearch: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CommandError as exc:
        print(f"vidsearch {head.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"vidsearch {head.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # `python -m vidsearch.cli` (how the local stack starts its worker) runs this file as
    # __main__, a second module object: commands raise vidsearch.cli.CommandError, which
    # only the real module's main() catches as a one-line error.
    from vidsearch.cli import main as _main

    sys.exit(_main())
