"""`vidsearch search`: query the gRPC search service and print a table of results."""
from __future__ import annotations

import argparse

from vidsearch.cli import CommandError
from vidsearch.config import Settings


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Search the running service (vidsearch serve / up / demo) over gRPC. Sends the API "
                          "key from VIDSEARCH_API_KEY (serve.api_key) when one is set.")
    parser.add_argument("query", help="the sentence to search for")
    parser.add_argument("--top-k", type=int, default=0, help="number of results, 1..100 (default: server's, 10)")
    parser.add_argument("--recall-k", type=int, default=0,
                        help="candidates recalled before re-ranking, top_k..1000 (default: server's, 50)")
    parser.add_argument("--filter", action="append", default=[], metavar="EXPR", dest="filters",
                        help="FIELD=VALUE, FIELD=V1,V2 (any of) or FIELD>=N, >, <=, < (range); repeatable, ANDed")
    parser.add_argument("--no-rerank", action="store_true", help="recall only, skip the cross-encoder")
    parser.add_argument("--beta", type=float, help="fusion weight of the rerank score, 0..1 (default: server's)")
    parser.add_argument("--address", help="host:port of the gRPC proxy (default: the running stack's, else "
                        "<serve.grpc_host>:<serve.grpc_port>)")
    parser.add_argument("--app", help="Serve application name (default serve.app_name)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the answer (default 30)")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from .client import ClientError, SearchClient, build_request, format_response

    if args.timeout <= 0:
        raise CommandError("--timeout must be > 0", exit_code=2)
    if args.top_k < 0 or args.recall_k < 0:
        # The API's fields are unsigned; every other range check is the server's (one
        # source of truth, and its messages name the field).
        raise CommandError("--top-k and --recall-k must be >= 1", exit_code=2)
    host = settings.serve.grpc_host
    address = args.address or f"{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{settings.serve.grpc_port}"
    key = settings.serve.api_key.get_secret_value() if settings.serve.api_key else None
    try:
        request = build_request(args.query, top_k=args.top_k, recall_k=args.recall_k,
                                rerank=False if args.no_rerank else None, beta=args.beta, filters=args.filters)
        with SearchClient(address, args.app or settings.serve.app_name, key, args.timeout) as client:
            response = client.search(request)
    except (ClientError, ValueError) as exc:  # ValueError: a number the proto field can't hold
        raise CommandError(str(exc)) from None
    print(format_response(response, args.query))
    return 0
