"""`vidsearch serve`: deploy the query ingress and the reranker to Ray Serve and stay in
the foreground until Ctrl-C (or SIGTERM), which removes them again."""
from __future__ import annotations

import argparse
import copy
import logging

from vidsearch.cli import CommandError
from vidsearch.config import Settings
from vidsearch.telemetry import log_event

log = logging.getLogger(__name__)

HEALTHY = {"RUNNING", "DEPLOYING"}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Deploy the gRPC search service (the query ingress and the separate Reranker "
                          "application) to the Ray cluster at RAY_ADDRESS, or to a local Ray started here. "
                          "The vector store, model registry and settings are the configured ones "
                          "(QDRANT_URL / store.path, model.registry_root ...). For the Serve CLI or a "
                          "KubeRay RayService use deploy/serve_config.yaml instead.")
    parser.add_argument("--grpc-port", type=int, help="override serve.grpc_port")
    parser.add_argument("--detach", action="store_true",
                        help="with RAY_ADDRESS: deploy, then exit and leave the apps running")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from vidsearch.services.stack.local import (LOCAL_REPLICA_OPTIONS, StackError, check_serve_ports_free, init_ray,
                                                run_in_foreground)

    if args.grpc_port is not None:
        if not 1 <= args.grpc_port <= 65535:
            raise CommandError(f"--grpc-port must be 1..65535 (got {args.grpc_port})", exit_code=2)
        settings = settings.model_copy(
            update={"serve": settings.serve.model_copy(update={"grpc_port": args.grpc_port})})
    if args.detach and settings.ray.address is None:
        raise CommandError("--detach needs a Ray cluster (RAY_ADDRESS): a local Ray ends with this command",
                           exit_code=2)
    try:
        if settings.ray.address is None:
            check_serve_ports_free(settings)
        local = init_ray(settings)
    except StackError as exc:
        raise CommandError(str(exc)) from None

    import ray
    from ray import serve

    from .deploy import app_names, deploy

    apps = app_names(settings)
    try:
        options = LOCAL_REPLICA_OPTIONS if local else {}
        try:
            deploy(settings, ingress_options=copy.deepcopy(options), reranker_options=copy.deepcopy(options),
                   web_options=copy.deepcopy(options))
        except RuntimeError as exc:
            raise CommandError(f"deploying the search service failed: {str(exc).strip().splitlines()[0]}") from None
        where = "a local Ray" if local else f"the Ray cluster at {settings.ray.address}"
        print(f"search service up on {where}: gRPC port {settings.serve.grpc_port}, applications "
              f"{apps[1]!r} (ingress) and {apps[0]!r} (reranker).", flush=True)
        if settings.serve.web_enabled:
            print(f"  search page: http://127.0.0.1:{settings.serve.http_port}/ (application "
                  f"{settings.serve.web_app_name!r})", flush=True)
        if local:
            print(f"  ingest workers join with RAY_ADDRESS={ray.get_runtime_context().gcs_address} "
                  "(the embedded store lives in this Ray)", flush=True)
        if args.detach:
            return 0
        print("Ctrl-C to stop.", flush=True)
        run_in_foreground(lambda: _watch(apps), interval_s=5.0)
        print("stopping ...", flush=True)
    finally:
        if not args.detach:
            _stop(apps, local, settings)
    print("stopped.")
    return 0


def _watch(apps: tuple[str, ...]) -> None:
    """Log (not fail) an application that leaves the healthy states: Serve restarts
    replicas itself, and a degraded reranker only costs re-ranking."""
    from ray import serve

    status = serve.status().applications
    for name in apps:
        app = status.get(name)
        state = getattr(getattr(app, "status", None), "value", str(getattr(app, "status", "MISSING")))
        if app is None or state not in HEALTHY:
            log_event(log, "serve application not healthy", logging.WARNING, app=name, status=state)


def _stop(apps: tuple[str, ...], local: bool, settings: Settings) -> None:
    import ray
    from ray import serve

    if local:
        serve.shutdown()
        if settings.store.url is None:
            from vidsearch.store import shutdown_embedded_store

            # Close Qdrant cleanly (flush, release the lock) before Ray takes the actor down.
            shutdown_embedded_store(settings)
        ray.shutdown()
        return
    for name in apps:
        serve.delete(name)
