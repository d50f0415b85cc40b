"""The training fault of benchmarks/faults.py: a Ray Train worker SIGKILLed mid-stage.

Two runs of one tiny config (the ``tiny-afa`` preset, 2 CPU Ray Train workers, short
stages, a checkpoint every 2 steps) on a synthetic dataset: one uninterrupted, one whose
rank 1 SIGKILLs itself before the teacher stage's 4th step (``scaling.fault_injection``,
the trainer's own test-only hook; ``max_failures: 1``). Ray Train restarts the worker
group by itself from the last checkpoint; the benchmark checks that the run finished,
that it restored once, and that its final weights equal the uninterrupted run's
(``torch.equal`` on every tensor).

Run in its own process (``python benchmarks/faults_training.py --root DIR --out FILE``) with
its own local Ray: the stack under test in faults.py has a Ray of its own, which training
must neither join nor slow down. ``training(bench)`` is the fault faults.py calls.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402

STAGES = {"backbone": {"steps": 4, "batch_size": 8},
          "teacher": {"steps": 6, "batch_size": 8},
          "distill": {"steps": 2, "batch_size": 8, "baseline": False}}
KILL = {"stage": "teacher", "after_steps": 3, "rank": 1}
WORKERS = 2
TIMEOUT_S = 900.0


def config(run_dir: Path, data: Path, **scaling: Any) -> dict[str, Any]:
    return {"name": "faults-training", "seed": 0, "run_dir": str(run_dir), "log_every": 1, "checkpoint_every": 2,
            "eval_every": 1000, "model": {"preset": "tiny-afa"}, "data": {"kind": "synth", "path": str(data)},
            "augment": {"views": 2}, "stages": STAGES,
            "scaling": {"num_workers": WORKERS, "cpus_per_worker": 1, **scaling},
            "evaluate": {"splits": []}, "publish": {"enabled": False}}


def measure(root: Path) -> dict[str, Any]:
    """Both runs, in this process (with a fresh local Ray)."""
    import ray
    import torch
    from safetensors.torch import load_file

    from vidsearch.config import load_settings
    from vidsearch.services.trainer import recovery
    from vidsearch.services.trainer.config import parse_run_config
    from vidsearch.services.trainer.job import run_training
    from vidsearch.synth import generate_dataset

    data = root / "synth"
    generate_dataset(data, n=24, seed=3, val_frac=0.2, test_frac=0.2, progress=False)
    ray.init(address="local", num_cpus=WORKERS + 1, include_dashboard=True, dashboard_host="127.0.0.1",
             log_to_driver=False)
    settings = load_settings(None)
    try:
        t0 = time.monotonic()
        clean = run_training(parse_run_config(config(root / "clean", data)), settings, progress=False)
        clean_s = time.monotonic() - t0
        t0 = time.monotonic()
        killed = run_training(parse_run_config(config(root / "killed", data, max_failures=1, fault_injection=KILL)),
                              settings, progress=False)
        killed_s = time.monotonic() - t0
    finally:
        ray.shutdown()
    marker = killed.run_dir / f"fault-injected-{KILL['stage']}-{KILL['after_steps']}-rank{KILL['rank']}"
    restores_file = killed.run_dir / recovery.RESTORES_FILE
    restores = [json.loads(line) for line in restores_file.read_text().splitlines()] if restores_file.is_file() else []
    ours = load_file(str(killed.run_dir / "final" / "model.safetensors"))
    theirs = load_file(str(clean.run_dir / "final" / "model.safetensors"))
    differ = sorted(name for name in set(ours) | set(theirs)
                    if name not in ours or name not in theirs or not torch.equal(ours[name], theirs[name]))
    # The kill is the marker's write (right before the SIGKILL); the recovery the restart's
    # restore record (the restarted rank 0 found the Ray Train checkpoint).
    recover_s = restores_file.stat().st_mtime - marker.stat().st_mtime if marker.is_file() and restores else None
    losses_equal = all(killed.logs[s]["losses"] == clean.logs[s]["losses"] for s in STAGES)
    return {"killed": marker.is_file(), "kill": KILL, "workers": WORKERS,
            "killed_pid": json.loads(marker.read_text())["pid"] if marker.is_file() else None,
            "restores": restores, "resumed": marker.is_file() and len(restores) == 1,
            "finished": (killed.run_dir / "final" / "model.safetensors").is_file(),
            "recover_s": recover_s, "tensors": len(ours), "tensors_differ": differ[:5], "n_differ": len(differ),
            "weights_equal": not differ and set(ours) == set(theirs), "losses_equal": losses_equal,
            "clean_s": clean_s, "killed_s": killed_s,
            "steps": {s: killed.logs[s]["steps"] for s in STAGES}}


def training(bench: Any) -> dict[str, Any]:
    """faults.py's fault: the two runs in a child process, then the checks."""
    root = Path(bench.root) / "training"
    root.mkdir(parents=True, exist_ok=True)
    out = root / "result.json"
    env = {k: v for k, v in os.environ.items() if k not in common.FOREIGN_ENV}
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--root", str(root), "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    if done.returncode != 0 or not out.is_file():
        raise RuntimeError(f"training runs failed (exit {done.returncode}): {done.stderr[-2000:]}")
    r = json.loads(out.read_text())
    checks = {"resumed by itself": bool(r["resumed"] and r["finished"]),
              "weights equal to an uninterrupted run": bool(r["weights_equal"])}
    return {**r, "sent": None, "failed": 0 if r["finished"] else 1, "degraded": None, "lost": None,
            "duplicated": None, "checks": checks, "target": all(checks.values())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="folder for the dataset and both runs")
    parser.add_argument("--out", type=Path, required=True, help="where the result JSON goes")
    args = parser.parse_args(argv)
    common.isolate_environment()
    result = measure(args.root)
    args.out.write_text(json.dumps(result, indent=1, default=str))
    print(json.dumps({k: result[k] for k in ("resumed", "weights_equal", "recover_s")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
