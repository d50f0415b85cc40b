"""Deploy the serving stack from Python (``vidsearch serve``, the local stack, tests):
start Serve with the gRPC proxy, then the reranker and the ingress as two apps."""
from __future__ import annotations

import socket
from typing import Any

from ray import serve

from vidsearch.config import Settings
from vidsearch.services.reranker.app import reranker_app

from .app import GRPC_SERVICER_FUNCTION, query_app


def free_port() -> int:
    """A free loopback port (another process may take it before Serve binds; rare)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_serve(settings: Settings, http_port: int = 0) -> None:
    """Start Serve (or reuse the running instance) with gRPC on ``serve.grpc_port``.

    The HTTP proxy, which Serve always runs, is bound to loopback (on a free port
    unless ``http_port`` is given): this API is gRPC only and nothing else should
    be exposed.
    """
    from ray.serve.config import HTTPOptions, gRPCOptions

    serve.start(
        grpc_options=gRPCOptions(port=settings.serve.grpc_port, grpc_servicer_functions=[GRPC_SERVICER_FUNCTION]),
        http_options=HTTPOptions(host="127.0.0.1", port=http_port or free_port()),
    )


def deploy(settings: Settings, *, ingress_options: dict[str, Any] | None = None,
           reranker_options: dict[str, Any] | None = None, http_port: int = 0) -> None:
    """Deploy (or update) both applications and wait until they are running.

    Both start together (replica start-up, mostly model loading, overlaps): the
    ingress finds the reranker by name at its first re-ranked request, and copes
    without it until then (results come back with reranked=false).
    """
    start_serve(settings, http_port)
    serve.run_many([
        serve.RunTarget(reranker_app(settings, **(reranker_options or {})), name=settings.serve.reranker_app_name,
                        route_prefix=None),
        serve.RunTarget(query_app(settings, **(ingress_options or {})), name=settings.serve.app_name,
                        route_prefix=f"/{settings.serve.app_name}"),
    ])
