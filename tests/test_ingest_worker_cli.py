"""`vidsearch ingest-worker` start-up errors: one line on stderr, exit code 1, and
nothing started (these fail before Ray, the encoder actors or the store are touched)."""
from __future__ import annotations

import socket

from ingest_support import run_vidsearch


def test_no_broker_configured_is_a_one_line_error(tmp_path):
    done = run_vidsearch(["ingest-worker"], cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip() == ("vidsearch ingest-worker: no Kafka broker configured: "
                                   "set KAFKA_BOOTSTRAP (or broker.bootstrap)")
    assert list(tmp_path.iterdir()) == []  # no store directory, nothing written


def test_a_taken_metrics_port_is_a_one_line_error(broker, tmp_path):
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_vidsearch(["ingest-worker"], cwd=tmp_path,
                             env={"KAFKA_BOOTSTRAP": broker.bootstrap, "VIDSEARCH_INGEST__METRICS_PORT": str(port)})
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines == [f"vidsearch ingest-worker: cannot serve metrics on port {port}: Address already in use"], \
        done.stderr
    assert list(tmp_path.iterdir()) == []
