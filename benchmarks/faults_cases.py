"""The faults of benchmarks/faults.py, one function each (imported as ``faults_cases``).

Each takes the :class:`Bench` (the running stack, the dataset, the sizes) and returns a
plain dict of what it counted: the numbers, the before / during / after windows of the
search load (and of ingestion where there is one), and ``target``, the issue's target,
checked. They run in the order of :data:`ORDER`, on one stack; the restart fault comes
last because it stops that stack and starts others on the same data.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import grpc

import search_load
import stack_run
from search_load import SearchLoad, phases
from stack_run import BrokerView, StackProcess, wait_until

ORDER = ("reranker", "alias_flip", "store", "worker_loop", "restart")
RERANK_BACK_TARGET_S = 30.0
P99_RATIO_TARGET = 2.0
SETTLE_ANSWERS = 8  # consecutive good answers that count as "recovered"


@dataclass
class Plan:
    """The sizes of one run (see faults.py's --quick)."""

    baseline: int  # videos ingested before the first fault
    bad_messages: int  # messages that go to the DLQ at the start
    store_videos: int  # ingested while the store actor is killed
    loop_videos: int  # ingested while the worker is killed again and again
    loop_kills: int
    restart_videos: int  # published per restart variant (SIGTERM, SIGKILL) while no worker runs
    window_s: float  # length of the before and after windows
    clients: int = 4
    rate: float = 2.0  # requests per second per client
    deadline_s: float = 10.0
    recover_timeout_s: float = 300.0

    @property
    def total_videos(self) -> int:
        return self.baseline + self.store_videos + self.loop_videos + 2 * self.restart_videos


class Bench:
    """The run's state: the stack that is up, its broker, the dataset's unused videos."""

    def __init__(self, root: Path, videos_dir: Path, ops: Sequence[Any], queries: Sequence[str], plan: Plan) -> None:
        self.root, self.videos_dir, self.plan = root, videos_dir, plan
        self.ops = list(ops)
        self.queries = list(queries)
        self.used = 0
        self.stacks = 0
        self.stack: StackProcess | None = None
        self.broker: BrokerView | None = None
        self.ingested: set[str] = set()  # video ids every later check expects in the store
        self.baseline_rate = float("nan")  # videos/s the baseline was ingested at
        self.log: list[str] = []

    def say(self, text: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {text}"
        self.log.append(line)
        print(line, flush=True)

    # -- stack ---------------------------------------------------------------
    def launch(self, *, worker: bool = True) -> StackProcess:
        """Start ``vidsearch up`` on the run's data (store, registry, broker data); not waited for."""
        self.stacks += 1
        self.stack = StackProcess(self.root, self.videos_dir, worker=worker, name=f"up-{self.stacks}")
        return self.stack

    def start_stack(self, *, worker: bool = True) -> float:
        """:meth:`launch` and wait until it is up; seconds that took."""
        self.launch(worker=worker)
        seconds = self.stack.wait_up()
        self.broker = BrokerView(self.stack.bootstrap)
        self.say(f"stack {self.stacks} up after {seconds:.1f}s (worker: {worker}, pid {self.stack.pid})")
        return seconds

    def close_broker(self) -> None:
        if self.broker is not None:
            self.broker.close()
            self.broker = None

    def take(self, n: int) -> list[Any]:
        ops = self.ops[self.used:self.used + n]
        if len(ops) < n:
            raise RuntimeError(f"the dataset has {len(self.ops)} videos, the plan needs more")
        self.used += n
        return ops

    def publish(self, ops: Sequence[Any]) -> float:
        from vidsearch.services.ingest.producer import publish

        started = time.monotonic()
        publish(self.stack.bootstrap, "videos.ingest", list(ops), partitions=4, progress=False)
        seconds = time.monotonic() - started
        self.broker.refresh()
        return seconds

    def wait_drained(self, what: str, timeout_s: float | None = None) -> float:
        """Until the worker committed everything published; returns when (monotonic)."""
        wait_until(lambda: self.broker.lag() == 0, f"{what}: consumer lag back to 0",
                   timeout_s or self.plan.recover_timeout_s, check=self.stack.check_alive)
        return time.monotonic()

    def load(self) -> SearchLoad:
        p = self.plan
        return SearchLoad(self.stack.grpc_address, self.queries, clients=p.clients, rate=p.rate,
                          deadline_s=p.deadline_s).start()

    def missing(self, video_ids: Sequence[str]) -> list[str]:
        """Of ``video_ids``, those the live index does not hold (gRPC GetVideo, retried on
        transient codes)."""
        from vidsearch.v1 import search_pb2, search_pb2_grpc

        channel = grpc.insecure_channel(self.stack.grpc_address)
        stub = search_pb2_grpc.SearchServiceStub(channel)
        metadata = [("application", stack_run.APP_NAME)]
        absent = []
        try:
            for video_id in video_ids:
                for attempt in range(5):
                    try:
                        stub.GetVideo(search_pb2.GetVideoRequest(video_id=video_id), metadata=metadata, timeout=30)
                        break
                    except grpc.RpcError as exc:
                        if exc.code() == grpc.StatusCode.NOT_FOUND:
                            absent.append(video_id)
                            break
                        if attempt == 4:
                            raise
                        time.sleep(1.0)
        finally:
            channel.close()
        return absent


class IngestMonitor:
    """Samples the consumer group's committed total every ``interval_s`` on a thread."""

    def __init__(self, broker: BrokerView, interval_s: float = 0.5) -> None:
        self.broker = broker
        self.interval_s = interval_s
        self.timeline: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "IngestMonitor":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.timeline.append((time.monotonic(), sum(self.broker.committed().values())))
            except Exception:  # noqa: BLE001 - a broker hiccup is a gap in the timeline
                pass
            self._stop.wait(self.interval_s)

    def committed_at(self, t: float) -> int:
        before = [c for when, c in self.timeline if when <= t]
        return before[-1] if before else (self.timeline[0][1] if self.timeline else 0)

    def rate(self, start: float, end: float) -> float:
        """Videos committed per second in [start, end)."""
        if end <= start:
            return float("nan")
        return (self.committed_at(end) - self.committed_at(start)) / (end - start)


def ingest_phases(before_per_s: float, monitor: IngestMonitor, during: tuple[float, float],
                  after: tuple[float, float] | None) -> dict[str, Any]:
    """Ingestion throughput during and after a fault against ``before_per_s``, the baseline's
    (the same worker on the same stack with nothing failing): a fault phase's own time before
    the kill is a fraction of a second, too short to measure a rate."""
    d = monitor.rate(*during)
    a = monitor.rate(*after) if after is not None else float("nan")
    return {"before_per_s": before_per_s, "during_per_s": d, "after_per_s": a,
            "during_before": search_load.ratio(d, before_per_s), "after_before": search_load.ratio(a, before_per_s)}


def backlog_rate(before_per_s: float, videos: int, start: float, end: float) -> dict[str, Any]:
    """``videos`` committed between ``start`` and ``end``, per second, against ``before_per_s``."""
    rate = videos / (end - start) if end > start else float("nan")
    return {"after_per_s": rate, "after_before": search_load.ratio(rate, before_per_s)}


def recovered_at(load: SearchLoad, since: float, good: Callable[[search_load.Sample], bool],
                 timeout_s: float) -> float | None:
    """When the answers became good for good: the instant the first of SETTLE_ANSWERS
    consecutive good answers (by send time, sent after ``since``) came back; None on timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        after = [s for s in load.snapshot() if s.t >= since]
        run = 0
        for i, sample in enumerate(after):
            run = run + 1 if good(sample) else 0
            if run >= SETTLE_ANSWERS:
                first = after[i - SETTLE_ANSWERS + 1]
                return first.t + first.latency_s
        time.sleep(0.5)
    return None


def steady_rate(timeline: Sequence[tuple[float, int]], end: float) -> float:
    """Videos committed per second from the first commit in ``timeline`` to ``end`` (the
    first poll batch's own processing time is left out: it precedes the first commit)."""
    if not timeline:
        return float("nan")
    start_count = timeline[0][1]
    first = next(((t, c) for t, c in timeline if c > start_count), None)
    last = [c for t, c in timeline if t <= end]
    if first is None or not last or end <= first[0]:
        return float("nan")
    return (last[-1] - first[1]) / (end - first[0])


def upserts(stack: StackProcess) -> float:
    """The running worker's upsert counter (0 while no worker answers)."""
    return stack.worker_metrics().get("vidsearch_ingest_videos_total", 0.0)


def wait_stored_beyond(bench: Bench, floor: float, what: str) -> bool:
    """Until the worker has stored more than ``floor`` videos (its own counter, read every
    50 ms: the moment a batch is written, before its offsets are committed), or nothing is
    left to ingest; True when it stored more."""
    stack = bench.stack
    deadline = time.monotonic() + bench.plan.recover_timeout_s
    while time.monotonic() < deadline:
        stack.check_alive()
        if upserts(stack) > floor:
            return True
        if bench.broker.lag() == 0:
            return False
        time.sleep(0.05)
    raise TimeoutError(f"timed out waiting for {what}")


def kill(pids: Sequence[int]) -> None:
    for pid in pids:
        os.kill(pid, signal.SIGKILL)


def summarise_windows(ph: dict[str, Any]) -> dict[str, Any]:
    return {k: (asdict(v) if isinstance(v, search_load.Window) else v) for k, v in ph.items()}


def timeline(samples: Sequence[search_load.Sample], t0: float, marks: dict[str, float | None],
             during: tuple[float, float]) -> dict[str, Any]:
    """Every request relative to the fault (for the plot and the JSON), the instants that
    matter, and the slowest answers of the ``during`` window (what a p99 is made of)."""
    inside = sorted((s for s in samples if during[0] <= s.t < during[1] and s.code == "OK"),
                    key=lambda s: -s.latency_s)
    return {"samples": [[round(s.t - t0, 3), round(1000 * s.latency_s, 1), s.code, s.reranked, s.skipped]
                        for s in samples],
            "marks": {k: (None if v is None else round(v - t0, 3)) for k, v in marks.items()},
            "slowest_during": [{"at_s": round(s.t - t0, 2), "ms": round(1000 * s.latency_s, 1), "reranked": s.reranked,
                                "skipped": s.skipped} for s in inside[:5]]}


# ============================================================================ the faults
def reranker(bench: Bench) -> dict[str, Any]:
    """SIGKILL the reranker's Serve replica under the search load."""
    p, stack = bench.plan, bench.stack
    load = bench.load()
    time.sleep(p.window_s)
    victims = stack.reranker_pids()
    if not victims:
        load.stop()
        raise RuntimeError("no reranker replica process found below the stack")
    t_kill, wall_kill = time.monotonic(), time.time()
    kill(victims)
    bench.say(f"reranker: SIGKILLed replica pid(s) {victims}")
    back = recovered_at(load, t_kill, lambda s: s.code == "OK" and s.reranked, p.recover_timeout_s)
    t_back = back if back is not None else time.monotonic()
    time.sleep(p.window_s)
    samples = load.stop()
    ph = phases(samples, (t_kill - p.window_s, t_kill), (t_kill, t_back), (t_back, t_back + p.window_s))
    back_s = None if back is None else back - t_kill
    # When Serve's controller noticed (its log line), and how the slow answers of the outage split.
    noticed = stack.log_time("crashed, marking it unhealthy", "deployment='Reranker'", after=wall_kill)
    noticed_s = None if noticed is None else noticed - wall_kill
    slow = [s for s in samples if t_kill <= s.t < t_back and s.code == "OK" and s.latency_s >= 1.0]
    early = [s for s in slow if noticed_s is not None and s.t - t_kill <= noticed_s]
    failed = sum(1 for s in samples if s.code != "OK")
    ratio = ph["p99_during_before"]
    checks = {"0 failed": failed == 0, "p99 during <= 2x before": ratio == ratio and ratio <= P99_RATIO_TARGET,
              "re-ranking back within 30 s": back_s is not None and back_s <= RERANK_BACK_TARGET_S}
    return {"killed": victims, "new_replica": stack.reranker_pids(), "sent": len(samples), "failed": failed,
            "controller_noticed_s": noticed_s, "slow_during": len(slow), "slow_before_noticed": len(early),
            "slow_reasons": sorted({str(s.skipped) for s in slow}),
            "slow_ms": [round(1000 * s.latency_s) for s in slow],
            "degraded": sum(1 for s in samples if s.code == "OK" and not s.reranked), "lost": 0,
            "duplicated": 0, "recover_s": back_s, "windows": summarise_windows(ph),
            "failure_codes": codes_of(samples), "checks": checks, "target": all(checks.values()),
            "timeline": timeline(samples, t_kill, {"kill": t_kill, "back": back}, (t_kill, t_back))}


def codes_of(samples: Sequence[search_load.Sample]) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in samples:
        if s.code != "OK":
            out[s.code] = out.get(s.code, 0) + 1
    return out


def publish_new_version(bench: Bench) -> str:
    """A new model version of the tiny preset in the stack's registry: the base model's
    weights with a re-drawn text projection (same frame encoder, so the re-index
    recomputes from stored frames)."""
    import torch

    from vidsearch.models import build_model, load_model_config
    from vidsearch.models.persist import BASE_SEED, save_model_version
    from vidsearch.registry import ModelRegistry

    env = bench.stack.env
    model = build_model(load_model_config(env["VIDSEARCH_MODEL__PRESET"]), device="cpu", seed=BASE_SEED)
    generator = torch.Generator().manual_seed(27)
    with torch.no_grad():
        projection = model.clip.text_projection
        projection.add_(torch.randn(projection.shape, generator=generator) * float(projection.std()))
    registry = ModelRegistry(env["VIDSEARCH_MODEL__REGISTRY_ROOT"])
    return save_model_version(registry, "vidsearch", model, training={"note": "benchmarks/faults.py alias flip"})


def alias_flip(bench: Bench) -> dict[str, Any]:
    """``vidsearch reindex`` to a new model version (alias flip) under the search load."""
    p, stack = bench.plan, bench.stack
    version = publish_new_version(bench)
    load = bench.load()
    time.sleep(p.window_s)
    t0 = time.monotonic()
    done = stack.run_cli("reindex", "--version", version, "--no-progress")
    t1 = time.monotonic()
    bench.say(f"alias flip: reindex exited {done.returncode} after {t1 - t0:.1f}s: "
              f"{(done.stdout or done.stderr).strip().splitlines()[:1]}")
    # Until the ingress noticed the flip (serve.alias_poll_s) answers may still name the old version.
    serving_new = recovered_at(load, t1, lambda s: s.code == "OK" and s.model_version == version, p.recover_timeout_s)
    t_after = serving_new if serving_new is not None else time.monotonic()
    time.sleep(p.window_s)
    samples = load.stop()
    ph = phases(samples, (t0 - p.window_s, t0), (t0, t_after), (t_after, t_after + p.window_s))
    failed = sum(1 for s in samples if s.code != "OK")
    mixed = sum(1 for s in samples if s.code == "OK" and s.mixed)
    first_new = next((s for s in samples if s.code == "OK" and s.model_version == version), None)
    checks = {"reindex succeeded": done.returncode == 0, "0 failed": failed == 0,
              "0 responses mixing versions": mixed == 0, "new version served": serving_new is not None}
    return {"version": version, "reindex_s": t1 - t0, "reindex_exit": done.returncode,
            "reindex_output": (done.stdout + done.stderr)[-1500:], "sent": len(samples), "failed": failed,
            "degraded": sum(1 for s in samples if s.code == "OK" and not s.reranked), "mixed": mixed,
            "lost": 0, "duplicated": 0,
            "first_new_after_reindex_start_s": None if first_new is None else first_new.t + first_new.latency_s - t0,
            "recover_s": None if serving_new is None else serving_new - t1, "windows": summarise_windows(ph),
            "old_version_answers_after_reindex": sum(1 for s in samples if s.t >= t1 and s.code == "OK"
                                                     and s.model_version != version),
            "failure_codes": codes_of(samples), "checks": checks, "target": all(checks.values()),
            "timeline": timeline(samples, t0, {"reindex start": t0, "reindex end": t1, "new version": serving_new},
                                 (t0, t_after))}


def store(bench: Bench) -> dict[str, Any]:
    """SIGKILL the embedded store's Ray actor while videos are ingested and searched."""
    p, stack = bench.plan, bench.stack
    ops = bench.take(p.store_videos)
    ids = [op.video_id for op in ops]
    load = bench.load()
    time.sleep(p.window_s)  # the search load's own "before"
    half = len(ops) // 2
    with IngestMonitor(bench.broker) as monitor:
        # The first half is ingested and acknowledged; the second is in flight when the actor dies.
        if half:
            bench.publish(ops[:half])
            bench.wait_drained("store, first half")
        victims = stack.store_actor_pids()
        if not victims:
            load.stop()
            raise RuntimeError("no store actor process found below the stack")
        bench.publish(ops[half:])
        t_kill = time.monotonic()
        kill(victims)
        committed_at_kill = bench.broker.committed()
        bench.say(f"store: SIGKILLed store actor pid(s) {victims} with {len(ops) - half} videos just published")
        # Everything the worker had acknowledged by then (every phase so far: offsets are committed
        # only after the store's wait=True write) must be in the store once the actor is back.
        acknowledged = sorted({key for part, offset, key in bench.broker.records()
                               if offset < committed_at_kill.get(part, 0) and not key.startswith("bad-")})
        back = recovered_at(load, t_kill, lambda s: s.code == "OK", p.recover_timeout_s)
        t_back = back if back is not None else time.monotonic()
        t_drained = bench.wait_drained("store")
        time.sleep(max(0.0, t_back + p.window_s - time.monotonic()))
        samples = load.stop()
    new_actor = stack.store_actor_pids()
    lost = bench.missing(acknowledged)
    missing_all = bench.missing(ids)
    bench.ingested |= set(ids) - set(missing_all)
    points = stack.status().get("points")
    duplicated = None if points is None else max(0, int(points) - len(bench.ingested))
    ph = phases(samples, (t_kill - p.window_s, t_kill), (t_kill, t_back), (t_back, t_back + p.window_s))
    outage = [s for s in samples if t_kill <= s.t < t_back]
    codes = codes_of(samples)
    back_s = None if back is None else t_back - t_kill
    checks = {"0 acknowledged writes lost": not lost and bool(acknowledged),
              "searches fail with UNAVAILABLE only (never INTERNAL)": set(codes) <= {"UNAVAILABLE"},
              "searches answer again": back is not None, "every video ingested in the end": not missing_all}
    return {"killed": victims, "new_actor": new_actor, "videos": len(ids), "acknowledged_at_kill": len(acknowledged),
            "lost": len(lost), "lost_ids": lost[:20], "missing_at_end": len(missing_all), "duplicated": duplicated,
            "in_flight_at_kill": len(ops) - half, "points": points,
            "sent": len(samples), "failed": sum(codes.values()), "failure_codes": codes,
            "failure_details": sorted({s.details[:160] for s in samples if s.code != "OK"})[:6],
            "outage_answers": {"sent": len(outage), "ok": sum(1 for s in outage if s.code == "OK")},
            "degraded": sum(1 for s in samples if s.code == "OK" and not s.reranked),
            "recover_s": back_s, "drained_after_kill_s": t_drained - t_kill, "windows": summarise_windows(ph),
            "ingest": {**ingest_phases(bench.baseline_rate, monitor, (t_kill, t_back), None),
                       # The in-flight videos, committed between the store's return and the drain.
                       **backlog_rate(bench.baseline_rate, len(ops) - half, t_back, t_drained)},
            "checks": checks, "target": all(checks.values()),
            "timeline": timeline(samples, t_kill, {"kill": t_kill, "back": back, "drained": t_drained},
                                 (t_kill, t_back))}


def worker_loop(bench: Bench) -> dict[str, Any]:
    """SIGKILL the stack's ingest worker again and again while videos are ingested;
    `vidsearch up` restarts it each time."""
    p, stack = bench.plan, bench.stack
    ops = bench.take(p.loop_videos)
    ids = [op.video_id for op in ops]
    load = bench.load()
    time.sleep(p.window_s)  # the search load's own "before"
    kills: list[dict[str, Any]] = []
    # The running worker's counter already holds what it ingested in earlier phases.
    floor = upserts(stack)
    upserts_seen = -floor
    with IngestMonitor(bench.broker) as monitor:
        bench.publish(ops)
        wait_stored_beyond(bench, floor, "the worker to store a batch")
        t_first = time.monotonic()
        victim = 0
        for k in range(p.loop_kills):
            if k > 0:
                # Each incarnation is killed as it writes its first batch (a worker that never
                # polled tests nothing); once the backlog is gone there is nothing to interrupt.
                wait_until(lambda: [pid for pid in stack.worker_pids() if pid != victim], "a restarted worker",
                           p.recover_timeout_s, check=stack.check_alive)
                if not wait_stored_beyond(bench, 0.0, "the restarted worker to store a batch"):
                    bench.say(f"worker loop: backlog drained after {k} kill(s); no more to interrupt")
                    break
            (victim, *_) = stack.worker_pids()
            stored = upserts(stack)
            upserts_seen += stored
            t = time.monotonic()
            kill([victim])
            kills.append({"t": t, "pid": victim, "committed": sum(bench.broker.committed().values()),
                          "upserts_before_kill": stored})
            bench.say(f"worker loop: SIGKILL {k + 1}/{p.loop_kills} of worker pid {victim}")
        t_last = time.monotonic()
        t_drained = bench.wait_drained("worker loop")
        final = wait_until(lambda: stack.worker_metrics() or None, "the last worker's metrics", 60)
        upserts_seen += final.get("vidsearch_ingest_videos_total", 0.0)
        time.sleep(max(0.0, t_drained + p.window_s - time.monotonic()))
        samples = load.stop()
    missing = bench.missing(ids)
    bench.ingested |= set(ids) - set(missing)
    status = stack.status()
    points = status.get("points")
    expected = len(bench.ingested)
    duplicated = None if points is None else max(0, int(points) - expected)
    ph = phases(samples, (t_first - p.window_s, t_first), (t_first, t_drained), (t_drained, t_drained + p.window_s))
    checks = {"0 lost": not missing, "0 duplicated": duplicated == 0, "lag back to 0": bench.broker.lag() == 0}
    return {"videos": len(ids), "kills": len(kills), "kill_times_s": [round(k["t"] - t_first, 1) for k in kills],
            "lost": len(missing), "lost_ids": missing[:20], "points": points, "expected_points": expected,
            "duplicated": duplicated, "reprocessed_at_least": max(0, int(upserts_seen) - len(ids)),
            "restarts_seen": len({k["pid"] for k in kills}), "recover_s": t_drained - t_last,
            "sent": len(samples), "failed": sum(1 for s in samples if s.code != "OK"),
            "failure_codes": codes_of(samples),
            "degraded": sum(1 for s in samples if s.code == "OK" and not s.reranked),
            "windows": summarise_windows(ph),
            "ingest": ingest_phases(bench.baseline_rate, monitor, (t_first, t_drained), None),
            "lag_end": bench.broker.lag(), "checks": checks, "target": all(checks.values()),
            "timeline": timeline(samples, t_first, {**{f"kill {i + 1}": k["t"] for i, k in enumerate(kills)},
                                                    "drained": t_drained}, (t_first, t_drained)),
            "committed": [[round(t - t_first, 2), c] for t, c in monitor.timeline]}


def restart(bench: Bench) -> dict[str, Any]:
    """The stack stopped (SIGTERM) and SIGKILLed with messages published but not ingested,
    then started again on the same store and broker data."""
    p = bench.plan
    broker = bench.broker
    before = {"committed": broker.committed(), "ends": broker.end_offsets(), "dlq": broker.dlq_records()}
    bench.close_broker()
    code, stop_s = bench.stack.stop()
    bench.say(f"restart: main stack stopped (SIGTERM), exit {code} after {stop_s:.1f}s")
    variants: dict[str, dict[str, Any]] = {}

    # (a) published while no worker runs, then SIGTERM.
    up_a = bench.start_stack(worker=False)
    seen_a = {"dlq": bench.broker.dlq_records(), "committed": bench.broker.committed()}
    ops_a = bench.take(p.restart_videos)
    bench.publish(ops_a)
    wait_until(lambda: bench.broker.lag() == len(ops_a), "the published messages as lag", 60)
    bench.close_broker()
    code_a, stop_a = bench.stack.stop()
    # (b) started again without a worker: (a)'s messages must still be there; publish more, SIGKILL.
    up_b = bench.start_stack(worker=False)
    lag_after_sigterm = bench.broker.lag()
    seen_b = {"dlq": bench.broker.dlq_records(), "committed": bench.broker.committed()}
    ops_b = bench.take(p.restart_videos)
    bench.publish(ops_b)
    wait_until(lambda: bench.broker.lag() == len(ops_a) + len(ops_b), "the published messages as lag", 60)
    ends_b = bench.broker.end_offsets()
    committed_b = bench.broker.committed()
    # What `vidsearch status` would call the lag: the broker's high watermarks less the committed offsets.
    watermark_lag = sum(max(v - committed_b.get(part, 0), 0) for part, v in bench.broker.watermarks().items())
    bench.close_broker()
    left = bench.stack.kill()
    bench.say(f"restart: stack SIGKILLed with {len(ops_a) + len(ops_b)} messages not ingested"
              + (f" ({len(left)} processes outlived it)" if left else ""))
    # (c) started again with its worker: everything is ingested, once. Offsets are followed from
    # the moment the broker is up: the worker may drain the backlog before Serve is deployed.
    t_start = time.monotonic()
    stack = bench.launch(worker=True)
    early = BrokerView(stack.wait_broker())
    with IngestMonitor(early) as monitor:
        up_c = stack.wait_up()
        bench.broker = BrokerView(stack.bootstrap)
        bench.say(f"stack {bench.stacks} up after {up_c:.1f}s (worker: True, pid {stack.pid})")
        seen_c = {"dlq": bench.broker.dlq_records(), "ends": bench.broker.end_offsets()}
        t_drained = bench.wait_drained("restart")
    early.close()
    # When the last pending message was committed (maybe before the stack was even up).
    t_done = next((t for t, c in monitor.timeline if c >= sum(ends_b.values())), t_drained)
    pending = len(ops_a) + len(ops_b)
    counted = lambda: bench.stack.worker_metrics().get("vidsearch_ingest_videos_total", 0.0)  # noqa: E731
    try:
        wait_until(lambda: counted() >= pending, "the worker's upsert counter", 60)
    except TimeoutError:
        pass  # fewer upserts than messages: reported below as messages not ingested
    time.sleep(2.0)  # a late redelivery would show in the counter by now
    upserts = counted()
    ids = [op.video_id for op in ops_a + ops_b]
    missing = bench.missing(ids)
    bench.ingested |= set(ids) - set(missing)
    status = bench.stack.status()
    points = status.get("points")
    variants = {
        "sigterm": {"published": len(ops_a), "lag_after_restart": lag_after_sigterm, "stop_exit": code_a,
                    "stop_s": stop_a, "dlq_after_restart": seen_b["dlq"],
                    "offsets_survived": seen_b["committed"] == before["committed"]},
        "sigkill": {"published": len(ops_b), "pending_after_restart": sum(seen_c["ends"].values())
                    - sum(before["committed"].values()), "processes_left": len(left),
                    "records_survived": seen_c["ends"] == ends_b, "dlq_after_restart": seen_c["dlq"],
                    "pending_before_kill": len(ops_a) + len(ops_b), "watermark_lag_before_kill": watermark_lag},
    }
    duplicated = None if points is None else max(0, int(points) - len(bench.ingested))
    reprocessed = int(upserts) - pending
    checks = {f"{pending} of {pending} ingested": not missing, "0 duplicates": duplicated == 0 and reprocessed == 0,
              "DLQ records survive": seen_a["dlq"] == seen_b["dlq"] == seen_c["dlq"] == before["dlq"] > 0,
              "offsets survive": seen_a["committed"] == before["committed"] == seen_b["committed"]
              and reprocessed == 0}
    return {"pending": pending, "ingested": pending - len(missing), "lost": len(missing), "lost_ids": missing[:20],
            "duplicated": duplicated, "reprocessed": reprocessed, "points": points,
            "expected_points": len(bench.ingested), "dlq_before": before["dlq"],
            "dlq_seen": [seen_a["dlq"], seen_b["dlq"], seen_c["dlq"]], "main_stop_exit": code, "main_stop_s": stop_s,
            "up_s": [up_a, up_b, up_c], "recover_s": t_done - t_start, "ingest_after_up_s": t_done - (t_start + up_c),
            "ingest_rate_after_per_s": steady_rate(monitor.timeline, t_done),
            "variants": variants, "sent": pending, "failed": len(missing), "degraded": 0,
            "checks": checks, "target": all(checks.values())}


FAULTS: dict[str, Callable[[Bench], dict[str, Any]]] = {
    "reranker": reranker, "alias_flip": alias_flip, "store": store, "worker_loop": worker_loop, "restart": restart}
