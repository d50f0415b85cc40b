"""Serve application builders: the ``import_path`` targets of deploy/serve_config.yaml
(``serve run``, ``serve deploy``, a KubeRay RayService) and of ``deploy.py``."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ray.serve import Application

from vidsearch.config import Settings, load_settings

from .ingress import SearchIngress

GRPC_SERVICER_FUNCTION = "vidsearch.v1.search_pb2_grpc.add_SearchServiceServicer_to_server"


def absolute_paths(settings: Settings) -> Settings:
    """Settings with the local store and registry paths made absolute.

    Replicas run in other processes, possibly with another working directory, so a
    relative ``./data/qdrant`` would name a different (empty) store there, and a
    relative decode prefix another folder. URLs (``s3://...``) are kept as they are.
    """
    store = settings.store.model_copy(update={"path": str(Path(settings.store.path).expanduser().resolve())})
    root = settings.model.registry_root
    if "://" not in root:
        root = str(Path(root).expanduser().resolve())
    model = settings.model.model_copy(update={"registry_root": root})
    # The web app reads files by these roots (url prefixes are kept as they are).
    prefixes = [p if "://" in p else os.path.abspath(os.path.expanduser(p)) for p in settings.decode.allowed_prefixes]
    decode = settings.decode.model_copy(update={"allowed_prefixes": prefixes})
    return settings.model_copy(update={"store": store, "model": model, "decode": decode})


def query_app(settings: Settings, **options: Any) -> Application:
    """The query ingress application; ``options`` are Serve deployment options
    (tests pin ``num_replicas`` and small CPU shares)."""
    options.setdefault("ray_actor_options", {"num_cpus": 1})
    return SearchIngress.options(**options).bind(absolute_paths(settings))


def build_query_app(args: dict[str, Any]) -> Application:
    """Serve app builder: ``args.config`` is an optional settings YAML file; everything
    else comes from the environment like any other vidsearch process."""
    return query_app(load_settings((args or {}).get("config")))
