"""`vidsearch status`: the running stack at a glance (or as JSON for scripts)."""
from __future__ import annotations

import argparse
import json

from vidsearch.config import Settings


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Show the live index and model version, the point count, the consumer lag per "
                          "partition, the DLQ record count and the health of the broker, Ray, store, ingest "
                          "worker and Serve apps. Finds a running `vidsearch up` by itself. Exit 0 when "
                          "everything is healthy, 1 otherwise.")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from vidsearch.stack_state import read_state, state_path

    from .status import collect, format_status

    state = read_state(state_path(settings))
    status = collect(settings, state.endpoints.get("metrics") if state is not None else None)
    print(json.dumps(status.as_dict(), sort_keys=True) if args.json else format_status(status))
    return 0 if status.ok else 1
