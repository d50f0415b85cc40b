"""`vidsearch up`: the whole stack in the foreground; Ctrl-C stops everything."""
from __future__ import annotations

import argparse
import sys

from vidsearch.cli import CommandError
from vidsearch.config import Settings
from vidsearch.services.stack.bind import is_loopback
from vidsearch.services.stack.local import LocalStack, StackError
from vidsearch.stack_state import export_lines, read_state, state_path


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Start the embedded stack: a local Kafka-compatible broker (durable under "
                          "broker.data_dir unless broker.storage=memory), the embedded Qdrant "
                          "store, a local Ray, the ingest worker, the gRPC search service and the search page. "
                          "Pieces whose "
                          "endpoint is set (KAFKA_BOOTSTRAP, QDRANT_URL, RAY_ADDRESS) are used, not started. "
                          "Ctrl-C (or SIGTERM) stops everything it started.")
    parser.add_argument("--no-worker", action="store_true", help="do not start an ingest worker")
    parser.add_argument("--print-env", action="store_true",
                        help="print the running stack's environment as export lines and exit "
                             "(eval \"$(vidsearch up --print-env)\" in another shell)")


def exposure_warning(settings: Settings) -> str | None:
    """One line when something listens beyond loopback and no API key guards search."""
    if settings.serve.api_key is not None:
        return None
    exposed = [f"{name}={host}" for name, host in (
        ("serve.grpc_host", settings.serve.grpc_host), ("ray.node_ip", settings.ray.node_ip),
        ("broker.embedded_host", settings.broker.embedded_host),
        ("ingest.metrics_host", settings.ingest.metrics_host)) if not is_loopback(host)]
    if not exposed:
        return None
    return (f"warning: listening beyond loopback ({', '.join(exposed)}) with no API key: "
            "anyone on the network can search and reach Ray; set VIDSEARCH_API_KEY")


def run(args: argparse.Namespace, settings: Settings) -> int:
    if args.print_env:
        state = read_state(state_path(settings))
        if state is None:
            raise CommandError(f"no running stack recorded in {state_path(settings)} (start `vidsearch up`)")
        print(export_lines(state.env))
        return 0
    warning = exposure_warning(settings)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    try:
        with LocalStack(settings, worker=not args.no_worker) as stack:
            s = stack.settings
            storage = f" (storage: {stack.broker.describe_storage()})" if stack.broker is not None else ""
            print(f"vidsearch is up: gRPC on {stack.endpoints()['grpc']} (application {s.serve.app_name!r}), "
                  f"Kafka on {s.broker.bootstrap}{storage}, Ray at {s.ray.address}.\n"
                  f"  ingest:  KAFKA_BOOTSTRAP={s.broker.bootstrap} vidsearch ingest FILES... "
                  f"(files under {', '.join(s.decode.allowed_prefixes)})\n"
                  f"  search:  vidsearch search 'a red ball' --address 127.0.0.1:{s.serve.grpc_port}\n"
                  + (f"  page:    {stack.page_url}\n" if stack.page_url else "")
                  + f"  other shells: eval \"$(vidsearch up --print-env)\" (state in {state_path(s)})\n"
                  + "Ctrl-C to stop.", flush=True)
            stack.wait_forever()
            print("stopping ...", flush=True)
    except StackError as exc:
        raise CommandError(str(exc)) from None
    print("stopped.")
    return 0
