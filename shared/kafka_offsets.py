"""End offsets that count every record, whatever the broker's high watermark says.

Tansu 0.6.0, the embedded broker (memory and s3 engines alike), answers ListOffsets
(latest) with the base offset of a partition's last record batch plus one, not its last
offset plus one: after a producer sent several records of a partition in one batch
(``linger_ms``, a burst from ``vidsearch ingest``), the watermark is short by all but one
of them. benchmarks/faults.py measured it on the stack: 80 messages pending, a lag of 44
computed from the watermarks. :func:`end_offsets` reads the last batch back (one fetch
per partition, from the watermark minus one) and returns the larger of the watermark
and the last offset seen plus one; against a broker whose watermark is right (Kafka) the
fetch finds the last record and changes nothing.
"""
from __future__ import annotations

import time
from typing import Any, Sequence

READ_BACK_TIMEOUT_S = 5.0


def end_offsets(consumer: Any, parts: Sequence[Any], timeout_s: float = READ_BACK_TIMEOUT_S) -> dict[Any, int]:
    """{TopicPartition: last offset + 1} for ``parts``, through ``consumer`` (a kafka-python
    KafkaConsumer without a subscription; its assignment is cleared afterwards). A partition
    whose last batch could not be read within ``timeout_s`` keeps its listed watermark."""
    parts = list(parts)
    if not parts:
        return {}
    ends = {tp: int(v or 0) for tp, v in consumer.end_offsets(parts).items()}
    wanted = {tp: ends[tp] - 1 for tp in parts if ends.get(tp, 0) > 0}
    if not wanted:
        return ends
    consumer.assign(list(wanted))
    try:
        for tp, offset in wanted.items():
            consumer.seek(tp, offset)
        deadline = time.monotonic() + timeout_s
        pending = set(wanted)
        while pending and time.monotonic() < deadline:
            for tp, records in consumer.poll(timeout_ms=200).items():
                if records:
                    ends[tp] = max(ends[tp], max(r.offset for r in records) + 1)
                    pending.discard(tp)
    finally:
        consumer.unsubscribe()
    return ends
