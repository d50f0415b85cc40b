"""Keep a local Ray and its Serve proxy on the configured addresses (loopback by default).

Ray 2.60 turns a loopback ``node_ip_address`` (and a loopback RAY_ADDRESS) into the
machine's external address unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, and Serve's
gRPC proxy and replicas always listen on ``[::]``. :func:`keep_ray_on_loopback` sets
that switch for the stack and its children (the state file carries it to other
processes); :func:`setup_worker` runs in every worker process of the stack's
job (Ray's ``worker_process_setup_hook``), the Serve proxy and replicas included,
and rewrites the ``[::]`` they listen on before their servers bind.
"""
from __future__ import annotations

import ipaddress
import os

from vidsearch.cpu_priority import apply_niceness_from_env

# How the driver tells its workers' setup hook where to bind (set in the job's
# runtime_env; internal, not a user setting: the settings are serve.grpc_host, ray.node_ip).
GRPC_HOST_ENV = "_VIDSEARCH_BIND_GRPC_HOST"
NODE_IP_ENV = "_VIDSEARCH_BIND_NODE_IP"
SETUP_HOOK = "vidsearch.services.stack.bind.setup_worker"
# Ray's own switch (ray_constants.ENABLE_RAY_CLUSTER): "0" makes Ray use loopback
# addresses instead of resolving 127.0.0.1 to the machine's external address.
SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_address(host: str, port: int | str) -> str:
    """``host:port`` as gRPC spells it (IPv6 literals in brackets)."""
    try:
        if ipaddress.ip_address(host).version == 6:
            return f"[{host}]:{port}"
    except ValueError:
        pass  # a host name
    return f"{host}:{port}"


def runtime_env(grpc_host: str, node_ip: str) -> dict:
    return {"worker_process_setup_hook": SETUP_HOOK, "env_vars": {GRPC_HOST_ENV: grpc_host, NODE_IP_ENV: node_ip}}


def keep_ray_on_loopback() -> None:
    """Make this process, and every process it starts, treat Ray as single-machine:
    Ray then resolves "127.0.0.1" to itself instead of the external address, both when
    a local node starts and when a process joins one at a loopback address."""
    from ray._private import ray_constants

    os.environ[SINGLE_MACHINE_ENV] = "0"  # read by `import ray` in child processes
    ray_constants.ENABLE_RAY_CLUSTER = False  # already imported here


def _rewrite(address: str, host: str) -> str:
    if address.startswith("[::]:"):
        return bind_address(host, address.rsplit(":", 1)[1])
    return address


def setup_worker() -> None:
    """Ray worker setup hook: Serve's gRPC proxy on serve.grpc_host, its replicas'
    internal gRPC servers on ray.node_ip."""
    # First, before this process imports anything heavy: a reranker replica's lower CPU
    # priority (serve.reranker_niceness) must cover its imports and model load too.
    apply_niceness_from_env()
    grpc_host = os.environ.get(GRPC_HOST_ENV)
    node_ip = os.environ.get(NODE_IP_ENV)
    if grpc_host:
        from ray.serve._private import default_impl

        proxy_add = getattr(default_impl.add_grpc_address, "__wrapped__", default_impl.add_grpc_address)

        def add_grpc_address(server, address: str) -> None:  # noqa: ANN001 - Ray's signature
            proxy_add(server, _rewrite(address, grpc_host))

        add_grpc_address.__wrapped__ = proxy_add  # type: ignore[attr-defined]
        default_impl.add_grpc_address = add_grpc_address
    if node_ip:
        from ray.serve._private import replica

        replica_add = getattr(replica.add_port_to_grpc_server, "__wrapped__", replica.add_port_to_grpc_server)

        def add_port_to_grpc_server(server, address: str):  # noqa: ANN001, ANN202 - Ray's signature
            return replica_add(server, _rewrite(address, node_ip))

        add_port_to_grpc_server.__wrapped__ = replica_add  # type: ignore[attr-defined]
        replica.add_port_to_grpc_server = add_port_to_grpc_server
