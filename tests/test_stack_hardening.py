"""The embedded stack as a second process and an operator see it (issue 9, failures 4-6).

One real `vidsearch up` (its own Ray, broker, store, worker and Serve apps, the tiny
preset) is started for the module; the tests attach to it the way a user's second
shell does, with nothing but the state file.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from query_support import free_port, write_test_clip
from vidsearch.config import Settings, load_settings
from vidsearch.services.stack.up_cli import exposure_warning
from vidsearch.stack_state import StackState, attach, export_lines, read_state, write_state

VENV_BIN = Path(sys.executable).parent
START_TIMEOUT_S = 420
LOOPBACK = re.compile(r"^(127\.\d+\.\d+\.\d+|\[::ffff:127\.\d+\.\d+\.\d+\]|\[::1\]):\d+$")
# What a user's second shell has: no endpoint, no Ray auth setting.
STRIPPED = ("KAFKA_BOOTSTRAP", "RAY_ADDRESS", "RAY_AUTH_MODE", "QDRANT_URL", "VIDSEARCH_CONFIG",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")


# --------------------------------------------------------------------------- units

def test_exposure_warning_only_for_non_loopback_without_key():
    assert exposure_warning(Settings()) is None
    line = exposure_warning(load_settings(env={"VIDSEARCH_SERVE__GRPC_HOST": "0.0.0.0"}))
    assert line is not None and "\n" not in line and "serve.grpc_host=0.0.0.0" in line and "VIDSEARCH_API_KEY" in line
    assert exposure_warning(load_settings(env={"VIDSEARCH_SERVE__GRPC_HOST": "0.0.0.0",
                                               "VIDSEARCH_API_KEY": "k"})) is None


def test_defaults_bind_loopback():
    s = Settings()
    assert {s.serve.grpc_host, s.ray.node_ip, s.broker.embedded_host, s.ingest.metrics_host} == {"127.0.0.1"}


def test_attach_fills_only_what_is_unset(tmp_path):
    path = tmp_path / "stack.json"
    env = {"KAFKA_BOOTSTRAP": "127.0.0.1:1", "RAY_ADDRESS": "127.0.0.1:2", "RAY_AUTH_MODE": "token",
           "VIDSEARCH_SERVE__GRPC_PORT": "5555", "VIDSEARCH_STORE__PATH": str(tmp_path / "store")}
    write_state(path, StackState(pid=os.getpid(), started_at="now", env=env))
    environ = {"VIDSEARCH_STACK__STATE_FILE": str(path), "KAFKA_BOOTSTRAP": "mine:9092"}
    settings, state = attach(load_settings(env=environ), environ=environ)
    assert state is not None and settings.broker.bootstrap == "mine:9092"  # explicit wins
    assert settings.ray.address == "127.0.0.1:2" and environ["RAY_AUTH_MODE"] == "token"
    assert settings.serve.grpc_port == 5555 and settings.store.path == str(tmp_path / "store")
    # A dead stack is ignored.
    write_state(path, StackState(pid=2**22 + 12345, started_at="then", env=env))
    assert read_state(path) is None
    environ = {"VIDSEARCH_STACK__STATE_FILE": str(path)}
    settings, state = attach(load_settings(env=environ), environ=environ)
    assert state is None and settings.broker.bootstrap is None


def test_export_lines_round_trip_through_a_shell():
    env = {"KAFKA_BOOTSTRAP": "127.0.0.1:9092", "VIDSEARCH_DECODE__ALLOWED_PREFIXES": '["/a b", "/c"]'}
    out = subprocess.run(["bash", "-c", export_lines(env) + '\nprintf "%s|%s" "$KAFKA_BOOTSTRAP" '
                          '"$VIDSEARCH_DECODE__ALLOWED_PREFIXES"'], capture_output=True, text=True, check=True)
    assert out.stdout == '127.0.0.1:9092|["/a b", "/c"]'


# --------------------------------------------------------------------------- a real stack

class Stack:
    def __init__(self, root: Path, *up_args: str, **env: str) -> None:
        """`vidsearch up *up_args` with its state, store, registry and videos under ``root``;
        ``env`` overrides any of that (two stacks sharing a store and broker data)."""
        self.root = root
        self.state_file = root / "stack.json"
        self.videos = root / "videos"
        self.videos.mkdir()
        self.env = {k: v for k, v in os.environ.items() if k not in STRIPPED}
        self.env.update({
            "VIDSEARCH_STACK__STATE_FILE": str(self.state_file), "VIDSEARCH_STORE__PATH": str(root / "store"),
            "VIDSEARCH_MODEL__REGISTRY_ROOT": str(root / "registry"), "VIDSEARCH_MODEL__PRESET": "tiny",
            "VIDSEARCH_MODEL__USE_SHIPPED": "false", "VIDSEARCH_MODEL__DEVICE": "cpu",
            "VIDSEARCH_SERVE__GRPC_PORT": str(free_port()), "VIDSEARCH_SERVE__HTTP_PORT": str(free_port()),
            "VIDSEARCH_SERVE__WEB_ENABLED": "false", "VIDSEARCH_RAY__NUM_CPUS": "4",
            "VIDSEARCH_INGEST__METRICS_PORT": str(free_port()),
            "VIDSEARCH_DECODE__ALLOWED_PREFIXES": json.dumps([str(self.videos)]),
            "VIDSEARCH_STACK__WORKER_RESTART_INITIAL_S": "0.5",
        })
        self.env.update(env)
        self.log = open(root / "up.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([str(VENV_BIN / "vidsearch"), "up", *up_args], env=self.env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def second_shell(self) -> dict[str, str]:
        """A user's other shell: only the state file's location (set for the test)."""
        keep = ("VIDSEARCH_STACK__STATE_FILE", "VIDSEARCH_MODEL__DEVICE")
        return {**{k: v for k, v in self.env.items() if not k.startswith("VIDSEARCH_")},
                **{k: self.env[k] for k in keep}}

    def run(self, *args: str, env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
        return subprocess.run([str(VENV_BIN / "vidsearch"), *args], env=env or self.second_shell(),
                              capture_output=True, text=True, timeout=timeout)

    def output(self) -> str:
        return (self.root / "up.log").read_text(errors="replace")

    def wait_for(self, predicate, what: str, timeout_s: float = START_TIMEOUT_S):
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"vidsearch up exited: {self.output()[-3000:]}"
            found = predicate()
            if found:
                return found
            time.sleep(1)
        raise AssertionError(f"timed out waiting for {what}: {self.output()[-3000:]}")

    def stop(self, whole_group: bool = True) -> int:
        """SIGTERM to the whole process group, as `timeout`, systemd and `kill -- -PGID` send it
        (Ray's own processes get it too; before: exit 1 after Ray's 60 s GCS reconnect), or to
        `vidsearch up` alone, as `kill PID` sends it."""
        if self.proc.poll() is None:
            if whole_group:
                os.killpg(self.proc.pid, signal.SIGTERM)
            else:
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def descendants(pid: int) -> set[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout.split()
    children: dict[int, list[int]] = {}
    for child, parent in zip(map(int, out[0::2]), map(int, out[1::2])):
        children.setdefault(parent, []).append(child)
    found, todo = set(), [pid]
    while todo:
        current = todo.pop()
        found.add(current)
        todo.extend(children.get(current, []))
    return found


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def listening(pids: set[int]) -> list[str]:
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
    addresses = []
    for line in out.splitlines():
        owners = {int(p) for p in re.findall(r"pid=(\d+)", line)}
        if owners & pids:
            addresses.append(line.split()[3])
    return addresses


def worker_pids(stack: Stack) -> list[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,args="], capture_output=True, text=True).stdout
    tree = descendants(stack.proc.pid)
    return [int(line.split()[0]) for line in out.splitlines()
            if "ingest-worker" in line and int(line.split()[0]) in tree]


def test_sigterm_to_the_stack_alone_shuts_ray_serve_and_the_store_down_in_order(tmp_path):
    """`kill PID`: Ray's processes did not get the signal, so after its grace period the stack
    stops Serve and the store itself. Runs before the module's stack exists (one Ray at a time)."""
    alone = Stack(tmp_path)
    try:
        alone.wait_for(lambda: read_state(alone.state_file), "the state file")
        pids = descendants(alone.proc.pid)
    finally:
        code = alone.stop(whole_group=False)
    output = alone.output()
    assert code == 0, output[-3000:]
    assert "the local Ray was stopped from outside" not in output, output[-3000:]
    assert "Failed to connect to GCS" not in output and "failed to shut down" not in output, output[-3000:]
    assert not alone.state_file.exists()
    deadline = time.monotonic() + 30
    while (left := [pid for pid in pids if alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"processes of the stack outlived it: {left}"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    started = Stack(tmp_path_factory.mktemp("stack"))
    try:
        started.wait_for(lambda: read_state(started.state_file), "the state file")
        yield started
    finally:
        code = started.stop()
        assert code == 0, started.output()[-3000:]
        assert "the local Ray was stopped from outside" in started.output(), started.output()[-3000:]
        assert "Failed to connect to GCS" not in started.output()
        assert not started.state_file.exists(), "the state file outlived the stack"


def test_print_env_gives_what_a_second_process_needs(stack):
    result = stack.run("up", "--print-env")
    assert result.returncode == 0, result.stderr
    exports = dict(re.findall(r"^export ([A-Z_]+)=(.*)$", result.stdout, flags=re.M))
    assert {"KAFKA_BOOTSTRAP", "RAY_ADDRESS", "RAY_AUTH_MODE", "VIDSEARCH_SERVE__GRPC_PORT"} <= set(exports)
    assert exports["RAY_AUTH_MODE"] == "token"
    assert exports["VIDSEARCH_SERVE__GRPC_PORT"] == stack.env["VIDSEARCH_SERVE__GRPC_PORT"]


def test_everything_the_stack_starts_listens_on_loopback(stack):
    """Before: gRPC on *:port and Ray on the external address."""
    stack.wait_for(lambda: worker_pids(stack), "the ingest worker")
    addresses = listening(descendants(stack.proc.pid))
    grpc_port = stack.env["VIDSEARCH_SERVE__GRPC_PORT"]
    assert any(a.endswith(f":{grpc_port}") for a in addresses), addresses
    assert any(a.endswith(f":{stack.env['VIDSEARCH_INGEST__METRICS_PORT']}") for a in addresses), addresses
    exposed = [a for a in addresses if not LOOPBACK.match(a)]
    assert not exposed, f"listening beyond loopback: {exposed}"


def test_ingest_and_search_find_the_stack_by_themselves(stack):
    clip = write_test_clip(stack.videos / "found.mp4", 1)
    result = stack.run("ingest", str(clip), "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "published 1 message(s)" in result.stdout
    assert result.stderr == ""  # quiet by default: no kafka-python (or own) INFO lines

    def searchable():
        found = stack.run("search", "a clip", "--no-rerank")
        return found.returncode == 0 and "found" in found.stdout and found

    assert searchable() or stack.wait_for(searchable, "the ingested clip to be searchable", 240)


def test_status_reports_every_piece(stack):
    stack.wait_for(lambda: json.loads(stack.run("status", "--json").stdout)["health"].get("worker", {}).get("ok"),
                   "the worker to join its group", 240)
    result = stack.run("status", "--json")
    status = json.loads(result.stdout)
    assert {name for name, h in status["health"].items() if h["ok"]} >= {"broker", "ray", "store", "worker", "serve"}, status
    assert set(status["lag"]) == {f"videos.ingest:{p}" for p in range(4)}
    assert status["dlq_records"] == 0 and status["live_index"] in (None, f"videos__{status['model_version']}")
    text = stack.run("status")
    assert "consumer lag: " in text.stdout and "serve" in text.stdout


def test_a_worker_on_the_wrong_auth_fails_in_one_line(stack):
    """Before: three chained InvalidAuthToken tracebacks, nothing saying what to set."""
    env = {**stack.second_shell(), "RAY_AUTH_MODE": "disabled"}
    state = read_state(stack.state_file)
    env.update({"RAY_ADDRESS": state.env["RAY_ADDRESS"], "KAFKA_BOOTSTRAP": state.env["KAFKA_BOOTSTRAP"],
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "VIDSEARCH_INGEST__METRICS_PORT": "0"})
    result = stack.run("ingest-worker", env=env, timeout=120)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("vidsearch ingest-worker:")]
    assert "RAY_AUTH_MODE=token" in line


def test_a_dead_worker_is_restarted_not_the_stack_stopped(stack):
    """Before: `vidsearch up` shut everything down within seconds of its worker dying."""
    (first,) = stack.wait_for(lambda: worker_pids(stack), "the ingest worker")
    os.kill(first, signal.SIGKILL)
    restarted = stack.wait_for(lambda: [p for p in worker_pids(stack) if p != first], "a restarted worker", 120)
    assert restarted and stack.proc.poll() is None
    assert "ingest worker exited; restarting" in stack.output()
