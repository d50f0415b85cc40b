"""`vidsearch ingest`: queue videos for ingestion (or deletion) on the ingest topic."""
from __future__ import annotations

import argparse

from vidsearch.broker import client_security
from vidsearch.cli import CommandError
from vidsearch.config import Settings

from .producer import ProducerError, check_ops, ops_for_delete, ops_from_manifest, ops_from_paths, publish


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Publish upsert messages for video files (video_id = file stem), for the "
                          "entries of a JSONL manifest, or delete messages for video ids.")
    parser.add_argument("paths", nargs="*", metavar="PATH", help="video files or directories of videos")
    parser.add_argument("--manifest", metavar="FILE",
                        help="JSONL manifest: one {video_id?, path, metadata?} object per line")
    parser.add_argument("--delete", nargs="+", metavar="ID", help="video ids to delete")
    parser.add_argument("--metadata-json", metavar="JSON",
                        help="a JSON object of metadata fields added to every video")
    parser.add_argument("--topic", help="override broker.ingest_topic")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-check", action="store_true",
                        help="skip the local allowlist and decode-limit checks (the files are read by "
                             "workers with other settings); message limits are always checked")


def run(args: argparse.Namespace, settings: Settings) -> int:
    sources = sum(bool(x) for x in (args.paths, args.manifest, args.delete))
    if sources != 1:
        raise CommandError("give exactly one of: PATH..., --manifest FILE, --delete ID...", exit_code=2)
    if args.delete and args.metadata_json:
        raise CommandError("--metadata-json does not apply to --delete", exit_code=2)
    bootstrap = settings.broker.bootstrap
    if not bootstrap:
        raise CommandError("no Kafka broker configured: set KAFKA_BOOTSTRAP (or broker.bootstrap)")
    try:
        if args.delete:
            ops = ops_for_delete(args.delete)
        elif args.manifest:
            ops = ops_from_manifest(args.manifest, args.metadata_json)
        else:
            ops = ops_from_paths(args.paths, args.metadata_json)
        # Everything the worker would refuse is refused here, before the first send.
        check_ops(ops, settings, local_files=not args.no_check)
        result = publish(bootstrap, args.topic or settings.broker.ingest_topic, ops,
                         partitions=settings.broker.partitions,
                         progress=False if args.no_progress else None,
                         max_request_bytes=settings.broker.max_request_bytes,
                         security=client_security(settings.broker),
                         create_topics=settings.broker.create_topics)
    except ProducerError as exc:
        raise CommandError(str(exc)) from None
    print(f"published {result.sent} message(s) to {result.topic} on {result.bootstrap}")
    return 0
