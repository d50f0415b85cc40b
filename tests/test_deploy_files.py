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


def stages(instructions: list[tuple[str, str]]) -> dict[str, list[tuple[str, str]]]:
    """Stage name -> its instructions (FROM first), in order."""
    out: dict[str, list[tuple[str, str]]] = {}
    name = None
    for word, rest in instructions:
        if word == "FROM":
            match = re.fullmatch(r"(\S+) AS (\w+)", rest)
            assert match, f"unnamed stage: FROM {rest}"
            name = match.group(2)
            out[name] = []
        if name:
            out[name].append((word, rest))
    return out


def chain(instructions: list[tuple[str, str]], stage: str | None = None) -> list[tuple[str, str]]:
    """What the final (or the named) stage is built from: its parents' instructions, then its own."""
    by_name = stages(instructions)
    stage = stage or list(by_name)[-1]
    parent = by_name[stage][0][1].split()[0]
    own = by_name[stage][1:]
    return (chain(instructions, parent) if parent in by_name else []) + own


KNOWN = {"ARG", "FROM", "ENV", "RUN", "WORKDIR", "COPY", "USER", "EXPOSE", "HEALTHCHECK", "ENTRYPOINT", "CMD", "LABEL"}
SOURCE = ("pyproject.toml", "setup.py", "protos", "shared", "services")
CONSTRAINTS = ROOT / "deploy" / "constraints.txt"


def constraints() -> dict[str, tuple[str, str]]:
    """deploy/constraints.txt: canonical name -> (version, sha256)."""
    out = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        match = re.fullmatch(r"([a-z0-9-]+)==(\S+) --hash=sha256:([0-9a-f]{64})", line)
        assert match, f"not an exact, hashed pin: {line!r}"
        assert match.group(1) not in out, f"listed twice: {match.group(1)}"
        out[match.group(1)] = (match.group(2), match.group(3))
    return out


def test_dockerfile_parses_and_the_image_is_its_last_stage(instructions):
    assert {word for word, _ in instructions} <= KNOWN
    by_name = stages(instructions)
    assert list(by_name)[-1] == "runtime"
    # Every stage starts from the base ARG or an earlier stage: no second, unpinned base.
    names: list[str] = []
    for name, body in by_name.items():
        parent = body[0][1].split()[0]
        assert parent == "${PYTHON_IMAGE}" or parent in names, (name, parent)
        names.append(name)


def test_the_base_is_pinned_by_digest_in_a_documented_arg():
    text = DOCKERFILE.read_text()
    before_from = text[: text.index("\nFROM ")]
    match = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", before_from, re.M)
    assert match, "the base is not an ARG declared before the first FROM"
    assert re.fullmatch(r"[\w.\-/]+:3\.11-slim-bookworm@sha256:[0-9a-f]{64}", match.group(1)), match.group(1)
    comment = before_from[: match.start()].rsplit("\n\n", 1)[-1]
    assert "digest" in comment and "NOT pulled" in comment  # what is and isn't verified
    script = (ROOT / "deploy" / "build_image.sh").read_text()
    # A base given to the script by tag is pinned (or refused) before the build.
    assert '--build-arg "PYTHON_IMAGE=$(pinned_base "$PYTHON_IMAGE")"' in script and "is a tag" in script


def test_dependencies_are_installed_from_the_hashed_constraints_before_any_source(instructions):
    steps = chain(instructions)
    copies = [(i, rest.split()[:-1]) for i, (word, rest) in enumerate(steps) if word == "COPY"]
    installs = [i for i, (word, rest) in enumerate(steps) if word == "RUN" and "constraints.txt" in rest]
    assert len(installs) == 1
    (install,) = installs
    run = steps[install][1]
    assert re.search(r"pip install --no-deps --require-hashes -r /\S*constraints\.txt", run) and "pip check" in run
    # Before the torch layer only the constraints file is copied: a source edit can't invalidate it.
    before = [src for i, srcs in copies if i < install for src in srcs]
    assert before == ["deploy/constraints.txt"], before
    after = {src for i, srcs in copies if i > install for src in srcs}
    assert set(SOURCE) <= after
    # The package itself comes after, from the source, with nothing more downloaded.
    (editable,) = [i for i, (word, rest) in enumerate(steps) if word == "RUN" and " -e ." in rest]
    assert editable > max(i for i, srcs in copies if set(srcs) & set(SOURCE))
    assert "pip install --no-deps --no-build-isolation -e ." in steps[editable][1]
    # The build context must hold the constraints, or the COPY fails.
    assert "!deploy/constraints.txt" in (ROOT / "deploy" / "Dockerfile.dockerignore").read_text().split()


def test_constraints_pin_every_dependency_the_image_needs():
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pinned = constraints()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = [Requirement(r) for r in project["project"]["dependencies"]]
    needed += [Requirement(r) for r in project["build-system"]["requires"]]
    # The object-store filesystems of model.registry_root and the tools of the editable install.
    needed += [Requirement(r) for r in ("s3fs", "gcsfs", "pip", "wheel")]
    for req in needed:
        name = canonicalize_name(req.name)
        assert name in pinned, f"{name} is not in deploy/constraints.txt (run: deploy/build_image.sh lock)"
        assert req.specifier.contains(pinned[name][0], prereleases=True), (str(req), pinned[name][0])
    assert "vidsearch" not in pinned  # the package comes from the source, never the index


def test_the_image_runs_as_10001_with_a_writable_registry_and_a_read_only_source(instructions, compose):
    steps = chain(instructions)
    users = [rest for word, rest in steps if word == "USER"]
    assert users and users[-1] == "10001:10001" and users[-1].split(":")[0] not in ("0", "root")
    runs = " ".join(rest for word, rest in steps if word == "RUN")
    assert "useradd --uid 10001 --gid 10001" in runs
    # compose's `registry` named volume takes the mount point's owner from the image.
    mounts = [v.split(":")[1] for v in compose["x-vidsearch"]["volumes"] if v.startswith("registry:")]
    assert mounts == ["/data/registry"]
    assert "mkdir -p /data/registry" in runs and re.search(r"chown 10001:10001 [^&]*/data/registry", runs)
    # The source tree is copied as root: the user can read it, not change it.
    assert not [rest for word, rest in steps if word == "COPY" and "--chown" in rest]


def test_dockerfile_has_a_healthcheck_and_the_grpc_port(instructions):
    steps = chain(instructions)
    (healthcheck,) = [rest for word, rest in steps if word == "HEALTHCHECK"]
    command = json.loads(healthcheck.split(" CMD ", 1)[1])
    script = ROOT / command[0].replace("/opt/vidsearch/", "")
    assert script.is_file() and os.access(script, os.X_OK)
    assert "50051" in " ".join(rest for word, rest in steps if word == "EXPOSE")
    # buildah's default (OCI) image format drops HEALTHCHECK.
    assert "--format docker" in (ROOT / "deploy" / "build_image.sh").read_text()


def test_dockerfile_installs_the_package_with_protos_gpu_torch_and_the_shipped_model(instructions):
    steps = chain(instructions)
    runs = " ".join(rest for word, rest in steps if word == "RUN")
    # The editable install runs setup.py, which generates the gRPC code; the smoke import proves it.
    assert "vidsearch.v1.search_pb2_grpc" in runs and "grpcio-tools" in constraints()
    copies = [rest.split() for word, rest in steps if word == "COPY"]
    assert ["deploy/models", "./deploy/models"] in copies
    from vidsearch.models.shipped import SHIPPED_REGISTRY

    # The shipped model's known path: the package finds it beside itself, as in the image.
    assert SHIPPED_REGISTRY == ROOT / "deploy" / "models" and (SHIPPED_REGISTRY / "vidsearch" / "aliases.json").is_file()
    # torch is PyPI's Linux wheel (the CUDA build) at the package's pin, never a CPU index.
    assert "download.pytorch.org/whl/cpu" not in runs and "torch==2.14.1" in (ROOT / "pyproject.toml").read_text()
    assert constraints()["torch"][0] == "2.14.1" and "nvidia-cudnn-cu13" in constraints()
    ignore = (ROOT / "deploy" / "Dockerfile.dockerignore").read_text()
    for needed in ("pyproject.toml", "protos/**", "shared/**", "services/**", "deploy/models/**"):
        assert f"!{needed}" in ignore


def test_make_image_runs_the_build_script_outside_make_test():
    makefile = (ROOT / "Makefile").read_text()
    match = re.search(r"^image:[^\n]*\n((?:\t[^\n]*\n)+)", makefile, re.M)
    assert match and "deploy/build_image.sh" in match.group(1)
    test_deps = re.search(r"^test:([^\n]*)", makefile, re.M).group(1).split()
    assert "image" not in test_deps


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
            try:
                argv = json.loads(rest)  # exec form
            except json.JSONDecodeError:
                argv = shlex.split(rest)  # shell form (may itself start with a [ test ])
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
