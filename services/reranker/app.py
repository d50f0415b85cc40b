"""Serve application builder for the reranker (``import_path`` in deploy/serve_config.yaml)."""
from __future__ import annotations

from typing import Any

from ray.serve import Application

from vidsearch.config import Settings, load_settings
from vidsearch.cpu_priority import NICENESS_ENV

from .deployment import Reranker


def cluster_has_gpus() -> bool:
    """Whether the Ray cluster offers GPUs (checked where the app is built: on the cluster)."""
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def reranker_app(settings: Settings, **options: Any) -> Application:
    """The reranker application; ``options`` are Serve deployment options (tests pin
    ``num_replicas`` and small CPU shares). A GPU share is requested only when the
    cluster has GPUs, so the same builder works on a laptop and on a GPU node pool."""
    actor_options = dict(options.pop("ray_actor_options", None) or {"num_cpus": 1})
    if "num_gpus" not in actor_options and settings.serve.reranker_num_gpus > 0 and cluster_has_gpus():
        actor_options["num_gpus"] = settings.serve.reranker_num_gpus
    if settings.serve.reranker_niceness > 0:
        # Read by the worker setup hook when the replica's process starts, so its imports
        # and model load already run at the lower priority (Reranker.__init__ applies it
        # again where no hook runs, e.g. a cluster started by KubeRay).
        runtime_env = dict(actor_options.get("runtime_env") or {})
        runtime_env["env_vars"] = {**(runtime_env.get("env_vars") or {}),
                                   NICENESS_ENV: str(settings.serve.reranker_niceness)}
        actor_options["runtime_env"] = runtime_env
    # Same path handling as the ingress, so both load versions from the same registry.
    from vidsearch.services.query.app import absolute_paths

    return Reranker.options(ray_actor_options=actor_options, **options).bind(absolute_paths(settings))


def build_reranker_app(args: dict[str, Any]) -> Application:
    """Serve app builder: ``args.config`` is an optional settings YAML file; everything
    else comes from the environment like any other vidsearch process."""
    return reranker_app(load_settings((args or {}).get("config")))
