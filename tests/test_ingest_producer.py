"""`vidsearch ingest` (the producer CLI) as a real subprocess against the real broker:
the messages it publishes, and a one-line error with nothing published for each bad input."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from vidsearch.messages import DeleteOp, UpsertOp, parse_ingest_message

from ingest_support import ensure_topic, read_records, run_vidsearch, topic_is_empty, unique, uri, write_clip


# The files of these tests live under pytest's temp root: that is the decode allowlist
# (`vidsearch ingest` refuses files outside decode.allowed_prefixes before publishing).
ALLOWED: list[str] = []


@pytest.fixture(autouse=True, scope="module")
def _allow_temp_root(tmp_path_factory):
    ALLOWED[:] = [str(tmp_path_factory.getbasetemp())]


def _run(args: list[str], *, bootstrap: str | None, topic: str | None = None,
         cwd: Path | None = None, **settings: str) -> subprocess.CompletedProcess:
    env = {"KAFKA_BOOTSTRAP": bootstrap} if bootstrap else {}
    if topic:
        env["VIDSEARCH_BROKER__INGEST_TOPIC"] = topic
    env["VIDSEARCH_DECODE__ALLOWED_PREFIXES"] = json.dumps(ALLOWED)
    env.update({f"VIDSEARCH_{name.upper()}": value for name, value in settings.items()})
    return run_vidsearch(args, env=env, cwd=cwd)


def _published(bootstrap: str, topic: str, expected: int) -> list[tuple[str, object, int]]:
    """(key, parsed op, partition) of every message on ``topic``."""
    records = read_records(bootstrap, topic, expected)
    return [(r.key.decode(), parse_ingest_message(r.value, r.key), r.partition) for r in records]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("producer")
    (root / "dir").mkdir()
    (root / "other").mkdir()
    write_clip(root / "dir" / "a.mp4", seed=300)
    write_clip(root / "dir" / "b.mp4", seed=301)
    (root / "dir" / "notes.txt").write_text("not a video")
    write_clip(root / "other" / "a.mp4", seed=400)  # same stem as dir/a.mp4
    write_clip(root / "other" / "c d.mp4", seed=401)  # a space: the uri must percent-encode it
    return root


@pytest.fixture
def topic(broker) -> str:
    name = unique("cli")
    ensure_topic(broker.bootstrap, name)
    return name


def test_paths_publish_one_upsert_per_file_keyed_by_stem(broker, topic, files):
    done = _run(["ingest", str(files / "dir" / "a.mp4"), str(files / "other" / "c d.mp4"),
                 "--metadata-json", '{"source": "cli", "tags": ["x"]}'], bootstrap=broker.bootstrap, topic=topic)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"published 2 message(s) to {topic} on {broker.bootstrap}"
    got = sorted(_published(broker.bootstrap, topic, 2), key=lambda m: m[0])
    assert [(key, op) for key, op, _p in got] == [
        ("a", UpsertOp("a", uri(files / "dir" / "a.mp4"), {"source": "cli", "tags": ["x"]})),
        ("c d", UpsertOp("c d", uri(files / "other" / "c d.mp4"), {"source": "cli", "tags": ["x"]})),
    ]
    assert "c%20d.mp4" in got[1][1].uri


def test_a_directory_publishes_its_video_files(broker, topic, files):
    done = _run(["ingest", str(files / "dir")], bootstrap=broker.bootstrap, topic=topic)
    assert done.returncode == 0, done.stderr
    got = _published(broker.bootstrap, topic, 2)
    assert sorted((key, op.uri) for key, op, _p in got) == [
        ("a", uri(files / "dir" / "a.mp4")), ("b", uri(files / "dir" / "b.mp4"))]


def test_a_manifest_publishes_its_entries(broker, topic, files, tmp_path):
    manifest = tmp_path / "manifest.jsonl"
    lines = [
        {"video_id": "first", "path": str(files / "dir" / "a.mp4"), "metadata": {"title": "A", "source": "m"},
         "captions": ["ignored here"]},
        {"path": os.path.relpath(files / "dir" / "b.mp4", tmp_path)},  # relative to the manifest
    ]
    manifest.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    done = _run(["ingest", "--manifest", str(manifest), "--metadata-json", '{"source": "override"}'],
                bootstrap=broker.bootstrap, topic=topic, cwd=files)
    assert done.returncode == 0, done.stderr
    got = sorted(_published(broker.bootstrap, topic, 2), key=lambda m: m[0])
    assert [(key, op) for key, op, _p in got] == [
        ("b", UpsertOp("b", uri(files / "dir" / "b.mp4"), {"source": "override"})),
        ("first", UpsertOp("first", uri(files / "dir" / "a.mp4"), {"title": "A", "source": "override"})),
    ]


def test_delete_publishes_delete_messages_keyed_by_id(broker, topic):
    done = _run(["ingest", "--delete", "gone-1", "gone-2"], bootstrap=broker.bootstrap, topic=topic)
    assert done.returncode == 0, done.stderr
    got = _published(broker.bootstrap, topic, 2)
    assert sorted((key, op) for key, op, _p in got) == [("gone-1", DeleteOp("gone-1")), ("gone-2", DeleteOp("gone-2"))]


def _manifest(tmp_path: Path, *lines: str) -> str:
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


BAD_INPUTS = {
    # name: (argv builder (files, tmp_path) -> args, exit code, stderr fragment)
    "missing file": (lambda f, t: [str(f / "dir" / "a.mp4"), str(f / "dir" / "nope.mp4")], 1, "no such file"),
    "not a video dir": (lambda f, t: [str(t)], 1, "directory has no video files"),
    "duplicate ids": (lambda f, t: [str(f / "dir" / "a.mp4"), str(f / "other" / "a.mp4")], 1,
                      "video_id 'a' also used by"),
    "bad manifest json": (lambda f, t: ["--manifest", _manifest(
        t, json.dumps({"path": str(f / "dir" / "a.mp4")}), '{"path": ')], 1, "bad.jsonl:2: not valid JSON"),
    "manifest line not an object": (lambda f, t: ["--manifest", _manifest(t, "[1]")], 1, "must be a JSON object"),
    "manifest line without path": (lambda f, t: ["--manifest", _manifest(t, '{"video_id": "x"}')], 1,
                                   "bad.jsonl:1: missing 'path'"),
    "manifest file missing": (lambda f, t: ["--manifest", str(t / "nowhere.jsonl")], 1, "manifest not found"),
    "manifest duplicate ids": (lambda f, t: ["--manifest", _manifest(
        t, json.dumps({"video_id": "x", "path": str(f / "dir" / "a.mp4")}),
        json.dumps({"video_id": "x", "path": str(f / "dir" / "b.mp4")}))], 1, "video_id 'x' also used by"),
    "manifest missing file": (lambda f, t: ["--manifest", _manifest(
        t, json.dumps({"path": str(f / "dir" / "a.mp4")}), json.dumps({"path": str(t / "gone.mp4")}))], 1,
        "bad.jsonl:2: no such file"),
    "metadata not an object": (lambda f, t: [str(f / "dir" / "a.mp4"), "--metadata-json", "[1]"], 1,
                               "--metadata-json: must be a JSON object"),
    "path and delete": (lambda f, t: [str(f / "dir" / "a.mp4"), "--delete", "a"], 2, "give exactly one of"),
    "nothing to do": (lambda f, t: [], 2, "give exactly one of"),
    "delete with metadata": (lambda f, t: ["--delete", "a", "--metadata-json", "{}"], 2, "does not apply"),
    "bad id to delete": (lambda f, t: ["--delete", "a", " "], 1, "video_id is empty"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_exits_non_zero_with_one_line_and_publishes_nothing(case, broker, topic, files, tmp_path):
    build, code, fragment = BAD_INPUTS[case]
    done = _run(["ingest", *build(files, tmp_path)], bootstrap=broker.bootstrap, topic=topic)
    assert done.returncode == code, (done.stdout, done.stderr)
    assert done.stderr.startswith("vidsearch ingest: ") and "\n" not in done.stderr.strip(), done.stderr
    assert fragment in done.stderr, done.stderr
    assert done.stdout == ""
    assert topic_is_empty(broker.bootstrap, topic)


def test_no_broker_configured_is_a_one_line_error(tmp_path):
    done = _run(["ingest", "--delete", "a"], bootstrap=None, cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip() == "vidsearch ingest: no Kafka broker configured: set KAFKA_BOOTSTRAP " \
                                  "(or broker.bootstrap)"


def _deep(levels: int) -> str:
    return '{"a": ' * (levels - 1) + "{}" + "}" * (levels - 1)


# Refused before publishing: what the worker would otherwise send to the DLQ.
# name: (argv builder (files, tmp_path) -> args, settings env, stderr fragments)
REFUSED = {
    "outside the allowlist": (lambda f, t: [str(f / "dir" / "a.mp4"), str(f / "other" / "c d.mp4")],
                              lambda f: {"decode__allowed_prefixes": json.dumps([str(f / "dir")])},
                              ["other/c d.mp4: ", "resolves outside the allowed prefixes",
                               "(decode.allowed_prefixes)", "nothing was published"]),
    "scheme not allowed": (lambda f, t: [str(f / "dir" / "a.mp4")],
                           lambda f: {"decode__allowed_schemes": '["https"]'},
                           ["a.mp4: ", "(decode.allowed_schemes)"]),
    "over max_bytes": (lambda f, t: [str(f / "dir")], lambda f: {"decode__max_bytes": "100"},
                       ["dir/a.mp4: ", "over the limit max_bytes=100", "(decode.max_bytes)"]),
    "over max_pixels": (lambda f, t: [str(f / "dir" / "b.mp4")], lambda f: {"decode__max_pixels": "100"},
                        ["b.mp4: ", "(decode.max_pixels)"]),
    "over max_duration_s": (lambda f, t: [str(f / "dir" / "b.mp4")], lambda f: {"decode__max_duration_s": "0.1"},
                            ["b.mp4: ", "(decode.max_duration_s)"]),
    "not a video": (lambda f, t: [str(f / "other" / "fake.mp4")], lambda f: {}, ["fake.mp4: ", "undecodable"]),
    "metadata too deep": (lambda f, t: [str(f / "dir" / "a.mp4"), "--metadata-json", _deep(9)], lambda f: {},
                          ["video 'a': ", "over the limit messages.max_metadata_depth=8"]),
    "metadata integer past 2^53": (lambda f, t: [str(f / "dir" / "a.mp4"), "--metadata-json", '{"n": 9007199254740993}'],
                                   lambda f: {}, ["messages.max_integer=9007199254740991"]),
    "metadata over its byte limit": (lambda f, t: [str(f / "dir" / "a.mp4"), "--metadata-json",
                                                   json.dumps({"d": "x" * 900})],
                                     lambda f: {"messages__max_metadata_bytes": "512"},
                                     ["messages.max_metadata_bytes=512"]),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_what_the_worker_would_refuse_is_refused_before_publishing(case, broker, topic, files, tmp_path):
    build, env, fragments = REFUSED[case]
    (files / "other" / "fake.mp4").write_bytes(b"not a video" * 10)
    done = _run(["ingest", "--no-progress", *build(files, tmp_path)], bootstrap=broker.bootstrap, topic=topic,
                **env(files))
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert done.stderr.startswith("vidsearch ingest: ") and "\n" not in done.stderr.strip(), done.stderr
    for fragment in fragments:
        assert fragment in done.stderr, done.stderr
    assert done.stdout == ""
    assert topic_is_empty(broker.bootstrap, topic)


def test_no_check_skips_the_local_file_checks_but_not_the_message_limits(broker, topic, files):
    outside = {"decode__allowed_prefixes": json.dumps([str(files / "dir")])}
    done = _run(["ingest", "--no-check", str(files / "other" / "c d.mp4")], bootstrap=broker.bootstrap,
                topic=topic, **outside)
    assert done.returncode == 0, done.stderr
    refused = _run(["ingest", "--no-check", str(files / "dir" / "a.mp4"), "--metadata-json", _deep(20)],
                   bootstrap=broker.bootstrap, topic=topic)
    assert refused.returncode == 1 and "max_metadata_depth" in refused.stderr, refused.stderr
    assert len(read_records(broker.bootstrap, topic, 1)) == 1
