"""A real ``vidsearch up`` driven from a benchmark (imported as ``stack_run`` from
``benchmarks/*.py``): the process and the pieces it starts, found by process title
below it, and the broker and worker as a client sees them.

Nothing here joins the stack's Ray: a benchmark that SIGKILLs the stack must not lose
its own process with it. The store is read through the gRPC API (``GetVideo``) and
``vidsearch status --json``; the broker through kafka-python; the worker through its
Prometheus endpoint.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import common

VENV_BIN = Path(sys.executable).parent
# Process titles Ray gives the actors that matter here (``ray::<actor class>``).
STORE_ACTOR_TITLE = "ray::_StoreActor"
RERANKER_TITLE_PREFIX = "ray::ServeReplica:"
WORKER_ARGS = "vidsearch.cli ingest-worker"
APP_NAME = "vidsearch"


class StackFailed(RuntimeError):
    """The stack did not come up or died; the message carries the tail of its log."""


@dataclass
class StackPorts:
    grpc: int
    http: int
    metrics: int

    @classmethod
    def fresh(cls) -> "StackPorts":
        return cls(common.free_port(), common.free_port(), common.free_port())


def stack_env(root: Path, videos_dir: Path, ports: StackPorts, *, preset: str = "tiny",
              extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of one ``vidsearch up``: every path under ``root`` (store, registry,
    broker data, state file), loopback ports of its own, the untrained ``preset``; every
    other setting (worker restart backoff, breaker, timeouts) is the product's default."""
    env = dict(os.environ)  # common.isolate_environment() already dropped endpoints and overrides
    env.update({
        "VIDSEARCH_STACK__STATE_FILE": str(root / "stack.json"),
        "VIDSEARCH_STORE__PATH": str(root / "store"),
        "VIDSEARCH_MODEL__REGISTRY_ROOT": str(root / "registry"),
        "VIDSEARCH_BROKER__DATA_DIR": str(root / "broker"),
        "VIDSEARCH_MODEL__PRESET": preset, "VIDSEARCH_MODEL__USE_SHIPPED": "false",
        "VIDSEARCH_MODEL__DEVICE": "cpu",
        "VIDSEARCH_SERVE__GRPC_PORT": str(ports.grpc), "VIDSEARCH_SERVE__HTTP_PORT": str(ports.http),
        "VIDSEARCH_SERVE__WEB_ENABLED": "false", "VIDSEARCH_RAY__NUM_CPUS": "4",
        "VIDSEARCH_INGEST__METRICS_PORT": str(ports.metrics),
        "VIDSEARCH_DECODE__ALLOWED_PREFIXES": json.dumps([str(videos_dir.resolve())]),
        "VIDSEARCH_LOG_FORMAT": "json",
    })
    env.update(extra or {})
    return env


class StackProcess:
    """One ``vidsearch up [--no-worker]`` in its own session, its output in ``<root>/<name>.log``."""

    def __init__(self, root: Path, videos_dir: Path, *, worker: bool = True, name: str = "up",
                 preset: str = "tiny", extra_env: dict[str, str] | None = None) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.ports = StackPorts.fresh()
        self.env = stack_env(root, videos_dir, self.ports, preset=preset, extra=extra_env)
        self.log_path = root / f"{name}.log"
        self.worker = worker
        self._log = self.log_path.open("ab")
        args = [] if worker else ["--no-worker"]
        self.started = time.monotonic()
        self.proc = subprocess.Popen([str(VENV_BIN / "vidsearch"), "up", *args], env=self.env,
                                     stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=root, start_new_session=True)
        self.state: dict[str, Any] | None = None

    # -- state ---------------------------------------------------------------
    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.ports.grpc}"

    @property
    def bootstrap(self) -> str:
        assert self.state is not None, "the stack is not up"
        return self.state["env"]["KAFKA_BOOTSTRAP"]

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise StackFailed(f"vidsearch up exited with code {self.proc.returncode}:\n{self.log_tail()}")

    def wait_up(self, timeout_s: float = 600.0) -> float:
        """Until the state file is written (broker, Ray, store, worker and Serve started);
        seconds since the process was started."""
        state_file = Path(self.env["VIDSEARCH_STACK__STATE_FILE"])
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                state = json.loads(state_file.read_text())
                if int(state.get("pid", -1)) == self.pid:
                    self.state = state
                    return time.monotonic() - self.started
            except (OSError, ValueError):
                pass
            time.sleep(0.5)
        raise StackFailed(f"vidsearch up not up within {timeout_s:g}s:\n{self.log_tail()}")

    def wait_broker(self, timeout_s: float = 300.0) -> str:
        """The embedded broker's bootstrap address, as soon as ``vidsearch up`` logs it (before
        Ray, the worker and Serve are up), so its offsets can be followed from the start."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.check_alive()
            for line in self.log_path.read_text(errors="replace").splitlines():
                if line.startswith("{") and '"embedded broker up"' in line:
                    try:
                        return str(json.loads(line)["bootstrap"])
                    except (ValueError, KeyError):
                        pass
            time.sleep(0.25)
        raise StackFailed(f"no embedded broker within {timeout_s:g}s:\n{self.log_tail()}")

    def log_time(self, *needles: str, after: float) -> float | None:
        """The time (epoch seconds) of the first line of the log holding every one of
        ``needles`` and stamped at or after ``after``; Ray and Serve stamp their lines
        ``YYYY-MM-DD HH:MM:SS,mmm`` in local time."""
        import datetime as dt
        import re

        stamp = re.compile(r"(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}),(\d{3})")
        for line in self.log_path.read_text(errors="replace").splitlines():
            if not all(n in line for n in needles):
                continue
            found = stamp.search(line)
            if found is None:
                continue
            when = dt.datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S").timestamp() + int(found.group(2)) / 1000
            if when >= after - 0.001:
                return when
        return None

    def client_env(self) -> dict[str, str]:
        """What a command joining this stack needs (its settings plus the state file's env)."""
        assert self.state is not None, "the stack is not up"
        return {**self.env, **self.state["env"]}

    def run_cli(self, *args: str, timeout_s: float = 600.0) -> subprocess.CompletedProcess:
        return subprocess.run([str(VENV_BIN / "vidsearch"), *args], env=self.client_env(), cwd=self.root,
                              capture_output=True, text=True, timeout=timeout_s)

    def status(self, timeout_s: float = 180.0) -> dict[str, Any]:
        """``vidsearch status --json`` (it exits 1 while a piece is down: the JSON still comes)."""
        done = self.run_cli("status", "--json", timeout_s=timeout_s)
        try:
            return json.loads(done.stdout)
        except ValueError:
            return {"error": (done.stderr or done.stdout)[-500:]}

    # -- pieces --------------------------------------------------------------
    def tree(self) -> set[int]:
        return common.descendants(self.pid)

    def pids_titled(self, prefix: str) -> list[int]:
        return common.pids_with_title(prefix, under=self.pid)

    def store_actor_pids(self) -> list[int]:
        return self.pids_titled(STORE_ACTOR_TITLE)

    def reranker_pids(self, reranker_app: str = "vidsearch-reranker") -> list[int]:
        return self.pids_titled(f"{RERANKER_TITLE_PREFIX}{reranker_app}:")

    def worker_pids(self) -> list[int]:
        found = []
        for pid in self.tree():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
            except OSError:
                continue
            if WORKER_ARGS in cmdline and proc_alive(pid):
                found.append(pid)
        return sorted(found)

    def worker_metrics(self) -> dict[str, float]:
        return common.scrape_metrics(self.ports.metrics)

    # -- stopping ------------------------------------------------------------
    def stop(self, timeout_s: float = 120.0) -> tuple[int | None, float]:
        """SIGTERM to ``vidsearch up`` alone (``kill PID``): it drains the worker and stops
        Serve, the store, Ray and the broker in order. (exit code, seconds)."""
        started = time.monotonic()
        tree = self.tree()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self.proc.wait()
        self._reap(tree)
        self._log.close()
        return self.proc.returncode, time.monotonic() - started

    def kill(self) -> list[int]:
        """SIGKILL to the stack's whole process group (``vidsearch up``, Ray, the worker, Tansu), as
        a crash would leave it; the broker's object server, in its own session, follows by its
        parent-death signal.
        Returns the processes of the stack still alive 10 s later (then killed here too)."""
        tree = self.tree()
        os.killpg(self.pid, signal.SIGKILL)
        self.proc.wait()
        left = self._reap(tree, grace_s=10.0)
        self._log.close()
        return left

    @staticmethod
    def _reap(pids: Iterable[int], grace_s: float = 30.0) -> list[int]:
        """Wait for the stack's processes to go; SIGKILL the ones that outlive ``grace_s``."""
        deadline = time.monotonic() + grace_s
        left = [p for p in pids if proc_alive(p)]
        while left and time.monotonic() < deadline:
            time.sleep(0.2)
            left = [p for p in left if proc_alive(p)]
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return left


def proc_alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    state = common.proc_state(pid)
    return state is not None and state != "Z"


# ============================================================================ broker
class BrokerView:
    """The ingest topic, its consumer group's offsets and the DLQ, as a plain Kafka client
    sees them (no group membership: nothing here moves the worker's partitions).

    End offsets are counted from the records themselves, not taken from the broker's high
    watermark: the embedded broker (Tansu 0.6.0) answers ListOffsets with the last record
    batch's base offset + 1, so a batch of several records reads as one (vidsearch.kafka_offsets).
    :meth:`refresh` re-reads them after each publish.
    """

    def __init__(self, bootstrap: str, topic: str = "videos.ingest", dlq_topic: str = "videos.ingest.dlq",
                 group: str = "vidsearch-ingest", partitions: int = 4) -> None:
        from kafka import KafkaConsumer

        self.bootstrap, self.topic, self.dlq_topic, self.partitions = bootstrap, topic, dlq_topic, partitions
        self.group = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
        self.plain = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        self._ends: dict[int, int] | None = None

    def committed(self) -> dict[int, int]:
        return common.committed_offsets(self.group, self.topic, self.partitions)

    def watermarks(self, topic: str | None = None) -> dict[int, int]:
        """The broker's own high watermarks (what ``vidsearch status`` computes lag from)."""
        from kafka import TopicPartition

        parts = [TopicPartition(topic or self.topic, p) for p in range(self.partitions)]
        return {tp.partition: int(v) for tp, v in self.plain.end_offsets(parts).items()}

    def refresh(self) -> dict[int, int]:
        """Re-count the ingest topic's end offsets (last offset + 1 per partition)."""
        ends = {p: 0 for p in range(self.partitions)}
        for part, offset, _key in self.records():
            ends[part] = max(ends[part], offset + 1)
        self._ends = ends
        return dict(ends)

    def end_offsets(self) -> dict[int, int]:
        return dict(self._ends) if self._ends is not None else self.refresh()

    def lag(self) -> int:
        committed, ends = self.committed(), self.end_offsets()
        return sum(max(ends[p] - committed.get(p, 0), 0) for p in ends)

    def dlq_records(self) -> int:
        return len(self.records(self.dlq_topic))

    def records(self, topic: str | None = None, idle_s: float = 2.0,
                timeout_s: float = 60.0) -> list[tuple[int, int, str]]:
        """Every record of the topic as (partition, offset, key): read from the beginning
        until ``idle_s`` passes without a new record (or past each watermark)."""
        from kafka import KafkaConsumer, TopicPartition

        reader = KafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False)
        parts = [TopicPartition(topic or self.topic, p) for p in range(self.partitions)]
        reader.assign(parts)
        reader.seek_to_beginning(*parts)
        found: list[tuple[int, int, str]] = []
        deadline = time.monotonic() + timeout_s
        quiet_since = time.monotonic()
        try:
            while time.monotonic() < deadline and time.monotonic() - quiet_since < idle_s:
                batch = reader.poll(timeout_ms=250)
                for tp, records in batch.items():
                    found += [(tp.partition, r.offset, (r.key or b"").decode("utf-8", "replace")) for r in records]
                if batch:
                    quiet_since = time.monotonic()
        finally:
            reader.close()
        return found

    def acknowledged_ids(self) -> set[str]:
        """Keys of every record below its partition's committed offset: what the worker
        acknowledged as stored."""
        committed = self.committed()
        return {key for part, offset, key in self.records() if offset < committed.get(part, 0)}

    def publish_raw(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        """Produce (key, value) pairs with acks=all (a bad message for the DLQ, say)."""
        from kafka import KafkaProducer

        producer = KafkaProducer(bootstrap_servers=self.bootstrap, acks="all")
        try:
            for key, value in items:
                producer.send(self.topic, key=key, value=value)
            producer.flush(30)
        finally:
            producer.close(5)
        self.refresh()

    def close(self) -> None:
        for consumer in (self.group, self.plain):
            consumer.close(autocommit=False)


def wait_until(predicate: Callable[[], Any], what: str, timeout_s: float, interval_s: float = 0.5,
               check: Callable[[], None] | None = None) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned); TimeoutError names ``what``."""
    deadline = time.monotonic() + timeout_s
    while True:
        if check is not None:
            check()
        found = predicate()
        if found:
            return found
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:g}s waiting for {what}")
        time.sleep(interval_s)
