"""`vidsearch demo`: synthetic videos -> local stack -> Kafka ingest -> example searches."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from vidsearch.cli import CommandError
from vidsearch.config import Settings

from .demo import DEFAULT_DATA_DIR, DEFAULT_N, DEFAULT_PRESET


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Write synthetic videos, start the embedded stack (broker, store, Ray, ingest worker, gRPC "
        "service), ingest the videos through Kafka, wait until all are searchable, and print the "
        "results of a few searches with captions from the dataset. Then keep the stack up (Ctrl-C "
        "stops it), or exit with --once. Data lives in --data-dir; the index is rebuilt each run.")
    parser.add_argument("--once", action="store_true", help="exit after the example searches")
    parser.add_argument("--n", type=int, default=DEFAULT_N, help=f"number of synthetic videos (default {DEFAULT_N})")
    parser.add_argument("--preset", default=DEFAULT_PRESET,
                        help="use this preset's untrained base model instead of the shipped trained model "
                             "('tiny' is fast and meaningless)")
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR,
                        help=f"videos, store and registry go here (default {DEFAULT_DATA_DIR})")
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="seconds to wait for the ingest to finish (default 900)")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from vidsearch.models import load_model_config

    from .demo import DemoError, DemoOptions, run_demo
    from .local import StackError

    if not 1 <= args.n <= 10_000:
        raise CommandError(f"--n must be between 1 and 10000 (got {args.n})", exit_code=2)
    if args.timeout <= 0:
        raise CommandError("--timeout must be > 0", exit_code=2)
    try:
        if args.preset is not None:
            load_model_config(args.preset)
    except (ValueError, OSError) as exc:
        raise CommandError(f"--preset {args.preset!r}: {exc}", exit_code=2) from None
    # kafka-python logs every connection at INFO; the demo's output is meant to be read.
    logging.getLogger("kafka").setLevel(max(logging.WARNING, logging.getLogger().getEffectiveLevel()))
    options = DemoOptions(data_dir=Path(args.data_dir).expanduser().resolve(), n=args.n, preset=args.preset,
                          once=args.once, timeout_s=args.timeout)
    try:
        run_demo(settings, options, say=lambda line: print(line, flush=True))
    except (DemoError, StackError) as exc:
        raise CommandError(str(exc)) from None
    return 0
