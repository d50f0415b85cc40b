"""Deploy the serving stack from Python (``vidsearch serve``, the local stack, tests):
start Serve with the gRPC proxy, then the reranker, the ingress and the search page."""
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

    The HTTP proxy (the search page) is bound to loopback on ``http_port``, else
    ``serve.http_port``; with the page turned off it still runs (Serve always
    does), on a free port, since nothing should be found there.
    """
    from ray.serve.config import HTTPOptions, gRPCOptions

    port = http_port or (settings.serve.http_port if settings.serve.web_enabled else free_port())
    serve.start(
        grpc_options=gRPCOptions(port=settings.serve.grpc_port, grpc_servicer_functions=[GRPC_SERVICER_FUNCTION]),
        http_options=HTTPOptions(host="127.0.0.1", port=port),
    )


def deploy(settings: Settings, *, ingress_options: dict[str, Any] | None = None,
           reranker_options: dict[str, Any] | None = None, web_options: dict[str, Any] | None = None,
           http_port: int = 0) -> None:
    """Deploy (or update) the applications and wait until they are running: the
    reranker, the ingress and, with ``serve.web_enabled``, the search page at ``/``.

    All start together (replica start-up, mostly model loading, overlaps): the
    ingress finds the reranker by name at its first re-ranked request, and copes
    without it until then (results come back with reranked=false); the page finds
    the ingress the same way.
    """
    start_serve(settings, http_port)
    targets = [
        serve.RunTarget(reranker_app(settings, **(reranker_options or {})), name=settings.serve.reranker_app_name,
                        route_prefix=None),
        serve.RunTarget(query_app(settings, **(ingress_options or {})), name=settings.serve.app_name,
                        route_prefix=f"/{settings.serve.app_name}"),
    ]
    if settings.serve.web_enabled:
        from vidsearch.services.web.app import web_app

        targets.append(serve.RunTarget(web_app(settings, **(web_options or {})), name=settings.serve.web_app_name,
                                       route_prefix="/"))
    serve.run_many(targets)


def app_names(settings: Settings) -> tuple[str, ...]:
    """The Serve applications ``deploy`` runs, for status checks and clean-up."""
    names = (settings.serve.reranker_app_name, settings.serve.app_name)
    return names + ((settings.serve.web_app_name,) if settings.serve.web_enabled else ())
