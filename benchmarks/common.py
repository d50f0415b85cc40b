"""Helpers shared by the benchmark scripts (not a library: imported as ``common`` from
``benchmarks/*.py``, whose own directory is first on ``sys.path``).

Everything here is measurement plumbing: ports, process memory from /proc, machine
facts for the report header, percentiles and Markdown tables.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
DOCS_DIR = REPO_ROOT / "docs" / "benchmarks"
# Gitignored: generated datasets, stores, logs and --quick results.
CACHE_DIR = REPO_ROOT / ".bench"

# Environment variables that would point a vidsearch process at someone else's
# cluster, broker, store or config; a benchmark always runs its own embedded pieces.
FOREIGN_ENV = ("RAY_ADDRESS", "KAFKA_BOOTSTRAP", "QDRANT_URL", "QDRANT_API_KEY", "VIDSEARCH_CONFIG",
               "VIDSEARCH_API_KEY")


def isolate_environment() -> None:
    """Drop endpoint variables and VIDSEARCH_* overrides from this process (and so
    from its children), and keep hub lookups from stalling on a machine without network."""
    for name in list(os.environ):
        if name in FOREIGN_ENV or (name.startswith("VIDSEARCH_") and "__" in name):
            os.environ.pop(name, None)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def free_port() -> int:
    """A free loopback TCP port (racy by nature; good enough for one machine)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ----------------------------------------------------------------------------- memory
@dataclass(frozen=True)
class ProcMemory:
    rss: int  # bytes resident now (VmRSS)
    peak: int  # bytes, highest resident set since the process started (VmHWM)


def proc_memory(pid: int) -> ProcMemory | None:
    """RSS and peak RSS of a process from /proc (Linux); None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024  # reported in kB
    if "VmRSS" not in values:
        return None  # a zombie has no memory lines
    return ProcMemory(rss=values["VmRSS"], peak=values.get("VmHWM", values["VmRSS"]))


def _parent_pids() -> dict[int, int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    return parents


def descendants(root: int) -> set[int]:
    """Every process below ``root`` in the process tree."""
    children: dict[int, list[int]] = {}
    for pid, parent in _parent_pids().items():
        children.setdefault(parent, []).append(pid)
    found: set[int] = set()
    stack = [root]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def pids_with_title(prefix: str, under: int | None = None) -> list[int]:
    """Processes whose command line starts with ``prefix``, optionally only those below
    process ``under``.

    Ray renames its worker processes to ``ray::<ActorClass>`` / ``ray::<task>``, which
    is how the encoder actors of a worker running in another process are found. A
    local Ray's raylet is a child of the process that called ``ray.init``, and every
    Ray worker a child of the raylet, so ``under=os.getpid()`` keeps to this run's
    cluster on a machine where other people run Ray too.
    """
    scope = descendants(under) if under is not None else None
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or (scope is not None and int(entry.name) not in scope):
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        if cmdline.startswith(prefix):
            found.append(int(entry.name))
    return sorted(found)


def mib(n_bytes: float) -> float:
    return n_bytes / (1024 * 1024)


# ----------------------------------------------------------------------------- machine
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def gpu_name() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(0)


def machine_facts() -> dict[str, object]:
    import torch

    load1, load5, _ = os.getloadavg()
    return {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "gpu": gpu_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_before": (round(load1, 2), round(load5, 2)),
    }


def machine_section(facts: dict[str, object], load_after: tuple[float, float]) -> list[str]:
    """Markdown lines describing where the numbers come from, and how far to trust them."""
    cores = int(facts["cpu_count"] or 1)
    lines = [
        f"- date: {facts['date_utc']}",
        f"- CPU: {cores} cores ({facts['cpu_model']}), {facts['memory_gib']} GiB RAM",
        f"- GPU: {facts['gpu'] or 'none (CUDA not available)'}",
        f"- torch {facts['torch']}, Python {facts['python']}",
        f"- load average (1 min, 5 min) before the run: {facts['load_before'][0]}, {facts['load_before'][1]}; "
        f"after: {load_after[0]:.2f}, {load_after[1]:.2f}",
    ]
    # Load the benchmark did not cause is visible in the 5-minute average taken before it.
    shared = max(float(facts["load_before"][1]), float(facts["load_before"][0])) > 0.25 * cores
    if facts["gpu"] is None:
        lines.append(f"- **These numbers are from a {cores}-core CPU machine"
                     + (" that other jobs were using at the same time" if shared else "")
                     + ".** Absolute times mean little (the system is built for GPUs); the ratios are the point.")
    elif shared:
        lines.append("- Other jobs were running on this machine during the run; expect noise.")
    return lines


# ----------------------------------------------------------------------------- stats
def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def md_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        out.append("| " + " | ".join(str(c) for c in row) + " |")
    return out


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**met**" if ok else "**missed**")


def command_line() -> str:
    """How this run was started, relative to the repository root."""
    script = os.path.relpath(sys.argv[0], REPO_ROOT) if os.path.isabs(sys.argv[0]) else sys.argv[0]
    return " ".join(["python", script, *sys.argv[1:]])


def write_text(path: Path, lines: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines).rstrip() + "\n")


def proc_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds a process has used so far (from /proc/<pid>/stat)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces; the fields after its ')' are fixed.
    fields = stat.rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def proc_state(pid: int) -> str | None:
    """The scheduler state letter of a process's main thread (R running/runnable, S sleeping,
    D waiting on I/O ...), or None if it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def load_average() -> float:
    """The 1-minute load average (runnable processes, all users)."""
    return round(os.getloadavg()[0], 2)


# ----------------------------------------------------------------------------- datasets and services
def synthetic_set(n: int, seed: int, workers: int) -> Path:
    """The manifest of N synthetic videos written by ``vidsearch synth`` (its defaults:
    64x64 px, 3 s at 8 fps), generated once per (n, seed) and cached under .bench/."""
    out = CACHE_DIR / f"synth-n{n}-s{seed}"
    manifest = out / "manifest.jsonl"
    info_path = out / "synth.json"
    if manifest.exists() and info_path.exists():
        info = json.loads(info_path.read_text())
        if info.get("n") == n and info.get("seed") == seed:
            return manifest
    started = time.perf_counter()
    command = [str(Path(sys.executable).parent / "vidsearch"), "synth", "--out", str(out), "--n", str(n),
               "--seed", str(seed), "--workers", str(max(1, workers)), "--overwrite", "--no-progress"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"vidsearch synth failed ({done.returncode}): {(done.stderr or done.stdout)[-2000:]}")
    print(f"generated {n} synthetic videos in {time.perf_counter() - started:.1f}s -> {out}", flush=True)
    return manifest


def scrape_metrics(port: int, host: str = "127.0.0.1") -> dict[str, float]:
    """An ingest worker's Prometheus counters, summed over labels (name -> value); {} when
    the endpoint does not answer."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return {}
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_part, _, value = line.rpartition(" ")
        name = name_part.split("{", 1)[0]
        try:
            totals[name] = totals.get(name, 0.0) + float(value)
        except ValueError:
            pass
    return totals


def committed_offsets(consumer: Any, topic: str, partitions: int) -> dict[int, int]:
    """The consumer group's committed offset of each partition (0 where none), read
    through a KafkaConsumer that has the group's id and never subscribes."""
    from kafka import TopicPartition

    return {p: consumer.committed(TopicPartition(topic, p)) or 0 for p in range(partitions)}
