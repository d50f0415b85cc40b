"""Load exactly the model version an index was built with, by version id.

The serving side never asks "what is production?" (that can move under it);
it asks "which version built the live collection?" and loads that one: a
registry version, or the deterministic base model when the index was built
before anything was published (``base-<hash>``). Shared by the query ingress
and the reranker so both always score with the same weights.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable

from .config import Settings
from .models import VideoTextModel, build_model, load_model_config
from .models.persist import BASE_SEED, base_version, load_model_version
from .models.runtime import resolve_device
from .registry import ModelRegistry

BASE_PREFIX = "base-"


class ModelVersionError(RuntimeError):
    """The requested version can't be loaded here (unknown, or a different base config)."""


def load_model_for_version(settings: Settings, version: str,
                           registry: ModelRegistry | None = None) -> VideoTextModel:
    """The model whose weights produced ``version``, in eval mode on the configured device."""
    device = resolve_device(settings.model.device)
    if version.startswith(BASE_PREFIX):
        config = load_model_config(settings.model.preset)
        if settings.model.pretrained:
            config = config.with_pretrained(settings.model.pretrained)
        model = build_model(config, device=device, seed=BASE_SEED)
        built = base_version(config, model.frame_encoder_id)
        # A base version is a hash of config + weights identity: if this server's
        # model settings hash differently, its text tower would not match the index.
        if built != version:
            raise ModelVersionError(
                f"the index was built with base model {version}, but this server's model settings "
                f"(preset {settings.model.preset!r}) give {built}")
        return model.eval()
    registry = registry or ModelRegistry(settings.model.registry_root)
    try:
        model, _ = load_model_version(registry, settings.model.model_name, version, device=device)
    except Exception as exc:  # registry errors, checksum mismatches, bad architectures
        raise ModelVersionError(f"cannot load model version {version}: {exc}") from exc
    return model


class ModelCache:
    """A small LRU of loaded versions, so a replica serving across an alias flip
    holds the old and the new version but never grows without bound."""

    def __init__(self, loader: Callable[[str], VideoTextModel], capacity: int = 2) -> None:
        self._loader = loader
        self._capacity = max(1, capacity)
        self._models: OrderedDict[str, VideoTextModel] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    def get(self, version: str) -> VideoTextModel:
        with self._lock:
            if version in self._models:
                self._models.move_to_end(version)
                return self._models[version]
            version_lock = self._loading.setdefault(version, threading.Lock())
        # One loader per version: concurrent first requests wait for it instead of
        # each building the same model.
        with version_lock:
            with self._lock:
                if version in self._models:
                    return self._models[version]
            model = self._loader(version)
            with self._lock:
                self._models[version] = model
                self._models.move_to_end(version)
                while len(self._models) > self._capacity:
                    self._models.popitem(last=False)
                self._loading.pop(version, None)
            return model

    def versions(self) -> list[str]:
        with self._lock:
            return list(self._models)
