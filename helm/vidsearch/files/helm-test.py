"""`helm test`: the release serves. Run in the vidsearch image with the release's settings
(VIDSEARCH_CONFIG and the endpoint and key variables every vidsearch pod gets).

1. Serve's own gRPC health service on the gRPC Service answers, and Serve routes the
   search application (RayServeAPIService: Healthz, ListApplications).
2. When the live index (the alias) has points, one real search with the release's API
   key must answer OK with at least one result. A fresh install has no index yet: the
   search is skipped (said so), so `helm test` can gate an install or an upgrade.

Exit 0 when it serves, 1 with one line saying what failed.
"""
from __future__ import annotations

import argparse
import sys


def serve_applications(address: str, timeout_s: float) -> list[str]:
    """The applications Serve's gRPC proxy routes, after its health check answers."""
    import grpc
    from ray.serve.generated import serve_pb2, serve_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = serve_pb2_grpc.RayServeAPIServiceStub(channel)
        stub.Healthz(serve_pb2.HealthzRequest(), timeout=timeout_s)
        reply = stub.ListApplications(serve_pb2.ListApplicationsRequest(), timeout=timeout_s)
        return list(reply.application_names)


def live_points(settings) -> int:
    """Points in the collection the live alias names; 0 when it names none yet."""
    from vidsearch.store import open_store

    with open_store(settings) as store:
        collection = store.resolve_alias(settings.store.alias)
        return 0 if collection is None else store.count(collection)


def check(settings, address: str, query: str, timeout_s: float) -> str:
    """What passed, in one line; raises RuntimeError with what failed."""
    import grpc

    from vidsearch.services.query.client import ClientError, SearchClient, build_request

    try:
        apps = serve_applications(address, timeout_s)
    except grpc.RpcError as exc:
        raise RuntimeError(f"Serve's gRPC health check at {address} failed: {exc.code().name} {exc.details()}") from None
    # The proxy lists the applications it routes: the reranker has no route (the ingress
    # reaches it through a DeploymentHandle), so only the search's application is listed.
    if settings.serve.app_name not in apps:
        raise RuntimeError(f"Serve at {address} routes {sorted(apps)}, not {settings.serve.app_name!r}")
    points = live_points(settings)
    if points == 0:
        return f"Serve is healthy at {address} ({', '.join(sorted(apps))}); the index {settings.store.alias!r} " \
               "has no videos yet, so no search was sent"
    key = settings.serve.api_key.get_secret_value() if settings.serve.api_key else None
    try:
        with SearchClient(address, settings.serve.app_name, key, timeout_s) as client:
            response = client.search(build_request(query, top_k=3))
    except ClientError as exc:
        raise RuntimeError(f"search failed with {points} points in the index: {exc}") from None
    if not response.results:
        raise RuntimeError(f"search answered no result with {points} points in the index {response.index}")
    return f"Serve is healthy at {address}; {query!r} found {len(response.results)} of {points} points " \
           f"(index {response.index}, model {response.model_version})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--address", required=True, help="host:port of the release's gRPC Service")
    parser.add_argument("--query", required=True, help="the sentence to search for")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds each call may take")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from vidsearch.config import load_settings

    try:
        print(check(load_settings(), args.address, args.query, args.timeout))
    except RuntimeError as exc:
        print(f"helm test failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
