"""`vidsearch ingest-worker`: run one ingest consumer until SIGTERM/SIGINT."""
from __future__ import annotations

import argparse
import signal
from types import FrameType

from vidsearch.cli import CommandError
from vidsearch.config import Settings

from .worker import IngestWorker, WorkerError


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Consume the ingest topic in a consumer group: decode videos on Ray, encode "
                          "frames on the encoder actors, upsert into the vector store, then commit. "
                          "SIGTERM/SIGINT drain in-flight batches (ingest.shutdown_grace_s) and exit 0.")
    parser.add_argument("--topic", help="override broker.ingest_topic")
    parser.add_argument("--group", help="override broker.consumer_group")


def run(args: argparse.Namespace, settings: Settings) -> int:
    worker = IngestWorker(settings, topic=args.topic, group=args.group)

    def _stop(signum: int, _frame: FrameType | None) -> None:
        # Only set a flag: the loop notices between steps, stops polling, drains
        # in-flight batches within the grace period and closes the consumer cleanly.
        worker.stop()

    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        worker.run()
    except WorkerError as exc:
        raise CommandError(str(exc)) from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
