"""Run broker, store, Ray, the ingest worker and the Serve apps on one machine.

The same code paths as production; only the endpoints differ. Each piece is
embedded only when its endpoint is unset (KAFKA_BOOTSTRAP, QDRANT_URL,
RAY_ADDRESS), so `vidsearch up` also works as "just the services" against
external infrastructure.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import Any, Callable, Iterator

import yaml

from vidsearch.broker import BrokerError, EmbeddedBroker, client_security, ensure_topics
from vidsearch.config import Settings
from vidsearch.stack_state import StackState, env_for, remove_state, state_path, write_state
from vidsearch.telemetry import log_event

from . import bind

log = logging.getLogger(__name__)

# Logical CPUs of a local Ray. Ingestion alone (one encoder actor + decode tasks)
# fills two, so on a small machine the Serve replicas would never be scheduled;
# Ray's CPU count only gates scheduling, and idle replicas cost nothing.
MIN_LOCAL_CPUS = 4
# After a SIGTERM, how long stop waits to see whether Ray's processes got it too (they
# exit within milliseconds; a SIGTERM to the stack alone pays this wait once).
RAY_LOSS_GRACE_S = 3.0
_sigterm_seen = False  # set by interrupted_by_sigterm's handler
# Replica CPU shares on a local Ray: they mostly wait on requests.
LOCAL_REPLICA_OPTIONS: dict[str, Any] = {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}}
WORKER_STOP_TIMEOUT_S = 30
# A worker that ran this long before dying starts again with the initial backoff.
WORKER_HEALTHY_AFTER_S = 60.0


class StackError(RuntimeError):
    """A piece of the local stack failed to start; the message says which."""


def local_cpus(settings: Settings) -> int:
    return settings.ray.num_cpus or max(os.cpu_count() or 1, MIN_LOCAL_CPUS)


def init_ray(settings: Settings, *, log_to_driver: bool = True) -> bool:
    """Join ``ray.address`` or start a local Ray; True when this call started one."""
    import ray

    if ray.is_initialized():
        return False
    address = settings.ray.address
    try:
        if address:
            ray.init(address=address, include_dashboard=False, namespace="vidsearch", configure_logging=False,
                     log_to_driver=log_to_driver)
        else:
            # A local Ray binds ray.node_ip (loopback by default), and the Serve proxy
            # serve.grpc_host: see bind.py for why this takes a setup hook.
            if bind.is_loopback(settings.ray.node_ip):
                bind.keep_ray_on_loopback()
            ray.init(num_cpus=local_cpus(settings), include_dashboard=False, namespace="vidsearch",
                     configure_logging=False, log_to_driver=log_to_driver, _node_ip_address=settings.ray.node_ip,
                     runtime_env=bind.runtime_env(settings.serve.grpc_host, settings.ray.node_ip))
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise StackError(f"cannot start or join {where}: {str(exc).strip().splitlines()[0]}") from None
    return address is None


def check_port_free(port: int, what: str, setting: str = "serve.grpc_port") -> None:
    """Fail early with a clear message instead of a Serve proxy that never comes up."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            env = "VIDSEARCH_" + setting.replace(".", "__", 1).upper()
            raise StackError(f"{what} port {port} is already in use (set {setting}, e.g. {env})") from None


def check_serve_ports_free(settings: Settings) -> None:
    """The ports a local Serve will bind: gRPC, and HTTP when the search page is on."""
    check_port_free(settings.serve.grpc_port, "gRPC")
    if settings.serve.web_enabled:
        check_port_free(settings.serve.http_port, "HTTP (search page)", "serve.http_port")


@contextlib.contextmanager
def interrupted_by_sigterm() -> Iterator[None]:
    """Within it SIGTERM raises KeyboardInterrupt, so ``kill`` stops as cleanly as Ctrl-C."""

    def _raise(_signum: int, _frame: FrameType | None) -> None:
        global _sigterm_seen
        _sigterm_seen = True
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def local_ray_stopped_from_outside(grace_s: float = 0.0) -> bool:
    """True when a process of the Ray this process started has died without ``ray.shutdown``,
    waiting up to ``grace_s`` for one to go.

    ``timeout``, systemd and ``kill -- -PGID`` signal the whole process group, so Ray's own
    processes (which block only SIGINT) get the same SIGTERM as the stack; the stack's
    handler can run before they have exited, hence the grace period.
    """
    try:
        import ray

        node = ray._private.worker._global_node  # no public API says whether the local node lives
        if node is None:
            return False
        deadline = time.monotonic() + grace_s
        while not node.dead_processes():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True
    except Exception:  # noqa: BLE001 - when unsure, shut down the normal way
        return False


def run_in_foreground(check: Callable[[], None], interval_s: float = 1.0) -> None:
    """Call ``check`` every ``interval_s`` until Ctrl-C or SIGTERM (returns) or ``check`` raises."""
    with interrupted_by_sigterm():
        try:
            while True:
                check()
                time.sleep(interval_s)
        except KeyboardInterrupt:
            return


class LocalStack:
    """Context manager owning every process the local stack starts, stopped in reverse order.

    ``worker_log``: a file for the ingest worker's output (the demo keeps its terminal
    readable); None lets it share this process's stdout/stderr.
    """

    def __init__(self, settings: Settings, *, worker: bool = True, serve: bool = True,
                 worker_log: Path | None = None, log_to_driver: bool = True) -> None:
        self.settings = settings
        self._want_worker = worker
        self._want_serve = serve
        self._worker_log = worker_log
        self._log_to_driver = log_to_driver
        self.broker: EmbeddedBroker | None = None
        self.worker: subprocess.Popen | None = None
        self._config_file: Path | None = None
        self._ray_started = False
        self._serve_started = False
        self._state_file: Path | None = None
        self._worker_started_at = 0.0
        self._worker_backoff_s = settings.stack.worker_restart_initial_s
        self._worker_restart_at: float | None = None
        self.worker_restarts = 0

    # -- lifecycle ---------------------------------------------------------
    def __enter__(self) -> "LocalStack":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> "LocalStack":
        if self._want_serve and self.settings.ray.address is None:
            check_serve_ports_free(self.settings)
        self._start_broker()
        self._start_ray()
        self._start_store()
        self._install_shipped_model()
        if self._want_worker:
            self._start_worker()
        if self._want_serve:
            self._start_serve()
        self._write_state()
        return self

    def endpoints(self) -> dict[str, str]:
        s = self.settings
        found = {"broker": s.broker.bootstrap or "", "ray": s.ray.address or "",
                 "grpc": f"{s.serve.grpc_host if self._ray_started else '127.0.0.1'}:{s.serve.grpc_port}",
                 "store": s.store.url or str(Path(s.store.path).expanduser().resolve())}
        if self._want_worker and s.ingest.metrics_port:
            found["metrics"] = f"{s.ingest.metrics_host}:{s.ingest.metrics_port}"
        if self.broker is not None:
            found["broker_storage"] = self.broker.describe_storage()
        return found

    def env(self) -> dict[str, str]:
        """What a second process sets to use this stack (the state file's ``env``)."""
        return env_for(self.settings, os.environ.get("RAY_AUTH_MODE"))

    def _write_state(self) -> None:
        path = state_path(self.settings)
        state = StackState(pid=os.getpid(), started_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                           endpoints=self.endpoints(), env=self.env())
        try:
            write_state(path, state)
        except OSError as exc:
            log_event(log, "cannot write the stack state file", logging.WARNING, path=str(path), error=str(exc))
            return
        self._state_file = path
        log_event(log, "stack state written", path=str(path))

    def stop(self) -> None:
        if self._state_file is not None:
            remove_state(self._state_file, os.getpid())
            self._state_file = None
        self._worker_restart_at = None
        if self.worker is not None and self.worker.poll() is None:
            log_event(log, "stopping ingest worker", pid=self.worker.pid)
            self.worker.send_signal(signal.SIGTERM)
            try:
                self.worker.wait(timeout=WORKER_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.worker.kill()
                self.worker.wait()
        self.worker = None
        # Only after a SIGTERM can Ray's processes be on their way out (Ctrl-C's SIGINT they ignore).
        ray_lost = self._ray_started and local_ray_stopped_from_outside(RAY_LOSS_GRACE_S if _sigterm_seen else 0.0)
        if ray_lost:
            # Serve's controller and the store's actor went with it: asking them to shut
            # down would wait out Serve's 30 s timeout, then Ray's 60 s GCS reconnect.
            log_event(log, "the local Ray was stopped from outside (a signal to the whole process group?); "
                           "skipping the Serve and store shutdown", logging.WARNING)
            self._serve_started = False
        if self._serve_started:
            from ray import serve

            if self._ray_started:
                serve.shutdown()
            else:
                from vidsearch.services.query.deploy import app_names

                # On a shared cluster only our applications go; Serve itself stays.
                for name in app_names(self.settings):
                    serve.delete(name)
            self._serve_started = False
        if self._ray_started:
            import ray

            if self.settings.store.url is None and not ray_lost:
                from vidsearch.store import shutdown_embedded_store

                shutdown_embedded_store(self.settings)
            ray.shutdown()
            self._ray_started = False
        if self.broker is not None:
            self.broker.stop()
            self.broker = None
        if self._config_file is not None:
            self._config_file.unlink(missing_ok=True)
            self._config_file = None

    # -- pieces ------------------------------------------------------------
    def _start_broker(self) -> None:
        broker = self.settings.broker
        topics = (broker.ingest_topic, broker.dlq_topic)
        if broker.bootstrap is None:
            # Durable by default: Tansu's s3 engine on a local object server under data_dir
            # (vidsearch.objstore), so what was not ingested yet survives a restart.
            data_dir = broker.data_dir if broker.storage == "durable" else None
            self.broker = EmbeddedBroker(partitions=broker.partitions, topics=topics, host=broker.embedded_host,
                                         data_dir=data_dir, storage_port=broker.storage_port)
            try:
                self.broker.start()
            except BrokerError as exc:
                lines = str(exc).strip().splitlines() or ["the embedded broker did not start"]
                raise StackError(lines[0] + (f" ... {lines[-1].strip()}" if len(lines) > 1 else "")) from None
            self.settings = self.settings.model_copy(
                update={"broker": broker.model_copy(update={"bootstrap": self.broker.bootstrap})})
            log_event(log, "embedded broker up", bootstrap=self.broker.bootstrap,
                      storage=self.broker.describe_storage())
        else:
            ensure_topics(broker.bootstrap, topics, broker.partitions, security=client_security(broker),
                          create=broker.create_topics)

    def _start_ray(self) -> None:
        import ray

        self._ray_started = init_ray(self.settings, log_to_driver=self._log_to_driver)
        gcs = ray.get_runtime_context().gcs_address
        self.settings = self.settings.model_copy(
            update={"ray": self.settings.ray.model_copy(update={"address": gcs})})
        log_event(log, "ray up", address=gcs)

    def _start_store(self) -> None:
        from vidsearch.store import open_store

        store = open_store(self.settings)
        if not store.healthy():
            raise StackError("vector store is not healthy: check store.url / store.path "
                             "(an embedded store is locked while another process uses it)")
        log_event(log, "vector store up", mode="server" if self.settings.store.url else "embedded",
                  location=self.settings.store.url or str(Path(self.settings.store.path).resolve()))

    def _install_shipped_model(self) -> None:
        from vidsearch.models.shipped import install_shipped_model
        from vidsearch.registry import RegistryError

        try:
            version = install_shipped_model(self.settings)
        except RegistryError as exc:
            raise StackError(str(exc)) from None
        log_event(log, "serving model", production=version or "none (deterministic base model)")

    def child_env(self) -> dict[str, str]:
        """Environment for child processes: every endpoint this stack resolved."""
        if self._config_file is not None:  # a restarted worker gets a fresh file
            self._config_file.unlink(missing_ok=True)
        fd, name = tempfile.mkstemp(prefix="vidsearch-", suffix=".yaml")
        self._config_file = Path(name)
        # Secrets stay out of the file: children inherit them from this environment.
        tree = self.settings.dump()
        for section in tree.values():
            if isinstance(section, dict):
                section.pop("api_key", None)
        with os.fdopen(fd, "w") as handle:
            yaml.safe_dump(tree, handle)
        env = dict(os.environ)
        env.update({"VIDSEARCH_CONFIG": name, "KAFKA_BOOTSTRAP": self.settings.broker.bootstrap or "",
                    "RAY_ADDRESS": self.settings.ray.address or ""})
        return env

    def _start_worker(self) -> None:
        output: Any = None
        if self._worker_log is not None:
            output = open(self._worker_log, "ab")  # noqa: SIM115 - the child owns it from here
        try:
            self.worker = subprocess.Popen([sys.executable, "-m", "vidsearch.cli", "ingest-worker"],
                                           env=self.child_env(), stdout=output, stderr=output,
                                           stdin=subprocess.DEVNULL)
        finally:
            if output is not None:
                output.close()
        self._worker_started_at = time.monotonic()
        log_event(log, "ingest worker started", pid=self.worker.pid)

    def _start_serve(self) -> None:
        from vidsearch.services.query.deploy import deploy

        options = LOCAL_REPLICA_OPTIONS if self._ray_started else {}
        deploy(self.settings, ingress_options=copy.deepcopy(options), reranker_options=copy.deepcopy(options),
               web_options=copy.deepcopy(options))
        self._serve_started = True
        log_event(log, "gRPC search service up", port=self.settings.serve.grpc_port)
        if self.settings.serve.web_enabled:
            log_event(log, "search page up", url=self.page_url)

    @property
    def page_url(self) -> str | None:
        """The search page, when this stack serves it (the HTTP proxy is on loopback)."""
        if not (self._want_serve and self.settings.serve.web_enabled):
            return None
        return f"http://127.0.0.1:{self.settings.serve.http_port}/"

    # -- waiting -----------------------------------------------------------
    def check_alive(self) -> None:
        """Raise StackError when a piece is gone for good; restart a dead ingest worker
        with capped exponential backoff (stack.worker_restart_*) instead of stopping:
        ingestion resumes without a restart of the whole stack (and, with memory storage,
        without losing what the broker holds)."""
        if self.worker is not None and self.worker.poll() is not None:
            self._schedule_worker_restart()
        if self._worker_restart_at is not None and time.monotonic() >= self._worker_restart_at:
            self._worker_restart_at = None
            self.worker_restarts += 1
            self._start_worker()
        if self.broker is not None and not self.broker.running:
            raise StackError(self.broker.failure())

    def _schedule_worker_restart(self) -> None:
        code = self.worker.returncode
        ran_s = time.monotonic() - self._worker_started_at
        self.worker = None
        if ran_s >= WORKER_HEALTHY_AFTER_S:
            self._worker_backoff_s = self.settings.stack.worker_restart_initial_s
        delay = self._worker_backoff_s
        self._worker_backoff_s = min(delay * 2, self.settings.stack.worker_restart_max_s)
        self._worker_restart_at = time.monotonic() + delay
        log_event(log, "ingest worker exited; restarting", logging.WARNING, code=code,
                  restart_in_s=round(delay, 2), restarts=self.worker_restarts,
                  log=str(self._worker_log) if self._worker_log is not None else None)

    def wait_forever(self) -> None:
        """Until Ctrl-C / SIGTERM (returns) or a piece dies (StackError)."""
        run_in_foreground(self.check_alive)
