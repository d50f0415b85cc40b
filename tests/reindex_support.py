"""Helpers for tests/test_reindex.py: model versions to re-index to, a worker running in
a thread, concurrent gRPC searches, and the CLI run in-process."""
from __future__ import annotations

import contextlib
import io
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import grpc
import numpy as np

from vidsearch.config import Settings

PRESET = "tiny-seqtransf"  # a head with weights, so a new head changes the video vectors
TUNED_ENCODER = "open_clip:tiny:tuned-visual:1"


def registry_of(settings: Settings) -> Any:
    from vidsearch.registry import ModelRegistry

    return ModelRegistry(settings.model.registry_root)


def publish_first(settings: Settings) -> str:
    """The tiny seqTransf model (seeded) as the first published version, production."""
    from vidsearch.models import build_model, load_model_config
    from vidsearch.models.persist import PRODUCTION_ALIAS, save_model_version

    model = build_model(load_model_config(PRESET), device="cpu", seed=0)
    registry = registry_of(settings)
    version = save_model_version(registry, settings.model.model_name, model,
                                 training={"note": "reindex tests: first version"},
                                 metrics={"val": {"student": {"R@1": 0.25}}})
    registry.set_alias(settings.model.model_name, PRODUCTION_ALIAS, version)
    return version


def _perturb(parameters: Iterator[Any], seed: int, scale: float) -> None:
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in parameters:
            spread = float(parameter.std()) if parameter.numel() > 1 else 0.0
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale * (spread or 0.05))


def publish_new_head(settings: Settings, parent: str, seed: int) -> str:
    """``parent`` with new (seeded) head and text-projection weights: same frame encoder."""
    from vidsearch.models.persist import load_model_version, save_model_version

    registry = registry_of(settings)
    model, _ = load_model_version(registry, settings.model.model_name, parent, device="cpu")
    _perturb(model.head.parameters(), seed, 1.0)
    _perturb(iter([model.clip.text_projection]), seed + 1, 1.0)
    return save_model_version(registry, settings.model.model_name, model, parent=parent,
                              training={"note": f"reindex tests: new head (seed {seed})"},
                              metrics={"val.student.R@1": 0.5})


def publish_new_frame_encoder(settings: Settings, parent: str, seed: int) -> str:
    """``parent`` with a changed visual tower, published under a new frame-encoder id."""
    from vidsearch.models.persist import load_model_version, save_model_version

    registry = registry_of(settings)
    model, _ = load_model_version(registry, settings.model.model_name, parent, device="cpu")
    _perturb(model.clip.visual.parameters(), seed, 0.5)
    return save_model_version(registry, settings.model.model_name, model, parent=parent,
                              frame_encoder=TUNED_ENCODER,
                              training={"note": f"reindex tests: tuned visual tower (seed {seed})"})


def load_version(settings: Settings, version: str) -> Any:
    from vidsearch.models.persist import load_model_version

    model, _ = load_model_version(registry_of(settings), settings.model.model_name, version, device="cpu")
    return model


def aggregate_one(model: Any, frames: np.ndarray) -> np.ndarray:
    import torch

    with torch.inference_mode():
        tensor = torch.from_numpy(np.array(frames, dtype=np.float32))[None]
        return model.aggregate(tensor, torch.ones(tensor.shape[:2], dtype=torch.bool))[0].numpy()


# --------------------------------------------------------------------------- the worker

class WorkerThread:
    """A real IngestWorker (its own encoder actor) running ``run()`` in a thread."""

    def __init__(self, settings: Settings) -> None:
        from vidsearch.services.ingest.worker import IngestWorker

        self.worker = IngestWorker(settings, client_id="reindex-tests")
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="ingest-worker", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.worker.run()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def stop(self, timeout_s: float = 60.0) -> None:
        self.worker.stop()
        self.thread.join(timeout_s)


def produce(settings: Settings, messages: list[dict[str, Any]]) -> None:
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=settings.broker.bootstrap, acks="all")
    try:
        futures = [producer.send(settings.broker.ingest_topic, key=m["video_id"].encode(),
                                 value=json.dumps(m).encode()) for m in messages]
        producer.flush(timeout=30)
        for future in futures:
            future.get(timeout=30)
    finally:
        producer.close(timeout=5)


def upsert(video_id: str, path: Path, **metadata: Any) -> dict[str, Any]:
    return {"op": "upsert", "video_id": video_id, "uri": path.resolve().as_uri(), "metadata": metadata}


def delete(video_id: str) -> dict[str, Any]:
    return {"op": "delete", "video_id": video_id}


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what} (last: {last!r})")


# --------------------------------------------------------------------------- searching

@dataclass
class Answer:
    started: float
    ended: float
    model_version: str
    index: str
    results: int


@dataclass
class Searches:
    """gRPC Search calls issued back to back from a few threads while a block runs."""

    client: Any
    threads: int = 1
    query: str = "a red clip moving"
    answers: list[Answer] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._workers = [threading.Thread(target=self._loop, daemon=True) for _ in range(self.threads)]

    def _loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                response = self.client.search(self.query, top_k=3, timeout=60.0)
            except grpc.RpcError as exc:
                with self._lock:
                    self.errors.append(f"{exc.code().name}: {exc.details()}")
                continue
            with self._lock:
                self.answers.append(Answer(started, time.monotonic(), response.model_version, response.index,
                                           len(response.results)))

    def __enter__(self) -> "Searches":
        for worker in self._workers:
            worker.start()
        # The block starts once the current version has answered.
        wait_for(lambda: self.answers or self.errors, 60, "the first concurrent search")
        return self

    def __exit__(self, *exc: object) -> None:
        # At least one request starts after the block: it sees the state the block left.
        ended = time.monotonic()
        try:
            if exc[0] is None:
                wait_for(lambda: self.errors or any(a.started > ended for a in self.answers), 60,
                         "a search started after the block")
        finally:
            self._stop.set()
        for worker in self._workers:
            worker.join(120)

    def check_swap(self, old: str, new: str, alias: str = "videos") -> None:
        """No request failed, each answer used one version end to end (its index is that
        version's collection), both versions answered, and once the new version had
        answered, every request started later was answered by it."""
        assert not self.errors, self.errors[:5]
        assert self.answers
        for answer in self.answers:
            assert answer.model_version in (old, new), answer
            assert answer.index == f"{alias}__{answer.model_version}", answer
            assert answer.results > 0, answer
        seen = {a.model_version for a in self.answers}
        assert seen == {old, new}, seen
        first_new = min(a.ended for a in self.answers if a.model_version == new)
        late_old = [a for a in self.answers if a.started > first_new and a.model_version != new]
        assert not late_old, late_old[:3]


# --------------------------------------------------------------------------- the CLI

@dataclass
class CliResult:
    code: int
    out: str
    err: str


def run_cli(args: list[str]) -> CliResult:
    """``vidsearch ARGS`` through ``vidsearch.cli.main`` in this process (it shares this
    process's Ray, hence the embedded store actor); logging is restored afterwards."""
    from vidsearch.cli import main

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    out, err = io.StringIO(), io.StringIO()
    # Kafka clients an earlier test module left in this process (their broker gone) log
    # reconnect errors from their own IO threads whenever they retry; in CI one such line
    # landed in a command's captured stderr. They are not this command's output: the kafka
    # loggers pass only records of the thread running the command while it runs.
    caller = threading.get_ident()
    only_caller = _ThreadFilter(caller)
    kafka_loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
                     if name == "kafka" or name.startswith("kafka.")]
    for logger in kafka_loggers:
        logger.addFilter(only_caller)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["--log-level", "WARNING", *args])
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        for logger in kafka_loggers:
            logger.removeFilter(only_caller)
    return CliResult(code, out.getvalue(), err.getvalue())


class _ThreadFilter(logging.Filter):
    def __init__(self, thread: int) -> None:
        super().__init__()
        self.thread = thread

    def filter(self, record: logging.LogRecord) -> bool:
        return record.thread == self.thread


def write_config(settings: Settings, path: Path) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(settings.model_dump(mode="json")))
    return path
