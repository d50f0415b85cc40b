"""Serve application builder of the search page (``import_path`` in deploy/serve_config.yaml)."""
from __future__ import annotations

from typing import Any

from ray.serve import Application

from vidsearch.config import Settings, load_settings
from vidsearch.services.query.app import absolute_paths

from .deployment import SearchWeb


def web_app(settings: Settings, **options: Any) -> Application:
    """The search page application; ``options`` are Serve deployment options."""
    options.setdefault("ray_actor_options", {"num_cpus": 0.5})
    return SearchWeb.options(**options).bind(absolute_paths(settings))


def build_web_app(args: dict[str, Any]) -> Application:
    """Serve app builder: ``args.config`` is an optional settings YAML file."""
    return web_app(load_settings((args or {}).get("config")))
