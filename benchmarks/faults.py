"""Fault injection: the real embedded stack under a bounded load, one fault at a time.

One run brings up ``vidsearch up`` on 127.0.0.1 (tiny preset, untrained; a few hundred
small synthetic videos written by ``vidsearch synth``), ingests a baseline through
Kafka with a few bad messages for the DLQ, then injects, in this order:

- **reranker**: SIGKILL of the reranker's Serve replica under a search load of 4 gRPC
  clients (target: 0 failed; p99 during the outage <= 2x p99 before; re-ranking back
  within 30 s);
- **alias_flip**: ``vidsearch reindex`` to a new model version during the search load
  (target: 0 failed, 0 responses that mix versions);
- **store**: SIGKILL of the embedded store's Ray actor during ingestion and search
  (target: 0 acknowledged writes lost; searches fail with UNAVAILABLE, never INTERNAL,
  until it is back);
- **worker_loop**: the ingest worker SIGKILLed again and again during ingestion
  (target: 0 lost, 0 duplicated, lag back to 0);
- **restart**: the stack stopped (SIGTERM) and then SIGKILLed with N messages published
  but not yet ingested, then started again (target: N of N ingested, 0 duplicates; DLQ
  records and offsets survive);
- **training**: no stack; two tiny 2-worker Ray Train runs in a process of their own
  (benchmarks/faults_training.py), one with a worker SIGKILLed mid-stage (target: the run
  resumes by itself and ends with the weights of the uninterrupted run).

Each fault counts sent, failed, degraded, lost, duplicated and seconds to recover, with
search throughput and p99 before, during and after the fault as ratios (and ingestion
throughput where it ingests). Writes docs/benchmarks/faults.md, faults.json and
faults.png (``--quick``: under .bench/results).

    python benchmarks/faults.py            # 600 small videos, every fault
    python benchmarks/faults.py --quick    # a few dozen videos, shorter windows
    python benchmarks/faults.py --quick --only store,worker_loop
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import common

common.isolate_environment()

import faults_cases  # noqa: E402
import faults_report  # noqa: E402
import search_load  # noqa: E402
from faults_cases import FAULTS, ORDER, Bench, IngestMonitor, Plan  # noqa: E402
import faults_training  # noqa: E402

# The training fault needs no stack: last, in a process (and a Ray) of its own.
FAULTS = {**FAULTS, "training": faults_training.training}
ORDER = (*ORDER, "training")
from stack_run import wait_until  # noqa: E402

# kafka-python logs every refused connection while a stack is down, which is the point here.
logging.getLogger("kafka").setLevel(logging.CRITICAL)

FULL = Plan(baseline=100, bad_messages=3, store_videos=100, loop_videos=320, loop_kills=4, restart_videos=40,
            window_s=20.0)
QUICK = Plan(baseline=8, bad_messages=2, store_videos=12, loop_videos=12, loop_kills=2, restart_videos=4,
             window_s=6.0)
BAD_MESSAGE = b"{this is not json"


def warm_up(bench: Bench, timeout_s: float = 600.0) -> int:
    """Searches until three come back re-ranked (each replica loads its model on its first
    request); returns how many were sent."""
    import grpc

    from vidsearch.v1 import search_pb2_grpc

    channel = grpc.insecure_channel(bench.stack.grpc_address)
    stub = search_pb2_grpc.SearchServiceStub(channel)
    sent = reranked = 0
    deadline = time.monotonic() + timeout_s
    try:
        while reranked < 3:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no re-ranked answers within {timeout_s:g}s")
            sample = search_load.search_once(stub, bench.queries[sent % len(bench.queries)], app="vidsearch",
                                             deadline_s=bench.plan.deadline_s, top_k=5)
            sent += 1
            reranked += sample.code == "OK" and sample.reranked
            if sample.code != "OK":
                time.sleep(1.0)
    finally:
        channel.close()
    return sent


def baseline(bench: Bench) -> dict[str, Any]:
    """The DLQ's bad messages and the first videos, ingested with nothing failing."""
    p = bench.plan
    bench.broker.publish_raw([(f"bad-{i}".encode(), BAD_MESSAGE) for i in range(p.bad_messages)])
    ops = bench.take(p.baseline)
    with IngestMonitor(bench.broker) as monitor:
        t0 = time.monotonic()
        bench.publish(ops)
        t_drained = bench.wait_drained("baseline")
    wait_until(lambda: bench.broker.dlq_records() >= p.bad_messages, "the bad messages in the DLQ", 60)
    warm = warm_up(bench)
    missing = bench.missing([op.video_id for op in ops])
    bench.ingested |= {op.video_id for op in ops} - set(missing)
    bench.baseline_rate = faults_cases.steady_rate(monitor.timeline, t_drained)
    return {"videos": len(ops), "bad_messages": p.bad_messages, "dlq": bench.broker.dlq_records(),
            "seconds": t_drained - t0, "rate_per_s": faults_cases.steady_rate(monitor.timeline, t_drained),
            "missing": len(missing), "warm_up_requests": warm}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="a few dozen videos and 6 s windows; results go to .bench/results unless --out-dir")
    parser.add_argument("--only", default=",".join(ORDER),
                        help=f"comma-separated faults to inject, in the run's order ({', '.join(ORDER)})")
    for name, what in (("baseline", "videos ingested before the faults"),
                       ("store-videos", "videos ingested during the store fault"),
                       ("loop-videos", "videos ingested during the worker kill loop"),
                       ("loop-kills", "worker SIGKILLs in the loop"),
                       ("restart-videos", "messages published per restart variant")):
        parser.add_argument(f"--{name}", type=int, default=None, help=what)
    parser.add_argument("--window-s", type=float, default=None, help="before/after window (default 20; --quick 6)")
    parser.add_argument("--clients", type=int, default=4, help="gRPC search clients (default 4)")
    parser.add_argument("--rate", type=float, default=2.0, help="searches per second per client (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="synthetic dataset seed")
    parser.add_argument("--out-dir", type=Path, default=None, help="where faults.md/.json/.png go")
    parser.add_argument("--keep", action="store_true", help="keep the run directory (logs, store, broker data)")
    args = parser.parse_args(argv)
    args.faults = [f.strip() for f in args.only.split(",") if f.strip()]
    unknown = [f for f in args.faults if f not in FAULTS]
    if unknown or not args.faults:
        parser.error(f"--only: unknown fault(s) {unknown}; choose from {', '.join(ORDER)}")
    args.faults = [f for f in ORDER if f in args.faults]
    base = QUICK if args.quick else FULL
    sizes = {"baseline": args.baseline, "store_videos": args.store_videos, "loop_videos": args.loop_videos,
             "loop_kills": args.loop_kills, "restart_videos": args.restart_videos, "window_s": args.window_s}
    plan = Plan(**{**vars(base), **{k: v for k, v in sizes.items() if v is not None},
                   "clients": args.clients, "rate": args.rate})
    if plan.baseline < 1 or plan.loop_kills < 1 or min(plan.store_videos, plan.loop_videos, plan.restart_videos) < 1:
        parser.error("every size must be at least 1")
    args.plan = plan
    args.out_dir = args.out_dir or (common.CACHE_DIR / "results" if args.quick else common.DOCS_DIR)
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    from vidsearch.services.ingest.producer import ops_from_manifest
    from vidsearch.synth import load_manifest

    plan: Plan = args.plan
    manifest = common.synthetic_set(plan.total_videos, args.seed, workers=min(2, os.cpu_count() or 1))
    queries = list(dict.fromkeys(r.captions[0] for r in load_manifest(manifest)))
    root = common.CACHE_DIR / f"faults-run-{os.getpid()}"
    bench = Bench(root, manifest.parent / "videos", ops_from_manifest(manifest), queries, plan)
    out: dict[str, Any] = {"plan": vars(plan), "faults": {}, "errors": {}}
    try:
        out["first_up_s"] = bench.start_stack(worker=True)
        out["baseline"] = baseline(bench)
        bench.say(f"baseline: {out['baseline']['videos']} videos in {out['baseline']['seconds']:.1f}s, "
                  f"{out['baseline']['dlq']} DLQ records")
        for name in args.faults:
            bench.say(f"--- fault: {name}")
            try:
                result = FAULTS[name](bench)
            except Exception as exc:  # noqa: BLE001 - reported; later faults still run if the stack lives
                out["errors"][name] = f"{type(exc).__name__}: {exc}"[:3000]
                bench.say(f"{name} failed: {out['errors'][name][:500]}")
                if bench.stack is None or bench.stack.proc.poll() is not None:
                    break
                continue
            out["faults"][name] = result
            bench.say(f"{name}: target {'met' if result['target'] else 'MISSED'} {result['checks']}")
    finally:
        if bench.stack is not None and bench.stack.proc.poll() is None:
            bench.close_broker()
            out["final_stop"] = bench.stack.stop()
        results_dir = common.CACHE_DIR / "results"
        results_dir.mkdir(parents=True, exist_ok=True)
        for log in sorted(root.glob("up-*.log")):
            shutil.copy(log, results_dir / f"faults-{log.name}")
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        out["log"] = bench.log
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    facts = common.machine_facts()
    common.CACHE_DIR.mkdir(exist_ok=True)
    started = time.monotonic()
    out = run(args)
    out["seconds"] = time.monotonic() - started
    load1, load5, _ = os.getloadavg()
    out["machine"] = facts
    out["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "plan"}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "faults.json").write_text(json.dumps(out, indent=1, default=str))
    faults_report.plot(args.out_dir / "faults.png", out)
    faults_report.write_markdown(args.out_dir / "faults.md", "faults.png", args, out, facts, (load1, load5))
    faults_report.print_summary(out)
    print(f"wrote {args.out_dir / 'faults.md'}, faults.json and faults.png")
    return 0 if not out["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
