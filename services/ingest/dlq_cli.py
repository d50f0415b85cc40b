"""`vidsearch dlq`: list dead-letter records, filtered, and replay them once fixed.

Reads the DLQ topic from its start without joining a consumer group (listing never
moves anyone's offsets). ``--replay`` re-publishes the selected originals, byte for
byte and with their original key, to the ingest topic; records that hold only a
prefix of their message (``truncated``) or whose uri credentials were redacted
cannot be replayed faithfully and are skipped, with the count and why. What is
printed is redacted (vidsearch.redact), whoever wrote the record.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from datetime import datetime, timedelta, timezone
from typing import Any, Iterator

from vidsearch.broker import client_security
from vidsearch.cli import CommandError
from vidsearch.config import Settings
from vidsearch.dlq import decode_dlq_bytes, parse_dlq_record, redact_record, replayable_value
from vidsearch.redact import redact

# An empty poll this long means the end of the topic (ListOffsets can undercount on
# some brokers, so the end is found by reading).
END_POLL_MS = 1500


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = ("List the dead-letter topic's records (time, class, reason, key, source offset), "
                          "filtered; --replay re-publishes the selected originals to the ingest topic.")
    parser.add_argument("--error-class", action="append", metavar="CLASS",
                        help="only this error class (repeatable), e.g. not_allowed")
    parser.add_argument("--key", action="append", metavar="ID", help="only this key / video id (repeatable)")
    parser.add_argument("--reason", metavar="TEXT", help="only records whose reason contains TEXT")
    parser.add_argument("--since", metavar="WHEN",
                        help="only records that failed after WHEN: an RFC 3339 time or an age like 30m, 2h, 1d")
    parser.add_argument("--partition", type=int, metavar="N", help="only records from this source partition")
    parser.add_argument("--limit", type=int, metavar="N", help="at most N records (the oldest first)")
    parser.add_argument("--json", action="store_true", help="one JSON record per line")
    parser.add_argument("--replay", action="store_true",
                        help="re-publish the selected originals to the ingest topic (after fixing the cause)")
    parser.add_argument("--topic", help="override broker.dlq_topic")
    parser.add_argument("--to-topic", help="with --replay: override broker.ingest_topic")


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """An RFC 3339 time, or an age (``90s``, ``30m``, ``2h``, ``1d``) before ``now``."""
    now = now or datetime.now(timezone.utc)
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    raw = text.strip()
    if raw[-1:] in units and raw[:-1].replace(".", "", 1).isdigit():
        return now - timedelta(seconds=float(raw[:-1]) * units[raw[-1]])
    try:
        moment = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise CommandError(f"--since: {text!r} is neither an RFC 3339 time nor an age like 30m", exit_code=2) from None
    if moment.tzinfo is None:
        raise CommandError("--since: the time needs a timezone (e.g. 'Z')", exit_code=2)
    return moment


def read_records(bootstrap: str, topic: str, security: dict[str, Any] | None = None) -> Iterator[dict[str, Any]]:
    """Every record of the DLQ topic, oldest first per partition; unreadable ones as stubs."""
    from kafka import KafkaConsumer, TopicPartition
    from kafka.errors import KafkaError

    try:
        consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                 client_id="vidsearch-dlq-cli", request_timeout_ms=15_000, **(security or {}))
    except KafkaError as exc:
        raise CommandError(f"cannot reach Kafka at {bootstrap}: {exc}") from None
    try:
        partitions = sorted(consumer.partitions_for_topic(topic) or [])
        if not partitions:
            raise CommandError(f"topic {topic!r} does not exist on {bootstrap}")
        assigned = [TopicPartition(topic, p) for p in partitions]
        consumer.assign(assigned)
        consumer.seek_to_beginning(*assigned)
        records = []
        while True:
            batch = consumer.poll(timeout_ms=END_POLL_MS)
            if not batch:
                break
            for tp_records in batch.values():
                records.extend(tp_records)
    finally:
        consumer.close()
    records.sort(key=lambda r: (r.timestamp, r.partition, r.offset))
    for record in records:
        try:
            body = parse_dlq_record(record.value)
        except ValueError:
            body = {"error_class": "?", "reason": "not a DLQ record", "value": {}, "key": {}, "source": {}}
        body["dlq"] = {"partition": record.partition, "offset": record.offset}
        yield body


def _key_text(record: dict[str, Any]) -> str:
    raw = decode_dlq_bytes(record.get("key") or {})
    return "" if raw is None else raw.decode("utf-8", "replace")


def select(records: Iterator[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    since = parse_since(args.since) if args.since else None
    keys = set(args.key or [])
    classes = set(args.error_class or [])
    out = []
    for record in records:
        if classes and record.get("error_class") not in classes:
            continue
        if keys and _key_text(record) not in keys:
            continue
        if args.reason and args.reason not in str(record.get("reason", "")):
            continue
        if args.partition is not None and (record.get("source") or {}).get("partition") != args.partition:
            continue
        if since is not None:
            try:
                failed_at = datetime.fromisoformat(str(record.get("failed_at", "")).replace("Z", "+00:00"))
            except ValueError:
                continue
            if failed_at < since:
                continue
        out.append(record)
        if args.limit is not None and len(out) >= args.limit:
            break
    return out


def _line(record: dict[str, Any]) -> str:
    source = record.get("source") or {}
    where = f"{source.get('topic', '?')}[{source.get('partition', '?')}]@{source.get('offset', '?')}"
    reason = " ".join(str(record.get("reason", "")).split())
    reason = reason if len(reason) <= 160 else reason[:157] + "..."
    key = _key_text(record)
    key = key if len(key) <= 40 else key[:37] + "..."
    return f"{record.get('failed_at', '?'):24}  {record.get('error_class', '?'):16}  {key or '-':20}  {where}  {reason}"


def replay(bootstrap: str, topic: str, records: list[dict[str, Any]], settings: Settings) -> tuple[int, Counter]:
    """Publish the replayable originals to ``topic``; (sent, skip reasons)."""
    from kafka import KafkaProducer
    from kafka.errors import KafkaError

    skipped: Counter = Counter()
    messages = []
    for record in records:
        value, why = replayable_value(record)
        if value is None:
            skipped[why] += 1
            continue
        messages.append((decode_dlq_bytes(record.get("key") or {}), value))
    if not messages:
        return 0, skipped
    try:
        producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", client_id="vidsearch-dlq-replay",
                                 max_request_size=settings.broker.max_request_bytes,
                                 **client_security(settings.broker))
    except KafkaError as exc:
        raise CommandError(f"cannot reach Kafka at {bootstrap}: {exc}") from None
    try:
        futures = [producer.send(topic, key=key, value=value) for key, value in messages]
        producer.flush(timeout=30)
        for future in futures:
            future.get(timeout=30)
    except KafkaError as exc:
        raise CommandError(f"replaying to {topic} on {bootstrap} failed: {exc}") from None
    finally:
        producer.close(timeout=5)
    return len(messages), skipped


def run(args: argparse.Namespace, settings: Settings) -> int:
    bootstrap = settings.broker.bootstrap
    if not bootstrap:
        raise CommandError("no Kafka broker configured: set KAFKA_BOOTSTRAP (or broker.bootstrap)")
    if args.to_topic and not args.replay:
        raise CommandError("--to-topic only applies to --replay", exit_code=2)
    if args.limit is not None and args.limit < 1:
        raise CommandError("--limit must be >= 1", exit_code=2)
    chosen = select(read_records(bootstrap, args.topic or settings.broker.dlq_topic,
                                 client_security(settings.broker)), args)
    for record in chosen:
        # Redacted again as it is shown: a record from an older worker may hold credentials.
        shown = redact_record(record)
        print(json.dumps(shown, ensure_ascii=False) if args.json else redact(_line(shown)))
    if not args.replay:
        if not args.json:
            print(f"{len(chosen)} record(s)", file=sys.stderr)
        return 0
    target = args.to_topic or settings.broker.ingest_topic
    sent, skipped = replay(bootstrap, target, chosen, settings)
    summary = f"replayed {sent} message(s) to {target}"
    if skipped:
        summary += "; skipped " + ", ".join(f"{n} ({why})" for why, n in skipped.items())
    print(summary)
    return 0
