"""`vidsearch reindex [--version V]`: build the index of a model version and flip the alias to it."""
from __future__ import annotations

import argparse

from vidsearch.cli import CommandError
from vidsearch.config import Settings


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Build videos__<version> from the live collection (from the stored frames when the frame encoder "
        "is the same, else by decoding the source videos again), catch up with what is ingested meanwhile, "
        "flip the store alias without downtime and point the registry's production at the version.")
    parser.add_argument("--version", default="production", metavar="V",
                        help="registry version id or alias (default: production)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from .reindex import ReindexError, reindex

    try:
        report = reindex(settings, args.version, progress=not args.no_progress)
    except ReindexError as exc:
        raise CommandError(str(exc)) from None
    print(report.summary())
    return 0
