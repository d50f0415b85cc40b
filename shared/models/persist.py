"""Saving models to, and loading them from, the model registry; picking the serving model.

A registry version holds the full state dict (safetensors, via ``ModelRegistry``) and
the model config as its ``architecture``, so loading rebuilds the exact architecture
with the factory and never touches ``clip.pretrained`` (no download, no local file).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from typing import Any

import torch

from ..config import Settings
from ..registry import Manifest, ModelRegistry
from .config import ModelConfig, load_model_config
from .factory import build_model
from .runtime import resolve_device
from .video_text_model import VideoTextModel

PRODUCTION_ALIAS = "production"
# Every process building the base model uses this seed, so ingest, query and reranker
# hold identical weights (and identical frame-encoder ids) without sharing a file.
BASE_SEED = 0


def save_model_version(registry: ModelRegistry, model_name: str, model: VideoTextModel, *,
                       parent: str | None = None, training: dict[str, Any] | None = None,
                       metrics: dict[str, Any] | None = None, frame_encoder: str | None = None) -> str:
    """Publish ``model``'s weights and config as a new version; return the version id.

    ``frame_encoder`` overrides ``model.frame_encoder_id``: pass a new id when training
    changed the visual tower, so the index knows stored frames must be re-encoded.
    """
    # Tied or shared tensors are cloned by the registry (safetensors refuses shared storage).
    tensors = dict(model.state_dict())
    return registry.publish(model_name, tensors, {
        "architecture": model.config.to_dict(),
        "frame_encoder": frame_encoder or model.frame_encoder_id,
        "parent": parent,
        "training": training or {},
        "metrics": metrics or {},
    })


def load_model_version(registry: ModelRegistry, model_name: str, ref: str,
                       device: str | torch.device | None = None) -> tuple[VideoTextModel, Manifest]:
    """Rebuild a published version (a version id or an alias) and load its weights strictly."""
    tensors, manifest = registry.load(model_name, ref)
    where = f"{model_name}/{manifest.version}"
    try:
        config = ModelConfig.from_dict(manifest.architecture)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: architecture is not a valid model config: {exc}") from None
    # Built on the CPU with a fixed seed: the random init is overwritten below, and the
    # seed keeps this from consuming the caller's RNG stream.
    model = build_model(config, device="cpu", seed=BASE_SEED, load_weights=False)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ValueError(f"{where}: weights do not match the architecture: {first}") from None
    model.frame_encoder_id = manifest.frame_encoder
    return model.to(resolve_device("auto" if device is None else device)).eval(), manifest


def base_version(config: ModelConfig, frame_encoder_id: str) -> str:
    """``base-<8 hex>`` from the architecture and the weights' identity.

    A local checkpoint path is left out of the hash (the frame-encoder id carries the
    file's sha256), so every machine agrees on the version whatever the path.
    """
    anonymous = replace(config, clip=replace(config.clip, pretrained=None))
    canonical = json.dumps({"config": anonymous.to_dict(), "frame_encoder": frame_encoder_id},
                           sort_keys=True, separators=(",", ":"))
    return f"base-{hashlib.sha256(canonical.encode()).hexdigest()[:8]}"


def load_serving_model(settings: Settings, registry: ModelRegistry | None = None) -> tuple[VideoTextModel, str]:
    """The registry's production version, or the deterministic base model when none is published."""
    registry = registry or ModelRegistry(settings.model.registry_root)
    device = resolve_device(settings.model.device)
    name = settings.model.model_name
    version = registry.get_alias(name, PRODUCTION_ALIAS)
    if version is not None:
        model, manifest = load_model_version(registry, name, version, device=device)
        return model, manifest.version
    config = load_model_config(settings.model.preset)
    if settings.model.pretrained:
        config = config.with_pretrained(settings.model.pretrained)
    model = build_model(config, device=device, seed=BASE_SEED)
    return model, base_version(config, model.frame_encoder_id)
