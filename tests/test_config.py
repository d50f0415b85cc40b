"""Settings: sources, precedence, and one-line errors that name the setting."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vidsearch.cli import main
from vidsearch.config import ConfigError, load_settings


def test_defaults_are_valid() -> None:
    settings = load_settings(env={})
    assert settings.broker.bootstrap is None and settings.store.url is None  # embedded default
    assert settings.decode.num_frames == 12


def test_precedence_defaults_file_env(tmp_path: Path) -> None:
    config = tmp_path / "vidsearch.yaml"
    config.write_text("ingest:\n  encoder_actors: 2\n  decode_parallelism: 3\nserve:\n  beta: 0.3\n")
    settings = load_settings(config, env={"VIDSEARCH_INGEST__ENCODER_ACTORS": "5"})
    assert settings.ingest.encoder_actors == 5  # env beats file
    assert settings.ingest.decode_parallelism == 3  # file beats default
    assert settings.serve.beta == 0.3


def test_config_file_from_environment(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("broker:\n  partitions: 8\n")
    assert load_settings(env={"VIDSEARCH_CONFIG": str(config)}).broker.partitions == 8


def test_well_known_endpoint_variables() -> None:
    settings = load_settings(env={"KAFKA_BOOTSTRAP": "kafka:9092", "QDRANT_URL": "http://qdrant:6333",
                                  "QDRANT_API_KEY": "s3cret", "RAY_ADDRESS": "ray://head:10001"})
    assert settings.broker.bootstrap == "kafka:9092"
    assert settings.store.url == "http://qdrant:6333"
    assert settings.store.api_key.get_secret_value() == "s3cret"
    assert settings.ray.address == "ray://head:10001"
    assert "s3cret" not in str(settings.dump())  # secrets never reach logs


def test_list_setting_from_environment_json() -> None:
    settings = load_settings(env={"VIDSEARCH_DECODE__ALLOWED_PREFIXES": '["/data", "/media"]'})
    assert settings.decode.allowed_prefixes == ["/data", "/media"]


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"VIDSEARCH_INGEST__ENCODER_ACTORS": "zero"}, "ingest.encoder_actors"),
        ({"VIDSEARCH_SERVE__BETA": "1.5"}, "serve.beta"),
        ({"VIDSEARCH_DECODE__SAMPLING": "random"}, "decode.sampling"),
        ({"VIDSEARCH_INGEST__NO_SUCH_FIELD": "1"}, "ingest.no_such_field"),
        ({"VIDSEARCH_NOSECTION__X": "1"}, "nosection"),
        ({"VIDSEARCH_SERVE__DEFAULT_TOP_K": "60", "VIDSEARCH_SERVE__DEFAULT_RECALL_K": "20"}, "default_recall_k"),
    ],
)
def test_bad_setting_names_the_setting(env: dict, named: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env=env)
    message = str(info.value)
    assert named in message and "\n" not in message


def test_bad_config_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_settings(tmp_path / "missing.yaml", env={})
    broken = tmp_path / "broken.yaml"
    broken.write_text("serve: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(broken, env={})
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_settings(scalar, env={})


def test_cli_bad_setting_exits_2_with_one_line(capsys, monkeypatch) -> None:
    monkeypatch.setenv("VIDSEARCH_SERVE__GRPC_PORT", "99999")
    assert main(["config"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "serve.grpc_port" in err


def test_cli_prints_effective_settings_and_table() -> None:
    out = subprocess.run([sys.executable, "-m", "vidsearch.cli", "config"], capture_output=True, text=True,
                         env={"VIDSEARCH_BROKER__PARTITIONS": "7", "PATH": "/usr/bin:/bin"}, check=True).stdout
    assert "partitions: 7" in out
    table = subprocess.run([sys.executable, "-m", "vidsearch.cli", "config", "--table"], capture_output=True,
                           text=True, check=True).stdout
    assert "`KAFKA_BOOTSTRAP` or `VIDSEARCH_BROKER__BOOTSTRAP`" in table


def test_cli_without_command_is_usage_error(capsys) -> None:
    assert main([]) == 2
