"""Ingest throughput: the Kafka pipeline against its decode-only and encode-only bounds.

One run measures, on N synthetic videos made by the project's own generator:

(a) decode-only: the worker's Ray decode task (``decode_frames``) over all N videos,
    with the worker's parallelism (``ingest.decode_parallelism`` tasks in flight);
(b) encode-only: the worker's ``EncoderPool`` of ``FrameEncoder`` actors fed the frames
    decoded in (a), packed the way the pipeline packs them (up to
    ``ingest.encoder_batch_frames`` frames per call, at most ``MAX_CALLS_PER_ACTOR``
    calls queued per actor);
(c) end-to-end: an embedded Tansu broker, the producer's ``publish``, and the real
    ``vidsearch ingest-worker`` in a subprocess (so its memory can be read from /proc)
    writing to the embedded Qdrant store; timed from the first produce until every
    offset is committed and every point is in the store.

``--realistic`` swaps the synthetic clips for camera-like files (H.264 and VP9,
480p-1080p, 10 s to 2 min, written by ``vidsearch.video_camera`` as
benchmarks/decode.py writes them), so long videos are cut into segments and decoding
works at real resolutions; its page is docs/benchmarks/ingest-realistic.md.

It prints the pipeline efficiency (c) / min(a, b) (target >= 0.8) and the growth of
the worker's peak RSS between the first ``--rss-at`` videos and all N (target <= 10%),
then writes docs/benchmarks/ingest.md and ingest.png (``--quick``: under .bench/results).

    python benchmarks/ingest.py                  # N=200, vit-b-32 (random init)
    python benchmarks/ingest.py --quick          # N=40, tiny model, about a minute
    python benchmarks/ingest.py --realistic      # 12 camera-like files, segments on
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import common

common.isolate_environment()

# Heavy imports after the environment is cleaned (Ray reads RAY_ADDRESS on import paths).
import ray  # noqa: E402
import yaml  # noqa: E402

from vidsearch.broker import EmbeddedBroker  # noqa: E402
from vidsearch.config import (BrokerSettings, DecodeSettings, IngestSettings, ModelSettings,  # noqa: E402
                              RaySettings, Settings, StoreSettings)
from vidsearch.services.ingest.encoder import EncoderPool, decode_frames  # noqa: E402
from vidsearch.services.ingest.pipeline import MAX_CALLS_PER_ACTOR  # noqa: E402
from vidsearch.services.ingest.producer import ops_from_manifest, publish  # noqa: E402
from vidsearch.synth import INFO_NAME, MANIFEST_NAME, load_manifest  # noqa: E402
from vidsearch.video_camera import CameraSpec  # noqa: E402

EFFICIENCY_TARGET = 0.8
REALISTIC_EFFICIENCY_TARGET = 0.9  # issue 11's target for real-resolution files with segments
RSS_GROWTH_TARGET = 0.10
GPU_FRAMES_TARGET = 15_000  # ViT-B/32 bf16 frames/s in the encode-only bound, on an H200
POLL_S = 0.2  # how often (c) checks committed offsets and the store
ENCODER_TITLE = "ray::FrameEncoder"  # process title Ray gives the encoder actors


# ============================================================================ dataset
# Camera-like files for --realistic: (spec, copies). Copies are the same file under
# other video ids (decoding it is the same work each time).
REALISTIC = [
    (CameraSpec("h264", 1280, 720, 60, gop=60), 4),  # 3 segments each
    (CameraSpec("h264", 1920, 1080, 30, gop=60), 3),  # one segment
    (CameraSpec("vp9", 1280, 720, 60, gop=60), 2),
    (CameraSpec("h264", 854, 480, 120, gop=60), 2),  # 5 segments
    (CameraSpec("h264", 854, 480, 10, gop=30), 1),
]


def realistic_set() -> Path:
    """A manifest of camera-like files (written once, shared with benchmarks/decode.py's cache)."""
    from decode import ensure_file

    cache = common.CACHE_DIR / "decode-videos"
    out = common.CACHE_DIR / "ingest-realistic"
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for spec, copies in REALISTIC:
        path = ensure_file(spec, cache)
        for copy in range(copies):
            lines.append(json.dumps({"video_id": f"{path.stem}-{copy}", "path": str(path.resolve())}))
    manifest = out / MANIFEST_NAME
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


# ============================================================================ settings
def bench_settings(args: argparse.Namespace, videos_dir: Path, run_dir: Path, bootstrap: str) -> Settings:
    """The worker's default settings; only endpoints, paths and the model preset change."""
    return Settings(
        broker=BrokerSettings(bootstrap=bootstrap),
        store=StoreSettings(path=str(run_dir / "qdrant")),
        decode=DecodeSettings(allowed_prefixes=[str(videos_dir)]),
        # An empty registry: the worker serves the deterministic base model of the preset
        # (random init; encoding speed does not depend on the weights).
        model=ModelSettings(preset=args.preset, registry_root=str(run_dir / "registry")),
        ingest=IngestSettings(metrics_port=common.free_port(), log_summary_interval_s=30.0),
        ray=RaySettings(num_cpus=args.num_cpus),
    )


# ============================================================================ (a) decode only
@dataclass
class StageResult:
    name: str
    seconds: float
    videos: int
    frames: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def videos_per_s(self) -> float:
        return self.videos / self.seconds

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.seconds


def decode_only(uris: list[str], settings: Settings, num_frames: int,
                resize_to: int) -> tuple[StageResult, list[Any], list[int], list[Any]]:
    """Decode every video with ``decode_parallelism`` tasks in flight; keep the frame refs
    (they stay in the object store) for the encode-only stage."""
    parallelism = settings.ingest.decode_parallelism
    # Warm-up: start the task workers and import PyAV in them, as a running worker has.
    ray.get([decode_frames.remote(uris[i % len(uris)], settings.decode, num_frames, resize_to)[0]
             for i in range(parallelism)])
    frames_refs: list[Any] = [None] * len(uris)
    metas: list[Any] = [None] * len(uris)
    pending: dict[Any, int] = {}
    next_video = 0
    load_before = common.load_average()
    started = time.perf_counter()
    while next_video < len(uris) or pending:
        while next_video < len(uris) and len(pending) < parallelism:
            meta_ref, frames_ref = decode_frames.remote(uris[next_video], settings.decode, num_frames, resize_to)
            pending[meta_ref] = next_video
            frames_refs[next_video] = frames_ref
            next_video += 1
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            metas[pending.pop(ref)] = ray.get(ref)
    seconds = time.perf_counter() - started
    failed = [(uris[i], m.reason) for i, m in enumerate(metas) if not m.ok]
    if failed:
        raise RuntimeError(f"{len(failed)} videos failed to decode, first: {failed[0]}")
    counts = [m.num_frames for m in metas]
    stage = StageResult("decode-only", seconds, len(uris), sum(counts),
                        {"parallelism": parallelism, "load": (load_before, common.load_average()),
                         "segments": sum(len(m.frame_index) for m in metas)})
    return stage, frames_refs, counts, [m.frame_index for m in metas]


# ============================================================================ (b) encode only
def encode_only(settings: Settings, pool: EncoderPool, frames_refs: list[Any],
                frame_counts: list[int], windows: list[Any]) -> tuple[StageResult, dict[str, Any]]:
    """The worker's encoder pool on pre-decoded frames, packed like the pipeline packs them.

    With every video already decoded the pipeline's accumulator is always full, so each
    call carries as many whole videos as fit in ``encoder_batch_frames`` (at least one),
    and each actor has up to MAX_CALLS_PER_ACTOR calls queued. Closes the pool.
    """
    info = {"model_version": pool.info.model_version, "device": pool.info.device, "gpu": pool.gpu,
            "actors": len(pool.actors), "embed_dim": pool.info.embed_dim}
    batch_frames = settings.ingest.encoder_batch_frames
    samplers: list[BusySampler] = []
    try:
        # Warm-up: one call per actor (first-forward allocations, lazy init), not timed.
        ray.get([actor.encode.remote(frames_refs[0]) for actor in pool.actors])
        cpu_before = encoder_cpu_seconds()
        queue = deque(range(len(frames_refs)))
        calls: dict[Any, tuple[int, list[int]]] = {}
        pack_sizes: list[int] = []
        sampler = BusySampler().__enter__()
        samplers.append(sampler)
        info["load_before"] = common.load_average()
        started = time.perf_counter()
        while queue or calls:
            while queue:
                actor = pool.pick()
                if pool.outstanding[actor] >= MAX_CALLS_PER_ACTOR:
                    break
                pack = [queue.popleft()]
                frames = frame_counts[pack[0]]
                while queue and frames + frame_counts[queue[0]] <= batch_frames:
                    frames += frame_counts[queue[0]]
                    pack.append(queue.popleft())
                ref = pool.actors[actor].encode_segments.remote(*[frames_refs[i] for i in pack],
                                                                windows=[windows[i] for i in pack])
                calls[ref] = (actor, pack)
                pool.outstanding[actor] += 1
                pack_sizes.append(len(pack))
            done, _ = ray.wait(list(calls), num_returns=1)
            for ref in done:
                actor, pack = calls.pop(ref)
                pool.outstanding[actor] -= 1
                results = ray.get(ref)
                if len(results) != len(pack):
                    raise RuntimeError(f"encoder returned {len(results)} results for {len(pack)} videos")
        seconds = time.perf_counter() - started
        sampler.stop()
        info["load_after"] = common.load_average()
        info["encoder_cpu_s"] = encoder_cpu_seconds() - cpu_before
        info["encoder_busy"] = sampler.fraction
    finally:
        for sampler in samplers:
            sampler.stop()
        pool.close()
    info["calls"] = len(pack_sizes)
    info["videos_per_call"] = round(sum(pack_sizes) / max(1, len(pack_sizes)), 1)
    stage = StageResult("encode-only", seconds, len(frames_refs), sum(frame_counts),
                        {"batch_frames": batch_frames, "load": (info["load_before"], info["load_after"])})
    return stage, info


def encoder_cpu_seconds() -> float:
    """CPU seconds used so far by every FrameEncoder actor process on this machine."""
    pids = common.pids_with_title(ENCODER_TITLE, under=os.getpid())
    return sum(common.proc_cpu_seconds(pid) or 0.0 for pid in pids)


class BusySampler:
    """Samples, on a thread, how often the encoder actors have work.

    A sync Ray actor runs its calls on its main thread, so that thread's scheduler state
    is R (or D) while an encode call runs, even when another process holds the CPU,
    and S while the actor waits for its next call. The busy fraction therefore shows
    whether the pipeline kept the encoder fed, independently of how fast the (shared)
    CPU let it compute.
    """

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.samples = 0
        self.busy = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "BusySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop sampling (idempotent, so error paths can call it too)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        pids: list[int] = []
        next_scan = 0.0
        while not self._stop.wait(self.interval_s):
            if time.monotonic() >= next_scan:  # scanning /proc costs more than sampling
                pids = common.pids_with_title(ENCODER_TITLE, under=os.getpid())
                next_scan = time.monotonic() + 2.0
            for pid in pids:
                state = common.proc_state(pid)
                if state is not None:
                    self.samples += 1
                    self.busy += state in ("R", "D")

    @property
    def fraction(self) -> float:
        return self.busy / self.samples if self.samples else float("nan")


def wait_for_no_encoders(timeout_s: float = 30.0) -> None:
    """ray.kill is asynchronous: wait until the killed actors' processes are gone, so
    (c) neither shares the CPU with them nor mistakes them for the worker's actors."""
    deadline = time.monotonic() + timeout_s
    while common.pids_with_title(ENCODER_TITLE, under=os.getpid()) and time.monotonic() < deadline:
        time.sleep(0.2)


def raw_gpu_forward(preset: str, batch: int, iters: int = 30) -> float:
    """Frames/s of the bare image tower under bf16 autocast on CUDA (no pool, no
    preprocess, no object store): the ceiling the encode-only bound is compared with."""
    import torch

    from vidsearch.models import build_model, load_model_config

    model = build_model(load_model_config(preset), device="cuda", seed=0).eval()
    size = model.image_size if isinstance(model.image_size, int) else max(model.image_size)
    pixels = torch.randn(batch, 3, size, size, device="cuda")
    with torch.inference_mode():
        for _ in range(5):
            model.encode_frames(pixels)
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(iters):
            model.encode_frames(pixels)
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    del model
    torch.cuda.empty_cache()
    return batch * iters / seconds


# ============================================================================ (c) end to end
class WorkerProcess:
    """``vidsearch ingest-worker`` in a subprocess, attached to this Ray cluster."""

    def __init__(self, settings: Settings, run_dir: Path) -> None:
        self.settings = settings
        self.log_path = run_dir / "worker.log"
        config = run_dir / "worker.yaml"
        tree = settings.dump()
        for section in tree.values():
            if isinstance(section, dict):
                section.pop("api_key", None)
        config.write_text(yaml.safe_dump(tree))
        env = dict(os.environ)
        env.update({"VIDSEARCH_CONFIG": str(config), "RAY_ADDRESS": settings.ray.address or "",
                    "KAFKA_BOOTSTRAP": settings.broker.bootstrap or "",
                    # JSON log lines: readiness is read from them, not from free text.
                    "VIDSEARCH_LOG_FORMAT": "json"})
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "vidsearch.cli", "ingest-worker"], env=env,
                                     stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=common.REPO_ROOT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    events.append(json.loads(line))
                except ValueError:
                    pass
        return events

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def wait_ready(self, timeout_s: float) -> float:
        """Block until the worker owns partitions (model loaded, group joined); seconds waited."""
        started = time.perf_counter()
        while time.perf_counter() - started < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ingest worker exited with code {self.proc.returncode}:\n{self.log_tail()}")
            if any(e.get("msg") == "partitions assigned" and e.get("partitions") for e in self.log_events()):
                return time.perf_counter() - started
            time.sleep(0.25)
        raise RuntimeError(f"ingest worker not ready within {timeout_s:g}s:\n{self.log_tail()}")

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"ingest worker exited with code {self.proc.returncode}:\n{self.log_tail()}")

    def stop(self, grace_s: float = 60.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # drains in-flight batches, then exits 0
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@dataclass
class MemoryPoint:
    videos: int
    worker_rss: int
    worker_peak: int
    encoder_rss: int
    encoder_peak: int
    encoder_processes: int


class MemoryWatch:
    """Peak RSS of the worker process and of its encoder actor(s).

    The peak is the larger of the kernel's VmHWM and the highest VmRSS sampled so far:
    the kernel folds per-thread RSS counters into VmHWM lazily, so on its own it can
    read below a resident size that was already observed.
    """

    def __init__(self, worker_pid: int) -> None:
        self.worker_pid = worker_pid
        self._worker_max = 0
        self._encoder_max = 0

    def read(self, videos: int) -> MemoryPoint:
        worker = common.proc_memory(self.worker_pid) or common.ProcMemory(0, 0)
        pids = common.pids_with_title(ENCODER_TITLE, under=os.getpid())
        encoders = [m for m in (common.proc_memory(p) for p in pids) if m]
        encoder_rss = sum(m.rss for m in encoders)
        self._worker_max = max(self._worker_max, worker.rss, worker.peak)
        self._encoder_max = max(self._encoder_max, encoder_rss, sum(m.peak for m in encoders))
        return MemoryPoint(videos, worker.rss, self._worker_max, encoder_rss, self._encoder_max, len(encoders))


def committed_total(consumer: Any, topic: str, partitions: int) -> int:
    return sum(common.committed_offsets(consumer, topic, partitions).values())


def end_to_end(settings: Settings, manifest: Path, n: int, collection: str, rss_at: int,
               run_dir: Path, points: int | None = None) -> tuple[StageResult, dict[str, Any]]:
    """``points``: what the store holds when all ``n`` videos are in (more than n with segments)."""
    points = points or n
    from kafka import KafkaConsumer

    from vidsearch.store import open_store

    broker = settings.broker
    store = open_store(settings)
    ops = ops_from_manifest(manifest)
    worker = WorkerProcess(settings, run_dir)
    monitor = KafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=broker.consumer_group,
                            enable_auto_commit=False)  # never subscribes: only reads the group's offsets
    timeline: list[dict[str, float]] = []
    samplers: list[BusySampler] = []
    try:
        ready_s = worker.wait_ready(timeout_s=600)
        print(f"  worker ready after {ready_s:.1f}s (model loaded, partitions assigned)", flush=True)
        watch = MemoryWatch(worker.pid)
        memory_start = watch.read(0)
        cpu_before = encoder_cpu_seconds()
        load_before = common.load_average()
        sampler = BusySampler().__enter__()
        samplers.append(sampler)
        started = time.perf_counter()
        publish(broker.bootstrap, broker.ingest_topic, ops, partitions=broker.partitions, progress=False)
        produced_s = time.perf_counter() - started
        checkpoint: MemoryPoint | None = None
        first_point_s = all_points_s = None
        while True:
            worker.check_alive()
            now = time.perf_counter() - started
            count = store.count(collection)  # the worker created it before it became ready
            committed = committed_total(monitor, broker.ingest_topic, broker.partitions)
            memory = watch.read(count)
            timeline.append({"t": now, "points": count, "committed": committed,
                             "worker_rss_mib": common.mib(memory.worker_rss),
                             "encoder_rss_mib": common.mib(memory.encoder_rss)})
            if count and first_point_s is None:
                first_point_s = now
            if checkpoint is None and count >= rss_at:
                checkpoint = memory
            if count >= points and all_points_s is None:
                all_points_s = now
            if committed >= n and count >= points:
                seconds = now
                break
            if now > 3600:
                raise RuntimeError(f"end-to-end run did not finish within an hour: {count} points, "
                                   f"{committed} committed of {n}")
            time.sleep(POLL_S)
        sampler.stop()
        encoder_cpu_s = encoder_cpu_seconds() - cpu_before
        load_after = common.load_average()
        final = watch.read(n)
        metrics = common.scrape_metrics(settings.ingest.metrics_port)
        cpu = {"worker_cpu_s": common.proc_cpu_seconds(worker.pid), "encoder_cpu_s": encoder_cpu_s}
    finally:
        for each in samplers:
            each.stop()
        monitor.close(autocommit=False)
        exit_code = worker.stop()
        store.close()
    extra = {
        "ready_s": ready_s, "produce_s": produced_s, "first_point_s": first_point_s,
        "all_points_s": all_points_s, "worker_exit_code": exit_code,
        "memory_start": asdict(memory_start), "memory_checkpoint": asdict(checkpoint),
        "memory_final": asdict(final), "timeline": timeline, "cpu": cpu,
        "encoder_busy": sampler.fraction, "load_before": load_before, "load_after": load_after,
        "dlq": metrics.get("vidsearch_ingest_dlq_total", 0.0),
        "retries": metrics.get("vidsearch_ingest_retries_total", 0.0),
        "batches": metrics.get("vidsearch_ingest_batches_total", 0.0),
        "frames_encoded": metrics.get("vidsearch_ingest_frames_encoded_total", 0.0),
    }
    stage = StageResult("end-to-end", seconds, n, int(extra["frames_encoded"]), {"load": (load_before, load_after)})
    return stage, extra


# ============================================================================ report
def growth(before: int, after: int) -> float:
    return (after - before) / before if before else float("nan")


def ratio(x: float, y: float) -> float:
    """x / y, NaN when y is 0 or NaN (a stage too short to sample)."""
    return x / y if y and y == y else float("nan")


def summarise(a: StageResult, b: StageResult, c: StageResult, e2e: dict[str, Any], enc: dict[str, Any],
              rss_at: int) -> dict[str, Any]:
    bound = min(a.videos_per_s, b.videos_per_s)
    checkpoint, final = e2e["memory_checkpoint"], e2e["memory_final"]
    total_before = checkpoint["worker_peak"] + checkpoint["encoder_peak"]
    total_after = final["worker_peak"] + final["encoder_peak"]
    busy_b, busy_c = enc["encoder_busy"], e2e["encoder_busy"]
    return {
        # When encoding bounds the pipeline, efficiency = feed x speed:
        #   feed  = busy_c / busy_b: how much of the time the pipeline kept the encoder supplied,
        #   speed = frames/s while busy in (c) / in (b): how fast the (shared) CPU let it compute.
        # Only `feed` describes the pipeline; `speed` moves with the machine's background load.
        "encoder_busy_b": busy_b,
        "encoder_busy_c": busy_c,
        "feed_efficiency": ratio(busy_c, busy_b),
        "busy_speed_ratio": ratio(ratio(c.frames, c.seconds * busy_c), ratio(b.frames, b.seconds * busy_b)),
        "efficiency": c.videos_per_s / bound,
        "bound": "decode" if a.videos_per_s < b.videos_per_s else "encode",
        "rss_growth_worker": growth(checkpoint["worker_peak"], final["worker_peak"]),
        "rss_growth_encoder": growth(checkpoint["encoder_peak"], final["encoder_peak"]),
        "rss_growth_total": growth(total_before, total_after),
        "rss_at": rss_at,
    }


def print_results(args: argparse.Namespace, stages: list[StageResult], summary: dict[str, Any],
                  e2e: dict[str, Any], enc: dict[str, Any], gpu: dict[str, Any]) -> None:
    print("\n=== ingest benchmark ===")
    print(f"videos: {args.n}   preset: {args.preset}   device: {enc['device']}   encoder actors: {enc['actors']}")
    for s in stages:
        print(f"{s.name:>12}: {s.seconds:8.2f} s  {s.videos_per_s:9.3f} videos/s  {s.frames_per_s:10.1f} frames/s")
    print(f"efficiency (c)/min(a,b) = {summary['efficiency']:.3f}  (bound: {summary['bound']}; "
          f"target >= {summary['efficiency_target']})  -> "
          f"{'met' if summary['efficiency'] >= summary['efficiency_target'] else 'MISSED'}")
    print(f"  = feed {summary['feed_efficiency']:.3f} (encoder busy {summary['encoder_busy_c']:.1%} of (c) vs "
          f"{summary['encoder_busy_b']:.1%} of (b)) x speed while busy {summary['busy_speed_ratio']:.3f} "
          f"(load avg (b) {stages[1].extra['load'][0]}->{stages[1].extra['load'][1]}, "
          f"(c) {stages[2].extra['load'][0]}->{stages[2].extra['load'][1]})")
    cp, fin = e2e["memory_checkpoint"], e2e["memory_final"]
    print(f"worker peak RSS after {summary['rss_at']} videos: {common.mib(cp['worker_peak']):.0f} MiB, "
          f"after {args.n}: {common.mib(fin['worker_peak']):.0f} MiB  "
          f"(growth {summary['rss_growth_worker']:+.1%})")
    print(f"encoder actor peak RSS after {summary['rss_at']} videos: {common.mib(cp['encoder_peak']):.0f} MiB, "
          f"after {args.n}: {common.mib(fin['encoder_peak']):.0f} MiB  "
          f"(growth {summary['rss_growth_encoder']:+.1%})")
    total_ok = summary["rss_growth_total"] <= RSS_GROWTH_TARGET
    print(f"worker + encoder peak RSS growth: {summary['rss_growth_total']:+.1%}  (target <= "
          f"{RSS_GROWTH_TARGET:.0%}) -> {'met' if total_ok else 'MISSED'}")
    print(f"GPU: {gpu['note']}")
    print(f"DLQ: {e2e['dlq']:.0f}   retries: {e2e['retries']:.0f}   worker exit code: {e2e['worker_exit_code']}")


def plot(path: Path, stages: list[StageResult], e2e: dict[str, Any], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(16, 4.5))
    names = [s.name for s in stages]
    rates = [s.videos_per_s for s in stages]
    bars = left.barh(names[::-1], rates[::-1], color=["#4c72b0", "#dd8452", "#55a868"][::-1])
    left.set_xscale("log")
    left.set_xlabel("videos / s (log scale)")
    left.set_title("throughput: bounds (a), (b) vs pipeline (c)")
    for bar, rate in zip(bars, rates[::-1]):
        left.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {rate:.2f}", va="center")
    left.set_xlim(right=max(rates) * 8)

    timeline = e2e["timeline"]
    t = [p["t"] for p in timeline]
    middle.plot(t, [p["points"] for p in timeline], label="points in the store", color="#55a868")
    middle.plot(t, [p["committed"] for p in timeline], label="offsets committed", color="#8172b2", linestyle="--")
    middle.set_xlabel("seconds since the first produce")
    middle.set_ylabel("videos")
    middle.set_title("(c) progress (commits come per poll batch)")
    middle.legend(loc="upper left", fontsize=8)

    right.plot(t, [p["encoder_rss_mib"] for p in timeline], color="#937860", label="encoder actor")
    right.plot(t, [p["worker_rss_mib"] for p in timeline], color="#c44e52", label="worker process")
    right.set_yscale("log")
    right.set_xlabel("seconds since the first produce")
    right.set_ylabel("RSS (MiB, log scale)")
    right.set_title("(c) resident memory")
    right.legend(loc="center right", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_markdown(path: Path, png_name: str, args: argparse.Namespace, settings: Settings, facts: dict[str, Any],
                   stages: list[StageResult], summary: dict[str, Any], e2e: dict[str, Any], enc: dict[str, Any],
                   gpu: dict[str, Any], synth: dict[str, Any], load_after: tuple[float, float]) -> None:
    a, b, c = stages
    ing = settings.ingest
    cp, fin = e2e["memory_checkpoint"], e2e["memory_final"]
    eff_ok = summary["efficiency"] >= summary["efficiency_target"]
    rss_ok = summary["rss_growth_total"] <= RSS_GROWTH_TARGET
    lines = [
        "# Ingest throughput benchmark",
        "",
        f"Generated by `{common.command_line()}` (see `benchmarks/ingest.py`). Re-run it to refresh this page.",
        "",
        *(["**Quick mode** (`--quick`): a smoke test. With the tiny model every stage takes milliseconds, so "
            "fixed latencies (Kafka fetch waits, consumer polls, commits) dominate (c) and the ratios say "
            "nothing about the pipeline; use the default run for numbers.", ""] if args.quick else []),
        "## What is measured",
        f"- **(a) decode-only**: the worker's Ray decode task `decode_frames` over all {args.n} videos, "
        f"{a.extra['parallelism']} tasks in flight (`ingest.decode_parallelism`), frames resized for the model.",
        f"- **(b) encode-only**: the worker's `EncoderPool` ({enc['actors']} `FrameEncoder` actor(s), "
        f"device `{enc['device']}`) fed the frames decoded in (a), packed like the pipeline packs them: "
        f"up to {b.extra['batch_frames']} frames per call (`ingest.encoder_batch_frames`; "
        f"{enc['videos_per_call']} videos per call on average), at most {MAX_CALLS_PER_ACTOR} calls queued per actor. "
        "One warm-up call per actor is not timed.",
        "- **(c) end-to-end**: embedded Tansu broker, `producer.publish` (acks=all), and the real "
        "`vidsearch ingest-worker` in a subprocess attached to the same Ray cluster, writing to the embedded "
        "Qdrant store. Timed from the first produce until every offset is committed and every point is in the "
        f"store (polled every {POLL_S:g} s). The worker is started and has joined the group before the clock starts.",
        "",
        "## Setup",
        *common.md_table(["setting", "value"], [
            ("videos", f"{args.n} camera-like files (`vidsearch.video_camera`, CRF 23, 30 fps): "
                       + ", ".join(f"{copies} x {name}" for name, copies in synth["realistic"])
                       + f"; {a.extra['segments']} segments" if "realistic" in synth else
                       f"{args.n} synthetic (`vidsearch.synth`, seed {args.seed}): {synth['size']}x{synth['size']} px, "
                       f"{synth['num_frames']} frames at {synth['fps']:g} fps, H.264"),
            ("model", f"`{args.preset}` preset, random init (speed does not depend on the weights), "
                      f"{enc['embed_dim']}-d, {c.frames // max(1, c.videos)} frames per video"),
            ("encoder actors / batch frames", f"{ing.encoder_actors} / {ing.encoder_batch_frames}"),
            ("decode parallelism", ing.decode_parallelism),
            ("max poll records / in-flight batches / partitions",
             f"{settings.broker.max_poll_records} / {ing.max_inflight_batches} / {settings.broker.partitions}"),
            ("Ray logical CPUs", settings.ray.num_cpus),
        ]),
        "",
        "## Machine",
        *common.machine_section(facts, load_after),
        "",
        "## Results",
        *common.md_table(["stage", "seconds", "videos/s", "frames/s", "load average, start -> end"], [
            (s.name, f"{s.seconds:.2f}", f"{s.videos_per_s:.3f}", f"{s.frames_per_s:.1f}",
             f"{s.extra['load'][0]} -> {s.extra['load'][1]}") for s in stages]),
        "",
        *common.md_table(["ratio", "value", "target", "verdict"], [
            ("efficiency (c) / min(a, b)", f"{summary['efficiency']:.3f} (bound: {summary['bound']})",
             f">= {summary['efficiency_target']}", common.verdict(eff_ok)),
            (f"peak RSS growth, worker + encoder actors, {summary['rss_at']} -> {args.n} videos",
             f"{summary['rss_growth_total']:+.1%}", f"<= {RSS_GROWTH_TARGET:.0%}", common.verdict(rss_ok)),
            ("ViT-B/32 bf16 encode-only frames/s (GPU)", gpu["value"], f">= {GPU_FRAMES_TARGET:,} on an H200",
             common.verdict(gpu["ok"])),
        ]),
        "",
        "Diagnostics (they split the efficiency; see *Reading the numbers*):",
        "",
        *common.md_table(["diagnostic", "value"], [
            ("encoder actor busy (has a call running), share of (b) / of (c)",
             f"{summary['encoder_busy_b']:.1%} / {summary['encoder_busy_c']:.1%}"),
            ("feed efficiency: busy (c) / busy (b)", f"{summary['feed_efficiency']:.3f}"),
            ("encoder speed while busy: (c) / (b)", f"{summary['busy_speed_ratio']:.3f}"),
            ("encoder CPU per frame: (b) / (c)",
             f"{enc['encoder_cpu_s'] / b.frames * 1000:.0f} ms / "
             f"{e2e['cpu']['encoder_cpu_s'] / max(1, c.frames) * 1000:.0f} ms"),
            ("encoder CPU share (CPU seconds per wall second): (b) / (c)",
             f"{enc['encoder_cpu_s'] / b.seconds:.2f} / {e2e['cpu']['encoder_cpu_s'] / c.seconds:.2f}"),
        ]),
        "",
        f"### Worker memory (from /proc; peak = max of VmHWM and every VmRSS sampled every {POLL_S:g} s)",
        *common.md_table(["process", "peak at start", f"peak after {summary['rss_at']} videos",
                          f"peak after {args.n} videos", "growth", f"RSS after {args.n}"], [
            ("worker (consumer loop, pipeline)", f"{common.mib(e2e['memory_start']['worker_peak']):.0f} MiB",
             f"{common.mib(cp['worker_peak']):.0f} MiB", f"{common.mib(fin['worker_peak']):.0f} MiB",
             f"{summary['rss_growth_worker']:+.1%}", f"{common.mib(fin['worker_rss']):.0f} MiB"),
            (f"encoder actor(s) ({fin['encoder_processes']} process(es))",
             f"{common.mib(e2e['memory_start']['encoder_peak']):.0f} MiB",
             f"{common.mib(cp['encoder_peak']):.0f} MiB", f"{common.mib(fin['encoder_peak']):.0f} MiB",
             f"{summary['rss_growth_encoder']:+.1%}", f"{common.mib(fin['encoder_rss']):.0f} MiB"),
        ]),
        "",
        "### End-to-end details",
        f"- worker start-up (Ray attach, model load, group join), not timed: {e2e['ready_s']:.1f} s",
        f"- producing {args.n} messages (acks=all): {e2e['produce_s']:.2f} s; first point stored after "
        f"{e2e['first_point_s']:.2f} s; all points stored after {e2e['all_points_s']:.2f} s; all offsets committed "
        f"after {c.seconds:.2f} s",
        f"- CPU time: worker process {e2e['cpu']['worker_cpu_s']:.1f} s over its whole life (start-up included); "
        f"encoder actor(s) {e2e['cpu']['encoder_cpu_s']:.1f} s while the clock ran",
        f"- DLQ records: {e2e['dlq']:.0f}, retries: {e2e['retries']:.0f}, committed batches: {e2e['batches']:.0f}, "
        f"worker exit code after SIGTERM: {e2e['worker_exit_code']}",
        "",
        "## Reading the numbers",
        *analysis(args, settings, stages, summary, e2e, enc, facts),
        "",
        f"![ingest benchmark]({png_name})",
    ]
    common.write_text(path, lines)


def analysis(args: argparse.Namespace, settings: Settings, stages: list[StageResult], summary: dict[str, Any],
             e2e: dict[str, Any], enc: dict[str, Any], facts: dict[str, Any]) -> list[str]:
    a, b, c = stages
    bound = min(a.videos_per_s, b.videos_per_s)
    ideal_s = args.n / bound
    lost = c.seconds - ideal_s
    out = [
        f"- The pipeline is bounded by **{summary['bound']}**: decode-only runs at {a.videos_per_s:.2f} videos/s "
        f"and encode-only at {b.videos_per_s:.2f} videos/s, a factor of "
        f"{max(a.videos_per_s, b.videos_per_s) / bound:.1f} apart. At the bound the {args.n} videos would take "
        f"{ideal_s:.1f} s; end to end took {c.seconds:.1f} s ({lost:+.1f} s).",
    ]
    if summary["bound"] == "encode":
        feed, speed = summary["feed_efficiency"], summary["busy_speed_ratio"]
        out.append(
            f"- The efficiency {summary['efficiency']:.3f} is the product of two factors. **Feed** "
            f"{feed:.3f}: the encoder actor had a call running {summary['encoder_busy_c']:.1%} of the time in (c) "
            f"against {summary['encoder_busy_b']:.1%} in (b), so the pipeline "
            + ("kept it supplied" if feed >= 0.95 else "left it waiting for work part of the time")
            + f". **Speed** {speed:.3f}: while busy, it encoded {speed:.2f}x as many frames per second in (c) as in "
            f"(b). Its CPU cost per frame was {enc['encoder_cpu_s'] / b.frames * 1000:.0f} ms in (b) and "
            f"{e2e['cpu']['encoder_cpu_s'] / max(1, c.frames) * 1000:.0f} ms in (c), but it got "
            f"{enc['encoder_cpu_s'] / b.seconds:.2f} of a core in (b) and "
            f"{e2e['cpu']['encoder_cpu_s'] / c.seconds:.2f} in (c). The speed factor is the machine, not the "
            "pipeline: it moves with the CPU left over by decoding, Kafka, the store actor, the worker loop and, "
            f"here, other people's jobs (load average during (b) {b.extra['load'][0]} -> {b.extra['load'][1]}, "
            f"during (c) {c.extra['load'][0]} -> {c.extra['load'][1]}). The feed factor is the load-independent "
            "measure of the pipeline.")
        if summary["efficiency"] > 1.0:
            out.append("- An efficiency above 1 cannot come from the pipeline: (c) ran while the machine was less "
                       "loaded than during (b). Re-run on a quiet machine (or a GPU node) for a clean ratio.")
    if enc["device"] == "cpu":
        out.append("- On a GPU node the encoder does not share its device with decoding and the driver, so the "
                   "CPU contention inside (c) costs less there.")
    out.append(
        f"- The worker keeps at most {settings.broker.max_poll_records * settings.ingest.max_inflight_batches} videos "
        f"between poll and commit ({settings.ingest.max_inflight_batches} batches of up to "
        f"{settings.broker.max_poll_records}) and commits in poll order, so the first points appear only once the "
        f"first poll batch is encoded ({e2e['first_point_s']:.1f} s here); the encoder keeps working meanwhile, so "
        "this delays visibility, not throughput.")
    out.append(
        f"- Memory: the worker process's peak RSS moved {summary['rss_growth_worker']:+.1%} and the encoder actor's "
        f"{summary['rss_growth_encoder']:+.1%} between {summary['rss_at']} and {args.n} videos; the decoded "
        "pixels travel through the Ray object store, never through the worker process.")
    return out


# ============================================================================ main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=None, help="number of videos (default 200; --quick: 40)")
    parser.add_argument("--preset", default=None, help="model preset (default vit-b-32; --quick: tiny)")
    parser.add_argument("--quick", action="store_true",
                        help="small run (N=40, tiny model); results go to .bench/results unless --out-dir")
    parser.add_argument("--rss-at", type=int, default=50,
                        help="first memory checkpoint, in videos stored (default 50; N/4 when N is smaller)")
    parser.add_argument("--seed", type=int, default=0, help="synthetic dataset seed")
    parser.add_argument("--num-cpus", type=int, default=None,
                        help="Ray logical CPUs (default: enough for the encoder actors and the decode tasks)")
    parser.add_argument("--out-dir", type=Path, default=None, help="where ingest.md / ingest.png go")
    parser.add_argument("--realistic", action="store_true",
                        help="camera-like 480p-1080p files of 10 s to 2 min (segments on) instead of synthetic "
                             "clips; results in ingest-realistic.md")
    args = parser.parse_args(argv)
    args.n = args.n or (40 if args.quick else 200)
    args.preset = args.preset or ("tiny" if args.quick else "vit-b-32")
    if args.n < 2:
        parser.error("--n must be at least 2")
    if args.rss_at >= args.n:
        args.rss_at = max(1, args.n // 4)
    defaults = IngestSettings()
    args.num_cpus = args.num_cpus or max(os.cpu_count() or 1, defaults.encoder_actors + defaults.decode_parallelism)
    args.out_dir = args.out_dir or (common.CACHE_DIR / "results" if args.quick else common.DOCS_DIR)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    facts = common.machine_facts()
    common.CACHE_DIR.mkdir(exist_ok=True)
    if args.realistic:
        manifest = realistic_set()
        uris = [Path(json.loads(line)["path"]).as_uri() for line in manifest.read_text().splitlines()]
        args.n = len(uris)
        args.rss_at = max(1, args.n // 4)
        videos_dir = common.CACHE_DIR / "decode-videos"
        synth = {"realistic": [(spec.name, copies) for spec, copies in REALISTIC]}
    else:
        manifest = common.synthetic_set(args.n, args.seed, workers=min(4, os.cpu_count() or 1))
        synth = json.loads((manifest.parent / INFO_NAME).read_text())
        uris = [r.uri for r in load_manifest(manifest)]
        videos_dir = manifest.parent / "videos"

    run_dir = common.CACHE_DIR / f"ingest-run-{os.getpid()}"
    run_dir.mkdir(parents=True)
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    broker = None
    try:
        broker = EmbeddedBroker(partitions=BrokerSettings().partitions).start()
        settings = bench_settings(args, videos_dir, run_dir, broker.bootstrap)
        # The pool first: decode tasks need its input size and frame count, exactly as the
        # worker derives them from the pool's info. It idles (no CPU) while (a) runs.
        pool = EncoderPool(settings)
        info = pool.info
        resize_to = info.image_size
        wanted = info.num_frames if settings.decode.sampling == "uniform" else settings.decode.max_frames
        num_frames = max(1, min(wanted, info.max_frames, settings.decode.max_frames))

        print(f"(a) decode-only: {args.n} videos ...", flush=True)
        decode, frames_refs, counts, windows = decode_only(uris, settings, num_frames, resize_to)
        print(f"    {decode.seconds:.2f}s, {decode.videos_per_s:.2f} videos/s", flush=True)
        print("(b) encode-only ...", flush=True)
        encode, enc = encode_only(settings, pool, frames_refs, counts, windows)
        print(f"    {encode.seconds:.2f}s, {encode.videos_per_s:.3f} videos/s, {encode.frames_per_s:.1f} frames/s",
              flush=True)
        del frames_refs
        wait_for_no_encoders()

        gpu: dict[str, Any] = {"value": "not measured", "ok": None,
                               "note": "no GPU available on this machine; the frames/s target is not measured"}
        if enc["gpu"] and enc["device"].startswith("cuda"):
            raw = raw_gpu_forward(args.preset, settings.ingest.encoder_batch_frames)
            name = facts["gpu"] or "GPU"
            is_target = args.preset == "vit-b-32" and "H200" in str(name)
            gpu = {"value": f"{encode.frames_per_s:,.0f} (bare bf16 forward: {raw:,.0f})",
                   "ok": (encode.frames_per_s >= GPU_FRAMES_TARGET) if is_target else None,
                   "note": f"{name}: encode-only {encode.frames_per_s:,.0f} frames/s, bare bf16 forward of the image "
                           f"tower {raw:,.0f} frames/s" + ("" if is_target else " (target is for vit-b-32 on an H200)")}

        from vidsearch.store_schema import collection_name

        settings = settings.model_copy(update={"ray": settings.ray.model_copy(
            update={"address": ray.get_runtime_context().gcs_address})})
        collection = collection_name(enc["model_version"], settings.store.alias)
        print(f"(c) end-to-end through Kafka with a worker subprocess ({args.n} videos) ...", flush=True)
        e2e_stage, e2e = end_to_end(settings, manifest, args.n, collection, args.rss_at, run_dir,
                                    points=decode.extra["segments"])
        print(f"    {e2e_stage.seconds:.2f}s, {e2e_stage.videos_per_s:.3f} videos/s", flush=True)
    finally:
        from vidsearch.store import shutdown_embedded_store

        try:
            if "settings" in locals():
                shutdown_embedded_store(settings)
        finally:
            ray.shutdown()
            if broker is not None:
                broker.stop()
            # Keep the worker's log next to the results; the store and config go.
            results_dir = common.CACHE_DIR / "results"
            results_dir.mkdir(parents=True, exist_ok=True)
            if (run_dir / "worker.log").exists():
                shutil.copy(run_dir / "worker.log", results_dir / "ingest-worker.log")
            shutil.rmtree(run_dir, ignore_errors=True)
    load1, load5, _ = os.getloadavg()

    stages = [decode, encode, e2e_stage]
    summary = summarise(decode, encode, e2e_stage, e2e, enc, args.rss_at)
    summary["efficiency_target"] = REALISTIC_EFFICIENCY_TARGET if args.realistic else EFFICIENCY_TARGET
    print_results(args, stages, summary, e2e, enc, gpu)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = "ingest-realistic" if args.realistic else "ingest"
    png = args.out_dir / f"{stem}.png"
    plot(png, stages, e2e, f"vidsearch ingest, {args.n} videos, {args.preset}, {enc['device']} "
                           f"({facts['cpu_count']} cores{', ' + str(facts['gpu']) if facts['gpu'] else ''})")
    write_markdown(args.out_dir / f"{stem}.md", png.name, args, settings, facts, stages, summary, e2e, enc, gpu,
                   synth, (load1, load5))
    raw = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "machine": facts,
           "stages": [{**asdict(s), "videos_per_s": s.videos_per_s, "frames_per_s": s.frames_per_s} for s in stages],
           "summary": summary, "encoder": enc, "gpu": gpu, "e2e": e2e}
    (common.CACHE_DIR / "results").mkdir(parents=True, exist_ok=True)
    (common.CACHE_DIR / "results" / f"{stem}.json").write_text(json.dumps(raw, indent=1, default=str))
    print(f"wrote {args.out_dir / (stem + '.md')} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
