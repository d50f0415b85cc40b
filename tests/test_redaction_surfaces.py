"""One redaction for every surface, end to end: each credential form is published to the
real (Tansu) broker, refused by a real IngestWorker, and then looked for on every surface
that could show it: the DLQ record (reason, value, key), `vidsearch dlq` (text and JSON),
the worker's log lines (both real formatters), `vidsearch ingest` and `vidsearch status`.
The gRPC surface is tests/test_redaction_grpc.py (it needs the Serve apps)."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import pytest

from vidsearch.dlq import decode_dlq_bytes, dlq_record
from vidsearch.services.ingest.worker import IngestWorker
from vidsearch.telemetry import JsonFormatter, KeyValueFormatter

from ingest_support import (  # noqa: F401 - fixtures
    encoder_pool, ensure_topic, free_port, make_settings, model_registry, produce_to, read_records,
    run_until_settled, run_vidsearch, store_path, unique, video_root,
)

TIMEOUT_S = 180


@dataclass(frozen=True)
class Case:
    name: str
    secret: str
    uri: str | None  # None: ``raw`` is the whole message value
    error_class: str
    says: str  # what the reason must still say (what was wrong)
    metadata: dict | None = None
    raw: bytes | None = None
    shown: str | None = None  # the redacted form the reason shows, where it echoes the input

    def value(self) -> bytes:
        if self.raw is not None:
            return self.raw
        return json.dumps({"op": "upsert", "video_id": self.name, "uri": self.uri,
                           "metadata": self.metadata or {}}).encode()


def _cases(root: str) -> list[Case]:
    def secret(name: str) -> str:
        return f"pw{name.replace('-', '')}9f8e7d"

    def case(name: str, uri: str | None, error_class: str, says: str, shown: str | None = None, **kw: Any) -> Case:
        s = secret(name)
        fill = (lambda text: text.replace("SECRET", s) if text is not None else None)
        if "raw" in kw:
            kw["raw"] = kw["raw"].replace(b"SECRET", s.encode())
        if "metadata" in kw:
            kw["metadata"] = json.loads(json.dumps(kw["metadata"]).replace("SECRET", s))
        return Case(name, s, fill(uri), error_class, says, shown=shown, **kw)

    return [
        case("file-userinfo", f"file://user:SECRET@localhost{root}/clip-000.mp4", "unsupported_uri",
             "file uri must not carry user-info", f"'file://<redacted>@localhost{root}/clip-000.mp4'"),
        case("http-userinfo", "http://user:SECRET@videos.example.com/a.mp4", "not_allowed",
             "scheme 'http' is not in allowed_schemes", "'http://<redacted>@videos.example.com/a.mp4'"),
        case("https-userinfo", "https://user:SECRET@videos.example.com/a.mp4?X-Amz-Date=20260101T000000Z",
             "not_allowed", "scheme 'https' is not in allowed_schemes",
             "'https://<redacted>@videos.example.com/a.mp4?X-Amz-Date=20260101T000000Z'"),
        case("s3-userinfo", "s3://AKID:SECRET@bucket/clips/a.mp4", "not_allowed",
             "scheme 's3' is not in allowed_schemes", "'s3://<redacted>@bucket/clips/a.mp4'"),
        case("bare-token", f"{root}/missing.mp4?token=SECRET", "not_found", "no file at",
             f"'{root}/missing.mp4?token=<redacted>'"),
        case("signature", "/elsewhere/a.mp4?a=1&signature=SECRET", "not_allowed",
             "resolves outside the allowed prefixes", "'/elsewhere/a.mp4?a=1&signature=<redacted>'"),
        case("x-amz-signature", "/elsewhere/a.mp4?X-Amz-Expires=60&X-Amz-Signature=SECRET", "not_allowed",
             "resolves outside the allowed prefixes", "'/elsewhere/a.mp4?X-Amz-Expires=60&X-Amz-Signature=<redacted>'"),
        case("api-key", "file:///elsewhere/a.mp4?api_key=SECRET", "not_allowed",
             "resolves outside the allowed prefixes", "'file:///elsewhere/a.mp4?api_key=<redacted>'"),
        case("bearer-uri", "Bearer SECRET", "not_allowed", "resolves outside the allowed prefixes",
             "'Bearer <redacted>'"),
        case("bearer-metadata", "ftp://videos.example.com/a.mp4", "unsupported_uri", "unsupported scheme 'ftp'",
             metadata={"fetch": {"headers": {"Authorization": "Bearer SECRET"}}, "note": "token=SECRET"}),
        case("bad-json", None, "bad_json", "not valid JSON",
             raw=b'{"op": "upsert", "video_id": "bad-json", "uri": "https://u:SECRET@h.example/a.mp4?sig=SECRET'),
        case("unknown-op", None, "unknown_op", "unknown op", "'access_token=<redacted>'",
             raw=b'{"op": "access_token=SECRET", "video_id": "unknown-op"}'),
    ]


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture(scope="module")
def refused(broker, encoder_pool, store_path, video_root, model_registry) -> dict[str, Any]:
    """Every case published to one topic and run through a real worker; what each surface showed."""
    settings = make_settings(bootstrap=broker.bootstrap, store_path=store_path, video_root=video_root,
                             registry=model_registry)
    topic, dlq = settings.broker.ingest_topic, settings.broker.dlq_topic
    ensure_topic(broker.bootstrap, topic, dlq)
    cases = _cases(str(video_root.resolve()))
    produce_to(broker.bootstrap, topic, [(c.name.encode(), c.value(), None) for c in cases])

    # The worker's own log lines through both real formatters (the CLI installs one of them).
    text_lines, json_lines = _Lines(), _Lines()
    text_lines.setFormatter(KeyValueFormatter())
    json_lines.setFormatter(JsonFormatter())
    root, package = logging.getLogger(), logging.getLogger("vidsearch")
    level = package.level
    root.addHandler(text_lines)
    root.addHandler(json_lines)
    package.setLevel(logging.INFO)
    worker = IngestWorker(settings, pool=encoder_pool)
    try:
        assert run_until_settled(worker, upserts=0, dlq=len(cases), timeout_s=TIMEOUT_S), worker.metrics.snapshot()
    finally:
        worker.close()
        root.removeHandler(text_lines)
        root.removeHandler(json_lines)
        package.setLevel(level)

    records = {r.key.decode(): r.value for r in read_records(broker.bootstrap, dlq, len(cases))}
    env = {"KAFKA_BOOTSTRAP": broker.bootstrap, "VIDSEARCH_BROKER__DLQ_TOPIC": dlq}
    listed, as_json = run_vidsearch(["dlq"], env=env), run_vidsearch(["dlq", "--json"], env=env)
    assert listed.returncode == 0 and as_json.returncode == 0, (listed.stderr, as_json.stderr)
    return {"cases": {c.name: c for c in cases}, "records": records, "listed": listed, "json": as_json,
            "logs": "\n".join(text_lines.lines + json_lines.lines), "env": env, "dlq": dlq}


NAMES = [c.name for c in _cases("/videos")]


@pytest.mark.parametrize("name", NAMES)
def test_no_surface_shows_the_secret_and_the_reason_still_says_what_was_wrong(refused, name):
    case: Case = refused["cases"][name]
    raw = refused["records"][name]
    # The DLQ record: reason, kept value and key.
    assert case.secret.encode() not in raw, raw[:600]
    body = json.loads(raw)
    assert body["error_class"] == case.error_class, body
    assert case.says in body["reason"], body["reason"]
    if case.shown is not None:
        assert case.shown in body["reason"], body["reason"]
    assert body["value"]["redacted"] and "<redacted>" in body["value"]["data"], body["value"]
    assert body["value"]["size"] == len(case.value())  # the original's size and sha256 are kept whole
    # `vidsearch dlq`, as a line and as JSON.
    line = next(line for line in refused["listed"].stdout.splitlines() if f" {name} " in line)
    assert case.error_class in line and case.secret not in refused["listed"].stdout
    [shown] = [json.loads(x) for x in refused["json"].stdout.splitlines()
               if decode_dlq_bytes(json.loads(x)["key"]) == name.encode()]
    assert shown["reason"] == body["reason"] and case.secret not in refused["json"].stdout
    # The worker's log lines about it (both formats).
    logs = refused["logs"]
    assert case.secret not in logs, [x for x in logs.splitlines() if case.secret in x][:3]
    source = body["source"]
    sent = [x for x in logs.splitlines() if "sent to DLQ" in x and f"partition={source['partition']}" in x
            and f"offset={source['offset']} " in x]
    assert len(sent) == 1 and f"error_class={case.error_class}" in sent[0], sent  # the line was captured


def test_the_dlq_command_redacts_records_that_were_written_without_redaction(broker, refused):
    # A record as an older worker wrote it: the secret in its reason, value and key.
    secret = "pwolderworker9f8e7d"
    value = json.dumps({"op": "upsert", "video_id": "old", "uri": f"file://u:{secret}@localhost/a.mp4"}).encode()
    record = json.loads(dlq_record(b"{}", b"old", "videos.ingest", 0, 1, "unsupported_uri", "x"))
    record["reason"] = f"file uri must have no host (file:///path), got host 'u:{secret}@localhost'"
    record["value"].update({"data": value.decode(), "redacted": False})
    produce_to(broker.bootstrap, refused["dlq"], [(b"old", json.dumps(record).encode(), None)])
    for args in (["dlq", "--key", "old"], ["dlq", "--key", "old", "--json"]):
        done = run_vidsearch(args, env=refused["env"])
        assert done.returncode == 0 and "old" in done.stdout, done.stderr
        assert secret not in done.stdout + done.stderr, done.stdout
        assert "got host '<redacted>@localhost'" in done.stdout


def test_the_ingest_command_refuses_without_echoing_the_secret(broker, tmp_path):
    secret = "pwingestcli9f8e7d"
    missing = tmp_path / f"a.mp4?token={secret}"
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(json.dumps({"path": f"/nowhere/b.mp4?X-Amz-Signature={secret}"}) + "\n")
    for args in (["ingest", str(missing)], ["ingest", "--manifest", str(manifest)]):
        done = run_vidsearch(args, env={"KAFKA_BOOTSTRAP": broker.bootstrap, "VIDSEARCH_BROKER__INGEST_TOPIC":
                                        unique("ingest")})
        assert done.returncode == 1 and "no such file" in done.stderr, done.stderr
        assert secret not in done.stdout + done.stderr and "<redacted>" in done.stderr, done.stderr


def test_the_status_command_prints_none_of_the_credentials_in_its_endpoints(broker):
    secret = "pwstatus9f8e7d"
    store_url = f"http://admin:{secret}@127.0.0.1:{free_port()}/?api_key={secret}"
    env = {"KAFKA_BOOTSTRAP": broker.bootstrap, "QDRANT_URL": store_url, "VIDSEARCH_STORE__TIMEOUT_S": "2"}
    for args in (["status"], ["status", "--json"]):
        done = run_vidsearch(args, env=env)
        assert done.returncode == 1, (done.stdout, done.stderr)  # the store is down: not healthy
        assert secret not in done.stdout + done.stderr, done.stdout
        assert "store" in done.stdout and "broker" in done.stdout, done.stdout


def test_status_output_is_redacted_whatever_a_probe_reports():
    # What the probes put in the report with a healthy remote store and Ray (no Qdrant
    # server or remote Ray here to make them say it for real): the configured endpoints.
    from vidsearch.services.stack.status import Health, StackStatus
    from vidsearch.services.stack.status_cli import render

    secret = "pwrender9f8e7d"
    status = StackStatus(live_index="videos__v1", points=3, health={
        "store": Health(True, f"http://admin:{secret}@qdrant:6333/?api_key={secret}"),
        "ray": Health(True, f"ray://head:10001?token={secret}"),
        "broker": Health(False, f"KafkaError: SASL authentication failed, password={secret}")})
    for as_json in (False, True):
        out = render(status, as_json=as_json)
        assert secret not in out, out
        assert "http://<redacted>@qdrant:6333/?api_key=<redacted>" in out and "videos__v1" in out
