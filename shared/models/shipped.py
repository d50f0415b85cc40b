"""The trained model that ships with the repository (``deploy/models/``, registry layout).

A fresh clone searches meaningfully with no training step: the local stack and
the demo import the shipped version into their registry when that registry has
no ``production`` yet, byte for byte with its checksums verified, and point
``production`` at it. A registry that already has a production version is never
touched, so a model you trained and published always wins.
"""
from __future__ import annotations

import logging
from pathlib import Path

from ..config import Settings
from ..registry import ModelRegistry, RegistryError
from ..telemetry import log_event
from .persist import PRODUCTION_ALIAS

log = logging.getLogger(__name__)

# shared/ is the `vidsearch` package; deploy/ sits beside it in the repository.
SHIPPED_REGISTRY = Path(__file__).resolve().parents[2] / "deploy" / "models"


def shipped_registry() -> ModelRegistry | None:
    """The shipped registry, or None when this install has no deploy/models (e.g. a wheel)."""
    return ModelRegistry(str(SHIPPED_REGISTRY)) if (SHIPPED_REGISTRY / "vidsearch" / "aliases.json").is_file() else None


def shipped_version(model_name: str = "vidsearch") -> str | None:
    source = shipped_registry()
    return None if source is None else source.get_alias(model_name, PRODUCTION_ALIAS)


def install_shipped_model(settings: Settings) -> str | None:
    """Import the shipped version into ``model.registry_root`` and make it production, unless
    that registry already has a production version (or nothing ships); returns the
    version now in production there, or None when there is none."""
    target = ModelRegistry(settings.model.registry_root)
    name = settings.model.model_name
    current = target.get_alias(name, PRODUCTION_ALIAS)
    if current is not None or not settings.model.use_shipped:
        return current
    source = shipped_registry()
    if source is None or source.get_alias(name, PRODUCTION_ALIAS) is None:
        return None
    try:
        version = target.import_version(source, name, PRODUCTION_ALIAS)
    except RegistryError as exc:
        raise RegistryError(f"cannot install the shipped model from {SHIPPED_REGISTRY}: {exc}") from None
    target.set_alias(name, PRODUCTION_ALIAS, version)
    log_event(log, "shipped model installed", version=version, registry=settings.model.registry_root)
    return version
