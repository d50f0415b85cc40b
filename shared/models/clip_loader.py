"""Build the open_clip backbone from a ClipConfig with open_clip's own loader.

An inline ``model_cfg`` is registered in open_clip's model-config table under a
name derived from its content, so open_clip's factory and tokenizer treat it like a
built-in architecture (and two different inline configs never collide).
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import open_clip
import open_clip.factory as open_clip_factory
from torch import nn

from .config import ClipConfig

log = logging.getLogger(__name__)

_HASH_CHUNK = 1 << 20


@dataclass
class LoadedClip:
    model: nn.Module
    tokenizer: object  # open_clip tokenizer: callable list[str] -> LongTensor[B, context_length]
    open_clip_name: str
    weights_id: str  # "<pretrained tag>" or "sha256:<12 hex>" or "" when randomly initialised


def _short_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:8]


def file_sha256(path: str | os.PathLike, length: int = 12) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()[:length]


def register_model_cfg(cfg: ClipConfig) -> str:
    """Return the open_clip model name to build ``cfg`` with, registering an inline config."""
    if cfg.model_cfg is None:
        if cfg.name not in open_clip.list_models():
            raise ValueError(f"clip.name: unknown open_clip model {cfg.name!r} (see open_clip.list_models())")
        return cfg.name
    canonical = json.dumps(cfg.model_cfg, sort_keys=True, separators=(",", ":")).encode()
    name = f"vidsearch-{cfg.name}-{_short_hash(canonical)}"
    # open_clip 3.x keeps its architecture table in this module-level dict; the public
    # add_model_config() only takes files. Fail loudly if a future version moves it.
    table = getattr(open_clip_factory, "_MODEL_CONFIGS", None)
    if not isinstance(table, dict):
        raise RuntimeError("this open_clip version has no model config table to register clip.model_cfg in")
    table.setdefault(name, copy.deepcopy(cfg.model_cfg))
    return name


def _resolve_pretrained(name: str, label: str, pretrained: str) -> tuple[str, str]:
    """Return (what to pass open_clip, weights id) for a tag or a local checkpoint file."""
    if os.path.isfile(pretrained):
        return pretrained, f"sha256:{file_sha256(pretrained)}"
    if open_clip.get_pretrained_cfg(name, pretrained):
        return pretrained, pretrained
    looks_like_path = os.sep in pretrained or Path(pretrained).suffix in (".safetensors", ".pt", ".pth", ".bin")
    if looks_like_path:
        raise ValueError(f"clip.pretrained: checkpoint file {pretrained!r} not found")
    tags = open_clip.list_pretrained_tags_by_model(name)
    raise ValueError(f"clip.pretrained: {pretrained!r} is neither a local checkpoint file nor an open_clip "
                     f"tag for {label} (tags: {', '.join(tags) or 'none'})")


def load_clip(cfg: ClipConfig, load_weights: bool = True) -> LoadedClip:
    """Create the open_clip model on the CPU, loading ``cfg.pretrained`` when asked.

    ``load_weights=False`` skips the checkpoint (used when a state dict from the model
    registry replaces every weight anyway, so no download or local file is needed).
    """
    name = register_model_cfg(cfg)
    pretrained, weights_id = None, ""
    if load_weights and cfg.pretrained:
        pretrained, weights_id = _resolve_pretrained(name, cfg.name, cfg.pretrained)
    try:
        model = open_clip.create_model(name, pretrained=pretrained, device="cpu")
    except RuntimeError as exc:
        if pretrained and "state_dict" in str(exc):
            first = str(exc).strip().splitlines()[0]
            raise ValueError(f"clip.pretrained: checkpoint {cfg.pretrained!r} does not fit {cfg.name}: {first}") from None
        raise RuntimeError(f"could not build open_clip model {cfg.name} (pretrained={cfg.pretrained!r}): {exc}") from exc
    except (TypeError, KeyError) as exc:
        # A malformed inline config reaches the model constructors as a bad keyword.
        raise ValueError(f"clip.model_cfg: open_clip rejected the config: {exc}") from None
    tokenizer = open_clip.get_tokenizer(name)
    return LoadedClip(model=model, tokenizer=tokenizer, open_clip_name=name, weights_id=weights_id)


def clip_label(cfg: ClipConfig) -> str:
    """Architecture part of a frame-encoder id: the model name, plus a hash for inline configs."""
    if cfg.model_cfg is None:
        return cfg.name
    canonical = json.dumps(cfg.model_cfg, sort_keys=True, separators=(",", ":")).encode()
    return f"{cfg.name}@{_short_hash(canonical)}"
