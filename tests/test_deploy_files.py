"""deploy/Dockerfile and deploy/docker-compose.yml, checked without a container engine:
they parse, keep the security and packaging promises, and every `vidsearch` command
line in them exists in the CLI (each runs with --help, and parses with the real parser)."""
from __future__ import annotations

import importlib
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vidsearch.cli import COMMANDS, build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
COMPOSE = ROOT / "deploy" / "docker-compose.yml"
VIDSEARCH = Path(sys.executable).with_name("vidsearch")


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: comments dropped, continuations joined."""
    lines, current = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    assert not current, "Dockerfile ends inside a continued line"
    out = []
    for line in lines:
        word, _, rest = line.partition(" ")
        assert re.fullmatch(r"[A-Z]+", word), f"not an instruction: {line!r}"
        out.append((word, rest.strip()))
    return out


@pytest.fixture(scope="module")
def instructions() -> list[tuple[str, str]]:
    return dockerfile_instructions(DOCKERFILE.read_text())


def stages(instructions: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    out: list[list[tuple[str, str]]] = []
    for word, rest in instructions:
        if word == "FROM":
            out.append([])
        if out:
            out[-1].append((word, rest))
    return out


KNOWN = {"ARG", "FROM", "ENV", "RUN", "WORKDIR", "COPY", "USER", "EXPOSE", "HEALTHCHECK", "ENTRYPOINT", "CMD", "LABEL"}


def test_dockerfile_parses_and_is_multi_stage(instructions):
    assert {word for word, _ in instructions} <= KNOWN
    build, runtime = stages(instructions)
    assert build[0][1].endswith("AS build") and runtime[0][1].endswith("AS runtime")
    copies_from_build = [rest for word, rest in runtime if word == "COPY" and rest.startswith("--from=build")]
    assert {"--from=build /opt/venv /opt/venv", "--from=build /opt/vidsearch /opt/vidsearch"} <= set(copies_from_build)


def test_dockerfile_runs_as_a_non_root_user_with_a_healthcheck(instructions):
    runtime = stages(instructions)[-1]
    users = [rest for word, rest in runtime if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    (healthcheck,) = [rest for word, rest in runtime if word == "HEALTHCHECK"]
    command = json.loads(healthcheck.split(" CMD ", 1)[1])
    script = ROOT / command[0].replace("/opt/vidsearch/", "")
    assert script.is_file() and os.access(script, os.X_OK)
    assert "50051" in " ".join(rest for word, rest in runtime if word == "EXPOSE")


def test_dockerfile_installs_the_package_with_protos_gpu_torch_and_the_shipped_model(instructions):
    build = stages(instructions)[0]
    runs = " ".join(rest for word, rest in build if word == "RUN")
    # The editable install runs setup.py, which generates the gRPC code; the smoke import proves it.
    assert "pip install --no-build-isolation -e ." in runs and "vidsearch.v1.search_pb2_grpc" in runs
    copies = [rest.split() for word, rest in build if word == "COPY"]
    assert ["deploy/models", "./deploy/models"] in copies
    from vidsearch.models.shipped import SHIPPED_REGISTRY

    # The shipped model's known path: the package finds it beside itself, as in the image.
    assert SHIPPED_REGISTRY == ROOT / "deploy" / "models" and (SHIPPED_REGISTRY / "vidsearch" / "aliases.json").is_file()
    # torch comes from the package's own pin (PyPI's Linux wheel is the CUDA build), never a CPU index.
    assert "download.pytorch.org/whl/cpu" not in runs and "torch==2.14.1" in (ROOT / "pyproject.toml").read_text()
    ignore = (ROOT / "deploy" / "Dockerfile.dockerignore").read_text()
    for needed in ("pyproject.toml", "protos/**", "shared/**", "services/**", "deploy/models/**"):
        assert f"!{needed}" in ignore


def test_dockerfile_sets_no_vidsearch_settings(instructions):
    """The environment beats a settings file: an image default would override the chart."""
    envs = " ".join(rest for word, rest in instructions if word == "ENV")
    assert "VIDSEARCH_" not in envs and "QDRANT_" not in envs and "KAFKA_" not in envs


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_parses_with_kafka_kraft_qdrant_and_vidsearch(compose):
    services = compose["services"]
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert "controller" in services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"]  # KRaft, no ZooKeeper
    assert services["qdrant"]["image"].startswith("qdrant/qdrant:")
    commands = {name: s.get("command") for name, s in services.items()}
    assert commands["serve"] == ["vidsearch", "serve"] and commands["worker"] == ["vidsearch", "ingest-worker"]
    assert commands["up"] == ["vidsearch", "up"]
    for name in ("init", "serve", "worker", "up"):
        env = services[name]["environment"]
        # Only the Kafka protocol and Qdrant's API: endpoints of the two servers, nothing embedded.
        assert env["KAFKA_BOOTSTRAP"] == "kafka:9092" and env["QDRANT_URL"] == "http://qdrant:6333"
        assert services[name]["user"] == "10001:10001" and services[name]["read_only"] is True
        assert services[name]["cap_drop"] == ["ALL"]


def test_compose_holds_no_secret_and_publishes_only_on_loopback(compose):
    for name, service in compose["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if re.search(r"API_KEY|PASSWORD|SECRET", key):
                assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]+\}", value), (name, key)
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)


def command_lines() -> list[list[str]]:
    """Every vidsearch command line of the Dockerfile and the compose file."""
    lines = []
    for word, rest in dockerfile_instructions(DOCKERFILE.read_text()):
        if word in ("CMD", "ENTRYPOINT", "RUN"):
            argv = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
            if argv and argv[0] == "vidsearch":
                lines.append(argv)
    for service in yaml.safe_load(COMPOSE.read_text())["services"].values():
        command = service.get("command")
        if command and command[0] == "vidsearch":
            lines.append(command)
    return lines


def test_there_are_commands_to_check():
    names = {argv[1] for argv in command_lines() if len(argv) > 1}
    assert {"serve", "ingest-worker", "up", "models"} <= names


@pytest.mark.parametrize("argv", command_lines(), ids=lambda argv: " ".join(argv))
def test_every_command_exists_in_the_cli(argv):
    if argv[1:] == ["--help"]:
        args = argv
    else:
        # The real parser rejects an unknown command or option (SystemExit 2).
        parser, sub = build_parser()
        assert argv[1] in COMMANDS, argv
        module = importlib.import_module(COMMANDS[argv[1]][0])
        module.configure(sub.choices[argv[1]])
        parser.parse_args(argv[1:])
        args = [*argv, "--help"]
    result = subprocess.run([str(VIDSEARCH), *args[1:]], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "VIDSEARCH_CONFIG": ""})
    assert result.returncode == 0, result.stderr
    assert "usage: vidsearch" in result.stdout


def test_models_install_shipped_imports_once_then_is_a_no_op(tmp_path):
    """What the chart's init container and compose's `init` run against an empty registry."""
    import contextlib
    import io

    from vidsearch.cli import main
    from vidsearch.models.shipped import shipped_version

    config = tmp_path / "settings.yaml"
    config.write_text(f"model:\n  registry_root: {tmp_path / 'registry'}\n")

    def run(*extra: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["--config", str(config), "--log-level", "WARNING", *extra, "models", "install-shipped"])
        return code, out.getvalue(), err.getvalue()

    version = shipped_version()
    assert run() == (0, f"{version} installed as production in {tmp_path / 'registry'}\n", "")
    assert run()[:2] == (0, f"{version} already production in {tmp_path / 'registry'}\n")
    listing = io.StringIO()
    with contextlib.redirect_stdout(listing):
        assert main(["--config", str(config), "models", "list", "--no-store"]) == 0
    assert version in listing.getvalue() and "production" in listing.getvalue()
    config.write_text(f"model:\n  registry_root: {tmp_path / 'empty'}\n  use_shipped: false\n")
    code, out, err = run()
    assert code == 1 and out == "" and err.count("\n") == 1 and "model.use_shipped is off" in err
