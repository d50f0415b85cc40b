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
from pathlib import Path
from types import FrameType
from typing import Any, Callable, Iterator

import yaml

from vidsearch.broker import EmbeddedBroker, ensure_topics
from vidsearch.config import Settings
from vidsearch.telemetry import log_event

log = logging.getLogger(__name__)

# Logical CPUs of a local Ray. Ingestion alone (one encoder actor + decode tasks)
# fills two, so on a small machine the Serve replicas would never be scheduled;
# Ray's CPU count only gates scheduling, and idle replicas cost nothing.
MIN_LOCAL_CPUS = 4
# Replica CPU shares on a local Ray: they mostly wait on requests.
LOCAL_REPLICA_OPTIONS: dict[str, Any] = {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}}
WORKER_STOP_TIMEOUT_S = 30


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
        ray.init(address=address, num_cpus=None if address else local_cpus(settings), include_dashboard=False,
                 namespace="vidsearch", configure_logging=False, log_to_driver=log_to_driver)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        raise StackError(f"cannot start or join {where}: {str(exc).strip().splitlines()[0]}") from None
    return address is None


def check_port_free(port: int, what: str) -> None:
    """Fail early with a clear message instead of a Serve proxy that never comes up."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            raise StackError(f"{what} port {port} is already in use (set serve.grpc_port, "
                             f"e.g. VIDSEARCH_SERVE__GRPC_PORT)") from None


@contextlib.contextmanager
def interrupted_by_sigterm() -> Iterator[None]:
    """Within it SIGTERM raises KeyboardInterrupt, so ``kill`` stops as cleanly as Ctrl-C."""

    def _raise(_signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
            check_port_free(self.settings.serve.grpc_port, "gRPC")
        self._start_broker()
        self._start_ray()
        self._start_store()
        self._install_shipped_model()
        if self._want_worker:
            self._start_worker()
        if self._want_serve:
            self._start_serve()
        return self

    def stop(self) -> None:
        if self.worker is not None and self.worker.poll() is None:
            log_event(log, "stopping ingest worker", pid=self.worker.pid)
            self.worker.send_signal(signal.SIGTERM)
            try:
                self.worker.wait(timeout=WORKER_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.worker.kill()
                self.worker.wait()
        self.worker = None
        if self._serve_started:
            from ray import serve

            if self._ray_started:
                serve.shutdown()
            else:
                # On a shared cluster only our two applications go; Serve itself stays.
                for name in (self.settings.serve.app_name, self.settings.serve.reranker_app_name):
                    serve.delete(name)
            self._serve_started = False
        if self._ray_started:
            import ray

            if self.settings.store.url is None:
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
            self.broker = EmbeddedBroker(partitions=broker.partitions, topics=topics).start()
            self.settings = self.settings.model_copy(
                update={"broker": broker.model_copy(update={"bootstrap": self.broker.bootstrap})})
            log_event(log, "embedded broker up", bootstrap=self.broker.bootstrap)
        else:
            ensure_topics(broker.bootstrap, topics, broker.partitions)

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
        log_event(log, "ingest worker started", pid=self.worker.pid)

    def _start_serve(self) -> None:
        from vidsearch.services.query.deploy import deploy

        options = LOCAL_REPLICA_OPTIONS if self._ray_started else {}
        deploy(self.settings, ingress_options=copy.deepcopy(options), reranker_options=copy.deepcopy(options))
        self._serve_started = True
        log_event(log, "gRPC search service up", port=self.settings.serve.grpc_port)

    # -- waiting -----------------------------------------------------------
    def check_alive(self) -> None:
        if self.worker is not None and self.worker.poll() is not None:
            hint = f" (see {self._worker_log})" if self._worker_log is not None else ""
            raise StackError(f"ingest worker exited with code {self.worker.returncode}{hint}")
        if self.broker is not None and not self.broker.running:
            tail = self.broker.output_tail().strip().splitlines()
            raise StackError("embedded broker exited" + (f": {tail[-1]}" if tail else ""))

    def wait_forever(self) -> None:
        """Until Ctrl-C / SIGTERM (returns) or a piece dies (StackError)."""
        run_in_foreground(self.check_alive)
