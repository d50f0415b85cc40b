"""Gate, publish and (optionally) re-index a finished run.

The new version is published only if its gate metric beats production's by
``publish.gate_min_delta``; otherwise :class:`GateRefused` says by how much it
fell short (the CLI turns it into one line and a non-zero exit). Publishing is
the registry's atomic publish (weights, report and plots, then the manifest);
the ``production`` alias moves only after the new index is live, which
:func:`reindex` does (or directly, when there is no index to rebuild).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from vidsearch.config import Settings
from vidsearch.models import ModelConfig, build_model
from vidsearch.models.persist import BASE_SEED, PRODUCTION_ALIAS, save_model_version
from vidsearch.registry import ModelRegistry
from vidsearch.telemetry import log_event

from .errors import TrainingError
from .job import TrainResult
from .worker import BASELINE_HEAD_FILE

log = logging.getLogger(__name__)

REPORT_FILES = ("report.md", "losses.png", "val_r1.png")


class GateRefused(TrainingError):
    """The new model did not beat production on the gate metric."""


@dataclass
class PublishOutcome:
    version: str
    parent: str | None
    gate: dict[str, Any]
    reindexed: bool
    note: str


def _registry(result: TrainResult, settings: Settings) -> tuple[ModelRegistry, str]:
    publish = result.config.publish
    return (ModelRegistry(publish.registry or settings.model.registry_root),
            publish.model_name or settings.model.model_name)


def check_gate(result: TrainResult, registry: ModelRegistry, name: str) -> dict[str, Any]:
    """The gate decision; raises GateRefused when the new model is not better than production."""
    publish = result.config.publish
    metric = publish.gate_metric
    if metric not in result.metrics:
        known = ", ".join(sorted(k for k in result.metrics if k.endswith("R@1")))
        raise TrainingError(f"publish.gate_metric {metric!r} was not computed (R@1 metrics: {known})")
    new = float(result.metrics[metric])
    production = registry.get_alias(name, PRODUCTION_ALIAS)
    gate = {"metric": metric, "new": new, "production": production, "production_value": None,
            "min_delta": publish.gate_min_delta}
    if production is None:
        return gate
    old = registry.get_manifest(name, production).metrics.get(metric)
    if old is None:
        return gate  # production was never measured on this metric (e.g. a different dataset)
    gate["production_value"] = float(old)
    needed = float(old) + publish.gate_min_delta
    # "Beats" is strict: a tie with production is not worth a new version.
    refused = new <= needed if publish.gate_min_delta == 0 else new < needed
    if refused:
        margin = f" + {publish.gate_min_delta:g}" if publish.gate_min_delta else ""
        raise GateRefused(f"gate refused: {metric} = {new:.2f}, {needed - new:.2f} points short of beating "
                          f"production {production} ({float(old):.2f}{margin}); nothing was published")
    return gate


def publish_run(result: TrainResult, settings: Settings, *, progress: bool = True) -> PublishOutcome:
    """Gate, publish the run's model with its report, then re-index per ``publish.reindex``."""
    registry, name = _registry(result, settings)
    gate = check_gate(result, registry, name)
    model = build_model(ModelConfig.from_dict(result.model_config), device="cpu", seed=BASE_SEED, load_weights=False)
    model.load_state_dict(load_file(str(result.weights)), strict=True)
    extras = {f: (result.run_dir / f).read_bytes() for f in REPORT_FILES if (result.run_dir / f).is_file()}
    baseline = result.weights.parent / BASELINE_HEAD_FILE
    if baseline.is_file():
        extras[BASELINE_HEAD_FILE] = baseline.read_bytes()
    training = {"run_config": result.config.to_dict(), "data_hash": result.data_hash, "data_info": result.data_info,
                "stages": {k: {"steps": v["steps"], "samples_per_s": v["samples_per_s"], "seconds": v["seconds"]}
                           for k, v in result.logs.items()},
                "gate": gate}
    parent = gate["production"]
    version = registry.publish(name, {k: v.contiguous().clone() for k, v in model.state_dict().items()}, {
        "architecture": model.config.to_dict(), "frame_encoder": result.frame_encoder, "parent": parent,
        "training": training, "metrics": result.metrics}, extra_files=extras)
    log_event(log, "model published", model=name, version=version, parent=parent, gate_metric=gate["metric"],
              value=round(gate["new"], 2), production_value=gate["production_value"])
    reindexed, note = _maybe_reindex(result, settings, registry, name, version, progress)
    return PublishOutcome(version=version, parent=parent, gate=gate, reindexed=reindexed, note=note)


def _live_index(settings: Settings) -> str | None:
    """The collection the store's alias points at, or None when there is no reachable index."""
    from vidsearch.store import open_store

    try:
        with open_store(settings) as store:
            return store.resolve_alias(settings.store.alias)
    except Exception as exc:  # noqa: BLE001 - no store here is a normal case for a training box
        log_event(log, "no live index reachable; not re-indexing", level=logging.INFO, error=str(exc).splitlines()[0])
        return None


def _maybe_reindex(result: TrainResult, settings: Settings, registry: ModelRegistry, name: str, version: str,
                   progress: bool) -> tuple[bool, str]:
    mode = result.config.publish.reindex
    live = None if mode == "never" else _live_index(settings)
    if mode == "always" and live is None:
        raise TrainingError(f"published {version}, but publish.reindex=always and no live index is reachable "
                            f"(alias {settings.store.alias!r}); run `vidsearch reindex --version {version}`")
    if live is None:
        registry.set_alias(name, PRODUCTION_ALIAS, version)
        return False, "no live index: production set; new videos are indexed with it"
    from .reindex import reindex

    report = reindex(settings, version, progress=progress)
    return True, f"re-indexed: {report.summary()}"
