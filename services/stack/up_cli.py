"""`vidsearch up`: the whole stack in the foreground; Ctrl-C stops everything."""
from __future__ import annotations

import argparse

from vidsearch.cli import CommandError
from vidsearch.config import Settings
from vidsearch.services.stack.local import LocalStack, StackError


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Start the embedded stack: a local Kafka-compatible broker, the embedded Qdrant "
                          "store, a local Ray, the ingest worker and the gRPC search service. Pieces whose "
                          "endpoint is set (KAFKA_BOOTSTRAP, QDRANT_URL, RAY_ADDRESS) are used, not started. "
                          "Ctrl-C (or SIGTERM) stops everything it started.")
    parser.add_argument("--no-worker", action="store_true", help="do not start an ingest worker")


def run(args: argparse.Namespace, settings: Settings) -> int:
    try:
        with LocalStack(settings, worker=not args.no_worker) as stack:
            s = stack.settings
            print(f"vidsearch is up: gRPC on 127.0.0.1:{s.serve.grpc_port} (application {s.serve.app_name!r}), "
                  f"Kafka on {s.broker.bootstrap}, Ray at {s.ray.address}.\n"
                  f"  ingest:  KAFKA_BOOTSTRAP={s.broker.bootstrap} vidsearch ingest FILES... "
                  f"(files under {', '.join(s.decode.allowed_prefixes)})\n"
                  f"  search:  vidsearch search 'a red ball' --address 127.0.0.1:{s.serve.grpc_port}\n"
                  "Ctrl-C to stop.", flush=True)
            stack.wait_forever()
            print("stopping ...", flush=True)
    except StackError as exc:
        raise CommandError(str(exc)) from None
    print("stopped.")
    return 0
