"""Training that survives its workers: Ray Train checkpoints, the restore on (re)start, the
test-only fault injection, and deterministic errors that a retry would only repeat.

Rank 0 keeps writing each stage's checkpoint into ``<run_dir>/checkpoints/<stage>/`` (the
layout :mod:`runner` reads), and after every checkpoint all ranks call
``ray.train.report`` with that folder as the checkpoint, so Ray Train copies it to the
run's storage (``scaling.storage_path``, which every worker must see). When a worker dies,
Ray Train restarts the whole worker group (``scaling.max_failures`` times); on every start
rank 0 takes ``ray.train.get_checkpoint()`` (Ray Train also finds it again when the same
command is run anew) and, when it is at least as far along as the run directory's own
checkpoints, makes ``<run_dir>/checkpoints`` a copy of it. The other ranks get every
state from rank 0 (runner.load_stage_state), so they never read a checkpoint file.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
from pathlib import Path
from typing import Any

from vidsearch.telemetry import log_event

from .config import RunConfig
from .errors import TrainingError
from .runner import CheckpointHook, StepHook

log = logging.getLogger(__name__)

RAY_RUN_NAME = "train"
CHECKPOINTS = "checkpoints"
ABORT_FILE = "train-error.json"
RESTORES_FILE = "recovery.jsonl"  # one line per (re)start that found a Ray Train checkpoint


def storage_path(cfg: RunConfig) -> str:
    """Where Ray Train keeps the run's checkpoints: ``scaling.storage_path``, else ``<run_dir>/ray``."""
    path = cfg.scaling.storage_path
    if path is None:
        return str(Path(cfg.run_dir).resolve() / "ray")
    return path if "://" in path else str(Path(path).resolve())  # Ray Train wants local paths absolute


def progress(checkpoints: Path) -> int:
    """How far a checkpoints folder is: the steps of all its stages together. Stages run in
    order and a stage's state exists only once the ones before it are done, so more steps
    means further along."""
    total = 0
    for state in checkpoints.glob("*/state.json"):
        try:
            total += int(json.loads(state.read_text())["step"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return total


def restore_ray_checkpoint(run_dir: Path, rank: int) -> None:
    """On rank 0: make ``<run_dir>/checkpoints`` Ray Train's latest checkpoint of this run,
    unless the run directory's own is further along (rank 0 may have written a checkpoint
    and died before reporting it). Other ranks: nothing (they read through rank 0)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None or rank != 0:
        return
    target = run_dir / CHECKPOINTS
    staging, replaced = run_dir / f"{CHECKPOINTS}.restoring", run_dir / f"{CHECKPOINTS}.replaced"
    for leftover in (staging, replaced):  # from a start that died while restoring
        shutil.rmtree(leftover, ignore_errors=True)
    with checkpoint.as_directory() as source:
        theirs, ours = progress(Path(source)), progress(target)
        _note_restore(run_dir, "run_dir" if theirs < ours else "ray", str(checkpoint.path), theirs, ours)
        if theirs < ours:
            log_event(log, "run directory checkpoint is newer than Ray Train's; kept", steps=ours, ray_steps=theirs)
            return
        shutil.copytree(source, staging)
    # Swapped by renames, so a kill at any point leaves either the old folder or the new one
    # in place (or neither, and then the next start restores from Ray Train again).
    if target.exists():
        target.rename(replaced)
    staging.rename(target)
    shutil.rmtree(replaced, ignore_errors=True)
    log_event(log, "restored from Ray Train checkpoint", checkpoint=str(checkpoint.path), steps=theirs)


def _note_restore(run_dir: Path, source: str, checkpoint: str, ray_steps: int, run_dir_steps: int) -> None:
    with (run_dir / RESTORES_FILE).open("a") as out:
        out.write(json.dumps({"source": source, "checkpoint": checkpoint, "ray_steps": ray_steps,
                              "run_dir_steps": run_dir_steps}) + "\n")


def ray_reporter(run_dir: Path, rank: int) -> CheckpointHook:
    """The runner's checkpoint hook: report the step to Ray Train, with rank 0's checkpoints
    folder as the checkpoint (every rank must call report the same number of times)."""
    import ray.train

    def report(stage: str, step: int, metrics: dict[str, float]) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(str(run_dir / CHECKPOINTS)) if rank == 0 else None
        # The folder is the run directory's own checkpoints: Ray Train must copy it, not move it.
        ray.train.report({"stage": stage, "step": step, **metrics}, checkpoint=checkpoint,
                         delete_local_checkpoint_after_upload=False)
    return report


def fault_injector(cfg: RunConfig, run_dir: Path, rank: int) -> StepHook | None:
    """``scaling.fault_injection`` (tests only): SIGKILL this worker once, before the step after
    ``after_steps`` steps of ``stage``. A marker file in the run directory makes it once per
    run directory: the restarted worker replays that step and goes on."""
    fault = cfg.scaling.fault_injection
    if fault is None or fault.rank != rank:
        return None
    marker = run_dir / f"fault-injected-{fault.stage}-{fault.after_steps}-rank{rank}"

    def before_step(stage: str, step: int) -> None:
        if stage == fault.stage and step == fault.after_steps and not marker.exists():
            marker.write_text(json.dumps({"stage": stage, "step": step, "pid": os.getpid()}))
            if fault.lose_checkpoints:
                shutil.rmtree(run_dir / CHECKPOINTS, ignore_errors=True)
            log_event(log, "fault injection: killing this worker", stage=stage, step=step, rank=rank)
            os.kill(os.getpid(), signal.SIGKILL)
    return before_step


def record_abort(run_dir: Path, error: TrainingError) -> None:
    """A TrainingError is a fact about the config or the data, not about a worker: record it,
    so the restarts Ray Train makes after it fail at once instead of training to it again."""
    tmp = run_dir / f"{ABORT_FILE}.{os.getpid()}.tmp"  # several ranks may record at once
    try:
        tmp.write_text(json.dumps({"error": str(error)}))
        tmp.replace(run_dir / ABORT_FILE)
    except OSError:
        pass  # then a restart trains up to the error again; the error itself is what matters


def raise_recorded_abort(run_dir: Path) -> None:
    """Raise the TrainingError an earlier attempt of this fit recorded (the driver clears it)."""
    path = run_dir / ABORT_FILE
    if not path.is_file():
        return
    try:
        message: Any = json.loads(path.read_text()).get("error")
    except (OSError, ValueError, AttributeError):
        return
    if isinstance(message, str):
        raise TrainingError(message)


def clear_abort(run_dir: Path) -> None:
    (run_dir / ABORT_FILE).unlink(missing_ok=True)
