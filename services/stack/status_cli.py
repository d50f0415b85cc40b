"""`vidsearch status`: the running stack at a glance (or as JSON for scripts)."""
from __future__ import annotations

import argparse
import json
from typing import Any

from vidsearch.config import Settings


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Show the live index and model version, the point count, the consumer lag per "
                          "partition, the DLQ record count and the health of the broker, Ray, store, ingest "
                          "worker and Serve apps. Finds a running `vidsearch up` by itself. Exit 0 when "
                          "everything is healthy, 1 otherwise.")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from vidsearch.stack_state import read_state, state_path

    from .status import collect

    state = read_state(state_path(settings))
    status = collect(settings, state.endpoints.get("metrics") if state is not None else None)
    print(render(status, as_json=args.json))
    return 0 if status.ok else 1


def render(status: Any, *, as_json: bool = False) -> str:
    """What `vidsearch status` prints for ``status`` (a StackStatus), redacted: endpoints
    and probe errors may carry user-info or keys (vidsearch.redact)."""
    from vidsearch.redact import redact, redact_json

    from .status import format_status

    return json.dumps(redact_json(status.as_dict()), sort_keys=True) if as_json else redact(format_status(status))
