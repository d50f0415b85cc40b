"""The running embedded stack, as other processes find it (``stack.state_file``).

``vidsearch up`` writes its endpoints and the environment a second process needs
(broker, Ray address and auth mode, gRPC address, store) to a JSON file, removed
when it stops. ``vidsearch ingest``, ``ingest-worker``, ``search``, ``status`` and
``dlq`` read it when no endpoint is configured, so a second shell needs no
copy-pasted addresses; ``vidsearch up --print-env`` prints it as ``export`` lines.
A file whose process is gone is ignored.
"""
from __future__ import annotations

import json
import os
import shlex
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping

from .config import Settings, load_settings

VERSION = 1


@dataclass
class StackState:
    pid: int
    started_at: str
    # What a person or script reads: broker, ray, grpc, store, metrics.
    endpoints: dict[str, str] = field(default_factory=dict)
    # Variables a second process sets to use this stack (see env_for).
    env: dict[str, str] = field(default_factory=dict)
    version: int = VERSION


def state_path(settings: Settings) -> Path:
    return Path(settings.stack.state_file).expanduser()


def write_state(path: Path, state: StackState) -> None:
    """Atomically (rename), readable by this user only: it names the Ray cluster."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".stack-", dir=path.parent)
    with os.fdopen(fd, "w") as handle:
        json.dump(asdict(state), handle, indent=2, sort_keys=True)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def remove_state(path: Path, pid: int) -> None:
    """Remove the file if it is still ours (a newer stack may have replaced it)."""
    current = read_state(path, check_alive=False)
    if current is not None and current.pid == pid:
        path.unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process, but alive
    return True


def read_state(path: Path, *, check_alive: bool = True) -> StackState | None:
    """The recorded stack, or None when there is none (missing, unreadable, or dead)."""
    try:
        raw = json.loads(path.read_text())
        state = StackState(pid=int(raw["pid"]), started_at=str(raw["started_at"]),
                           endpoints={str(k): str(v) for k, v in raw.get("endpoints", {}).items()},
                           env={str(k): str(v) for k, v in raw.get("env", {}).items()},
                           version=int(raw.get("version", VERSION)))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if check_alive and not pid_alive(state.pid):
        return None
    return state


def export_lines(env: Mapping[str, str]) -> str:
    """``export NAME=value`` lines for a POSIX shell (``eval "$(vidsearch up --print-env)"``)."""
    return "\n".join(f"export {name}={shlex.quote(value)}" for name, value in sorted(env.items()))


# Which stack variable fills which setting: each is applied only when the user left
# that setting unset (an explicit endpoint always wins over discovery).
_FILLS: dict[str, tuple[str, str]] = {
    "KAFKA_BOOTSTRAP": ("broker", "bootstrap"),
    "RAY_ADDRESS": ("ray", "address"),
    "VIDSEARCH_SERVE__GRPC_PORT": ("serve", "grpc_port"),
    "VIDSEARCH_SERVE__GRPC_HOST": ("serve", "grpc_host"),
    "VIDSEARCH_SERVE__APP_NAME": ("serve", "app_name"),
    "VIDSEARCH_STORE__PATH": ("store", "path"),
    "QDRANT_URL": ("store", "url"),
    "VIDSEARCH_BROKER__INGEST_TOPIC": ("broker", "ingest_topic"),
    "VIDSEARCH_BROKER__DLQ_TOPIC": ("broker", "dlq_topic"),
    "VIDSEARCH_BROKER__CONSUMER_GROUP": ("broker", "consumer_group"),
    "VIDSEARCH_MODEL__REGISTRY_ROOT": ("model", "registry_root"),
    "VIDSEARCH_DECODE__ALLOWED_PREFIXES": ("decode", "allowed_prefixes"),
}
# Needed by a process that joins the stack's Ray (token auth), set with RAY_ADDRESS.
# RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps Ray from resolving a loopback address to
# the machine's external one (see services/stack/bind.py).
_RAY_COMPANIONS = ("RAY_AUTH_MODE", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")


def env_for(settings: Settings, auth_mode: str | None) -> dict[str, str]:
    """The environment a second process needs to use the stack ``settings`` describe."""
    env: dict[str, str] = {}
    if settings.broker.bootstrap:
        env["KAFKA_BOOTSTRAP"] = settings.broker.bootstrap
    if settings.ray.address:
        env["RAY_ADDRESS"] = settings.ray.address
        if auth_mode:
            env["RAY_AUTH_MODE"] = auth_mode
        if os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0":
            env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    if settings.store.url:
        env["QDRANT_URL"] = settings.store.url
    else:
        env["VIDSEARCH_STORE__PATH"] = str(Path(settings.store.path).expanduser().resolve())
    env["VIDSEARCH_SERVE__GRPC_PORT"] = str(settings.serve.grpc_port)
    env["VIDSEARCH_SERVE__GRPC_HOST"] = settings.serve.grpc_host
    env["VIDSEARCH_SERVE__APP_NAME"] = settings.serve.app_name
    env["VIDSEARCH_BROKER__INGEST_TOPIC"] = settings.broker.ingest_topic
    env["VIDSEARCH_BROKER__DLQ_TOPIC"] = settings.broker.dlq_topic
    env["VIDSEARCH_BROKER__CONSUMER_GROUP"] = settings.broker.consumer_group
    root = settings.model.registry_root
    env["VIDSEARCH_MODEL__REGISTRY_ROOT"] = root if "://" in root else str(Path(root).expanduser().resolve())
    env["VIDSEARCH_DECODE__ALLOWED_PREFIXES"] = json.dumps(
        [str(Path(p).expanduser().resolve()) if "://" not in p else p for p in settings.decode.allowed_prefixes])
    return env


def _explicit(settings: Settings, section: str, key: str) -> bool:
    return key in getattr(settings, section).model_fields_set


def attach(settings: Settings, config_file: str | None = None,
           environ: dict[str, str] | None = None) -> tuple[Settings, StackState | None]:
    """Settings with the running stack's endpoints filled in where none is set.

    Nothing changes when no live stack is recorded or when the broker, Ray and store
    endpoints are all configured. What is applied is also put into ``environ``
    (default ``os.environ``) so that Ray (``RAY_AUTH_MODE``) and child processes see it.
    """
    environ = os.environ if environ is None else environ
    if settings.broker.bootstrap and settings.ray.address and settings.store.url:
        return settings, None
    state = read_state(state_path(settings))
    if state is None:
        return settings, None
    applied: dict[str, str] = {}
    for name, value in state.env.items():
        target = _FILLS.get(name)
        if target is None or name in environ or _explicit(settings, *target):
            continue
        if target == ("store", "url") and settings.store.url is None and _explicit(settings, "store", "path"):
            continue
        applied[name] = value
    if "RAY_ADDRESS" in applied or environ.get("RAY_ADDRESS") == state.env.get("RAY_ADDRESS"):
        # Joining the stack's own Ray: what it takes (token auth, loopback) comes along.
        for name in _RAY_COMPANIONS:
            if name in state.env and name not in environ:
                applied[name] = state.env[name]
    if not applied:
        return settings, state
    environ.update(applied)
    if applied.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0" and "ray._private.ray_constants" in sys.modules:
        sys.modules["ray._private.ray_constants"].ENABLE_RAY_CLUSTER = False  # ray was imported already
    return load_settings(config_file, env=environ), state
