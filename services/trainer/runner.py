"""One optimisation loop for every stage: AdamW, warmup + cosine, data-parallel gradients,
checkpoints, resume and progress lines.

A stage supplies the parameters it trains and ``loss_fn(step) -> (loss, parts)``.
Everything random in a step derives from ``(seed, stage, step)``, so a resumed
run replays exactly the batches it would have seen. With several Ray Train
workers each computes its shard of the global batch and the gradients are
averaged with an all-reduce before the step (DDP's rule, done explicitly so any
stage loss works without wrapping the model).

Checkpoints are written by rank 0 and read by rank 0 only; every other rank gets
the state from rank 0 (``broadcast_from_rank0``), so no rank needs to see rank 0's
files and all of them resume from the same step. ``StageContext.on_checkpoint``
(Ray Train's report, in the worker) runs on every rank after each checkpoint.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from vidsearch.telemetry import log_event

from .collective import broadcast_buffers, broadcast_from_rank0
from .config import StageBase
from .errors import TrainingError

log = logging.getLogger(__name__)

LossFn = Callable[[int], tuple[torch.Tensor, dict[str, float]]]
# (stage, step, metrics), on every rank after a checkpoint (and on none without one).
CheckpointHook = Callable[[str, int, dict[str, float]], None]
# (stage, steps done), on every rank before each step: the fault-injection point.
StepHook = Callable[[str, int], None]
RNG_KEY = "rng.torch"


@dataclass
class StageLog:
    name: str
    steps: int = 0
    losses: list[float] = field(default_factory=list)
    parts: dict[str, list[float]] = field(default_factory=dict)
    samples_per_s: float = 0.0
    seconds: float = 0.0
    evals: list[tuple[int, float]] = field(default_factory=list)  # (step, val R@1)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "steps": self.steps, "losses": self.losses, "parts": self.parts,
                "samples_per_s": self.samples_per_s, "seconds": self.seconds, "evals": self.evals}


@dataclass
class StageContext:
    run_dir: Path
    rank: int = 0
    world: int = 1
    checkpoint_every: int = 200
    log_every: int = 25
    eval_every: int = 200
    on_checkpoint: CheckpointHook | None = None
    before_step: StepHook | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def param_groups(params: Sequence[nn.Parameter], weight_decay: float,
                 lr_scales: dict[int, float] | None = None) -> list[dict[str, Any]]:
    """AdamW groups: CLIP's rule (no decay on gains, biases, temperatures and other 0/1-D
    tensors), split further by learning-rate scale (``lr_scales``: id(param) -> share of lr)."""
    scales = lr_scales or {}
    # Both scale-1 groups always exist (possibly empty), so checkpoints keep their group layout.
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {(True, 1.0): [], (False, 1.0): []}
    for p in params:
        groups.setdefault((p.dim() >= 2, float(scales.get(id(p), 1.0))), []).append(p)
    return [{"params": members, "weight_decay": weight_decay if decays else 0.0, "lr_scale": scale}
            for (decays, scale), members in sorted(groups.items(), key=lambda item: (not item[0][0], -item[0][1]))]


def lr_factor(step: int, total: int, warmup_frac: float) -> float:
    """Linear warmup, then cosine to zero."""
    warmup = max(1, int(total * warmup_frac))
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _stage_dir(ctx: StageContext, name: str) -> Path:
    return ctx.run_dir / "checkpoints" / name


def _save(ctx: StageContext, name: str, model: nn.Module, optimizer: torch.optim.Optimizer,
          stage_log: StageLog, step: int, done: bool) -> None:
    if not ctx.is_main:
        return
    where = _stage_dir(ctx, name)
    where.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    opt_state = optimizer.state_dict()
    for index, state in opt_state["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optim.{index}.{key}"] = value.detach().cpu().contiguous().clone()
    # Nothing in a step draws from torch's global generator today (every draw has its own
    # seeded generator), but a resume restores it anyway, so one that did would still replay.
    tensors[RNG_KEY] = torch.get_rng_state()
    # The weights go to a file named by their step, and only then does state.json (replaced
    # atomically) name that file: a kill at any point leaves state.json naming weights of its
    # own step, never newer ones. Older weight files are deleted only after the switch.
    weights = f"state-{step}.safetensors"
    meta = {"step": step, "done": done, "weights": weights, "log": stage_log.to_dict(),
            "param_groups": opt_state["param_groups"]}
    tmp = where / f"{weights}.tmp"
    save_file(tensors, str(tmp))
    tmp.replace(where / weights)
    (where / "state.json.tmp").write_text(json.dumps(meta))
    (where / "state.json.tmp").replace(where / "state.json")
    for old in [*where.glob("state-*.safetensors"), *where.glob("state-*.safetensors.tmp"), where / "state.safetensors"]:
        if old.name != weights:
            old.unlink(missing_ok=True)


def load_stage_state(ctx: StageContext, name: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    """(state.json, the weights it names), or None before the stage's first checkpoint.

    Rank 0 reads; every rank returns what rank 0 read (call it on every rank). Run
    directories written before step-named weight files have ``state.safetensors`` and no
    ``weights`` key; they still load.
    """
    found: tuple[dict[str, Any], dict[str, torch.Tensor]] | None | str = None
    if ctx.is_main:
        try:
            found = _read_stage_state(ctx, name)
        except TrainingError as exc:
            found = str(exc)  # raised on every rank below, not only on rank 0
    if ctx.world > 1:
        found = broadcast_from_rank0(found)
    if isinstance(found, str):
        raise TrainingError(found)
    return found


def _read_stage_state(ctx: StageContext, name: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    where = _stage_dir(ctx, name)
    if not (where / "state.json").is_file():
        return None
    meta = json.loads((where / "state.json").read_text())
    weights = where / meta.get("weights", "state.safetensors")
    if not weights.is_file():
        raise TrainingError(f"checkpoint {where / 'state.json'} names {weights.name}, which is missing; "
                            f"delete {where} (and the run's Ray Train storage, scaling.storage_path) "
                            f"to restart stage {name}")
    return meta, load_file(str(weights))


def _restore(model: nn.Module, optimizer: torch.optim.Optimizer, meta: dict[str, Any],
             tensors: dict[str, torch.Tensor]) -> StageLog:
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    if state:
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    if RNG_KEY in tensors:
        torch.set_rng_state(tensors[RNG_KEY])
    saved = meta["log"]
    return StageLog(name=saved["name"], steps=saved["steps"], losses=saved["losses"], parts=saved["parts"],
                    samples_per_s=saved.get("samples_per_s", 0.0), seconds=saved.get("seconds", 0.0),
                    evals=[tuple(e) for e in saved.get("evals", [])])


def _allreduce_grads(params: Sequence[nn.Parameter], world: int) -> None:
    if world <= 1 or not dist.is_available() or not dist.is_initialized():
        return
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
        param.grad /= world


def run_stage(name: str, config: StageBase, model: nn.Module, params: Sequence[nn.Parameter], loss_fn: LossFn,
              ctx: StageContext, *, after_step: Callable[[], None] | None = None,
              evaluate: Callable[[], float] | None = None, lr_scales: dict[int, float] | None = None) -> StageLog:
    """Train ``params`` (a subset of ``model``'s) for ``config.steps``; resume from a checkpoint.

    ``lr_scales`` (id(param) -> share of ``config.lr``) gives some parameters their own rate.
    ``evaluate`` (rank 0 only) returns val R@1, recorded every ``ctx.eval_every`` steps and
    at the end for the report's curve.
    """
    params = [p for p in params if p.requires_grad]
    if not params:
        raise TrainingError(f"stage {name}: nothing to train")
    optimizer = torch.optim.AdamW(param_groups(params, config.weight_decay, lr_scales), lr=config.lr,
                                  betas=(0.9, 0.98), eps=1e-6)
    total = config.steps
    stage_log, start = StageLog(name=name), 0
    saved = load_stage_state(ctx, name)
    if saved is not None:
        meta, tensors = saved
        stage_log = _restore(model, optimizer, meta, tensors)
        start = int(meta["step"])
        if meta["done"]:
            log_event(log, "stage already complete; skipped", stage=name, steps=start)
            return stage_log
        log_event(log, "stage resumed from checkpoint", stage=name, step=start, of=total)
    model.train()
    began, window_start, window_samples = time.perf_counter(), time.perf_counter(), 0
    for step in range(start, total):
        if ctx.before_step is not None:
            ctx.before_step(name, step)
        for group in optimizer.param_groups:
            group["lr"] = config.lr * lr_factor(step, total, config.warmup_frac) * group.get("lr_scale", 1.0)
        loss, parts = loss_fn(step)
        if not torch.isfinite(loss):
            raise TrainingError(f"stage {name}: loss became {loss.item()} at step {step + 1}; lower stages.{name}.lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        _allreduce_grads(params, ctx.world)
        nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        if after_step is not None:
            after_step()
        stage_log.steps = step + 1
        stage_log.losses.append(float(loss.detach()))
        for key, value in parts.items():
            stage_log.parts.setdefault(key, []).append(float(value))
        window_samples += config.batch_size
        done = step + 1 == total
        if ctx.is_main and ((step + 1) % ctx.log_every == 0 or done):
            elapsed = time.perf_counter() - window_start
            rate = window_samples / max(elapsed, 1e-9)
            stage_log.samples_per_s = rate
            eta = (total - step - 1) * config.batch_size / max(rate, 1e-9)
            recent = stage_log.losses[-ctx.log_every:]
            log_event(log, "train progress", stage=name, step=f"{step + 1}/{total}",
                      loss=round(sum(recent) / len(recent), 4),
                      **{k: round(v[-1], 4) for k, v in stage_log.parts.items()},
                      samples_per_s=round(rate, 1), eta_s=round(eta))
            window_start, window_samples = time.perf_counter(), 0
        if evaluate is not None and ctx.is_main and ((step + 1) % ctx.eval_every == 0 or done):
            stage_log.evals.append((step + 1, float(evaluate())))
            model.train()
            log_event(log, "val check", stage=name, step=step + 1, val_r1=round(stage_log.evals[-1][1], 2))
        if (step + 1) % ctx.checkpoint_every == 0 or done:
            stage_log.seconds += time.perf_counter() - began
            began = time.perf_counter()
            _save(ctx, name, model, optimizer, stage_log, step + 1, done)
            if ctx.on_checkpoint is not None:
                ctx.on_checkpoint(name, step + 1, {"loss": stage_log.losses[-1]})
    if ctx.world > 1:
        broadcast_buffers(model)
    model.eval()
    return stage_log
