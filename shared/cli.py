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
from vidsearch.redact import redact

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("vidsearch.synth_cli", "write a synthetic video dataset (mp4 + JSONL manifest)"),
    "config": ("vidsearch.config_cli", "print the effective settings (secrets masked)"),
    "ingest": ("vidsearch.services.ingest.producer_cli", "queue video files, a manifest or deletes for ingestion"),
    "ingest-worker": ("vidsearch.services.ingest.worker_cli", "consume the ingest topic: decode, encode, store"),
    "dlq": ("vidsearch.services.ingest.dlq_cli", "list dead-letter records (filtered) and replay them once fixed"),
    "serve": ("vidsearch.services.query.serve_cli", "deploy the gRPC search service (ingress + reranker) to Ray Serve"),
    "search": ("vidsearch.services.query.search_cli", "search the running service and print the results"),
    "up": ("vidsearch.services.stack.up_cli", "run the whole stack on this machine (broker, store, Ray, worker, Serve)"),
    "status": ("vidsearch.services.stack.status_cli", "the running stack: live index, points, lag, DLQ, health"),
    "demo": ("vidsearch.services.stack.demo_cli", "synthetic videos -> local stack -> Kafka ingest -> example searches"),
    "train": ("vidsearch.services.trainer.train_cli", "train, distil, evaluate, gate and publish a model version"),
    "models": ("vidsearch.services.trainer.models_cli", "list and show model versions; roll production back"),
    "reindex": ("vidsearch.services.trainer.reindex_cli", "build a version's index and flip the live alias to it"),
}

EXIT_USAGE = 2
# Commands that find a running `vidsearch up` (stack.state_file) when no endpoint is set.
ATTACHING_COMMANDS = frozenset({"ingest", "ingest-worker", "search", "status", "dlq"})
QUIET_COMMANDS = frozenset({"ingest", "search", "status", "dlq", "config"})


class CommandError(Exception):
    """Raised by a command for a user-facing failure; printed as one line."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def build_parser() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    parser = argparse.ArgumentParser(prog="vidsearch", description="Distributed text-to-video retrieval.")
    parser.add_argument("--config", help="YAML settings file (also VIDSEARCH_CONFIG)")
    parser.add_argument("--log-level", default=None,
                        help="DEBUG, INFO, WARNING, ERROR (default INFO; WARNING for the client commands)")
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

    # Client commands print their own answer; progress logs would only bury it.
    # Resolved once: commands pass args.log_level on (to Ray workers, for one).
    args.log_level = args.log_level or ("WARNING" if head.command in QUIET_COMMANDS else "INFO")
    configure_logging(args.log_level)
    try:
        settings = load_settings(args.config)
        if head.command in ATTACHING_COMMANDS:
            from vidsearch.stack_state import attach

            settings, _ = attach(settings, args.config)
        return int(module.run(args, settings) or 0)
    except ConfigError as exc:
        print(redact(f"vidsearch: {exc}"), file=sys.stderr)
        return EXIT_USAGE
    except CommandError as exc:
        print(redact(f"vidsearch {head.command}: {exc}"), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"vidsearch {head.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - only connection failures become one line
        hint = connection_hint(exc)
        if hint is None:
            raise
        print(redact(f"vidsearch {head.command}: {hint}"), file=sys.stderr)
        return 1


def connection_hint(exc: BaseException) -> str | None:
    """One line for a failure to reach or authenticate to Ray or Kafka, naming what to
    set; None for anything else (a bug keeps its traceback)."""
    import os

    names = {type(e).__name__ for e in _chain(exc)}
    text = " ".join(str(e) for e in _chain(exc))
    if names & {"AuthenticationError", "InvalidAuthToken"} or "InvalidAuthToken" in text \
            or "authentication token" in text.lower():
        mode = os.environ.get("RAY_AUTH_MODE", "unset")
        return (f"Ray at {os.environ.get('RAY_ADDRESS', 'the configured address')} refused the connection "
                f"(token authentication; RAY_AUTH_MODE is {mode}): set RAY_AUTH_MODE=token and make the "
                "cluster's token available (~/.ray/auth_token or RAY_AUTH_TOKEN), "
                "or run `eval \"$(vidsearch up --print-env)\"`")
    if names & {"NoBrokersAvailable", "KafkaConnectionError"}:
        return ("cannot reach the Kafka broker: set KAFKA_BOOTSTRAP (broker.bootstrap) to a running broker, "
                "or start `vidsearch up`")
    if "ConnectionError" in names and "ray" in text.lower() or "Failed to connect to GCS" in text:
        return (f"cannot reach Ray at {os.environ.get('RAY_ADDRESS', 'ray.address')}: set RAY_ADDRESS "
                "(ray.address) to a running cluster, or start `vidsearch up`")
    return None


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while exc is not None and exc not in seen and len(seen) < 10:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


if __name__ == "__main__":
    # `python -m vidsearch.cli` (how the local stack starts its worker) runs this file as
    # __main__, a second module object: commands raise vidsearch.cli.CommandError, which
    # only the real module's main() catches as a one-line error.
    from vidsearch.cli import main as _main

    sys.exit(_main())
