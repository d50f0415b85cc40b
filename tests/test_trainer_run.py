"""End to end: `vidsearch train` on a real synthetic dataset (PyAV files), a tiny open_clip
model and real Ray Train: report, learning, publish into a real registry and the gate;
two data-parallel workers; and a run killed mid-stage that resumes from its checkpoint.

The runs share the session's local Ray (``ray_local``), except the killed run, which is
a separate `vidsearch train` process with its own Ray, killed with its whole session.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from vidsearch.cli import main
from vidsearch.config import load_settings
from vidsearch.models.persist import PRODUCTION_ALIAS, load_model_version
from vidsearch.registry import ModelRegistry
from vidsearch.services.trainer.config import parse_run_config
from vidsearch.services.trainer.job import TrainResult, run_training

from trainer_support import (  # noqa: F401 (keep_logging: autouse)
    base_config, keep_logging, read_json, untrained_recall, write_config, write_synth,
)

pytestmark = pytest.mark.usefixtures("ray_local")

MODEL_NAME = "vidsearch"
# Enough backbone steps for the tiny model to learn this dataset beyond chance: on this machine
# the teacher's val/test R@1 average about 40 against about 7 for the untrained student (100
# steps stayed near chance). The teacher and distil stages only need to run.
MAIN_STAGES = {"backbone": {"steps": 150, "batch_size": 16},
               "teacher": {"steps": 10, "batch_size": 16},
               "distill": {"steps": 10, "batch_size": 8}}
# The killed-and-resumed run and the two-worker run: short, checkpointing every 5 steps; their
# backbone also trains on event phrases, so resuming and sharding cover that loss too.
SHORT_STAGES = {"backbone": {"steps": 40, "batch_size": 16, "phrase_weight": 1.0},
                "teacher": {"steps": 6, "batch_size": 8},
                "distill": {"steps": 6, "batch_size": 8}}
MARGIN = 10.0  # R@1 points the trained teacher must beat the untrained student by


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return write_synth(tmp_path_factory.mktemp("trainer-data") / "synth", n=60, seed=1)


@pytest.fixture(scope="module")
def settings():
    return load_settings(None)


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("vidsearch train:")]


@dataclass
class PublishedRun:
    code: int
    out: str
    err: str
    config_file: Path
    run_dir: Path
    registry: ModelRegistry


@pytest.fixture(scope="module")
def published(tmp_path_factory, synth) -> PublishedRun:
    """One CLI run with publishing on, into an empty registry, re-index never."""
    root = tmp_path_factory.mktemp("trainer-main")
    config = base_config(root / "run", synth, registry=root / "registry", name="main",
                         checkpoint_every=50, eval_every=75, stages=MAIN_STAGES)
    config_file = write_config(root / "run.yaml", config)
    code, out, err = run_cli(["train", "--config", str(config_file)])
    return PublishedRun(code, out, err, config_file, root / "run", ModelRegistry(str(root / "registry")))


def test_cli_run_exits_0_and_writes_the_run_directory(published):
    assert published.code == 0, published.err[-3000:]
    assert not error_lines(published.err)
    run_dir = published.run_dir
    for name in ("run.yaml", "report.md", "losses.png", "val_r1.png", "final/metrics.json", "final/logs.json",
                 "final/model.safetensors"):
        assert (run_dir / name).is_file(), name
    for png in ("losses.png", "val_r1.png"):
        assert (run_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = parse_run_config(yaml.safe_load((run_dir / "run.yaml").read_text()))
    assert saved.stages.backbone.steps == 150 and saved.run_dir == str(run_dir.resolve())
    report = (run_dir / "report.md").read_text()
    assert "# Training run `main`" in report and "| backbone | 150 |" in report and "![losses](losses.png)" in report
    assert "run main: report" in published.out and "published " in published.out


def test_every_stage_ran_and_the_backbone_loss_went_down(published):
    logs = read_json(published.run_dir / "final" / "logs.json")
    assert list(logs) == ["backbone", "teacher", "distill", "baseline"]
    for stage, steps in (("backbone", 150), ("teacher", 10), ("distill", 10), ("baseline", 10)):
        assert logs[stage]["steps"] == steps and len(logs[stage]["losses"]) == steps
    assert set(logs["teacher"]["parts"]) == {"in", "moment"}
    assert set(logs["distill"]["parts"]) == {"in", "cgt", "fgt"}
    losses = logs["backbone"]["losses"]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert first > last + 0.5, (first, last)
    # The val curve: every eval_every steps and at each stage's end.
    assert [step for step, _ in logs["backbone"]["evals"]] == [75, 150]


def test_the_trained_teacher_beats_the_untrained_student(published):
    metrics = read_json(published.run_dir / "final" / "metrics.json")["metrics"]
    untrained = {split: untrained_recall(published.run_dir, split)["student"]["R@1"] for split in ("val", "test")}
    trained = {split: metrics[f"{split}.teacher.R@1"] for split in ("val", "test")}
    # Averaged over val and test (12 videos each) to keep one split's luck out of it.
    mean_trained, mean_untrained = sum(trained.values()) / 2, sum(untrained.values()) / 2
    assert mean_trained > mean_untrained + MARGIN, (trained, untrained)
    # Every row the report and the gate read is there, for both splits.
    for split in ("val", "test"):
        for row in ("student", "teacher", "rerank@10", "baseline_student"):
            assert f"{split}.{row}.R@1" in metrics and f"{split}.{row}.MdR" in metrics


def test_the_published_version_describes_its_run(published):
    registry, run_dir = published.registry, published.run_dir
    versions = registry.list_versions(MODEL_NAME)
    assert len(versions) == 1
    version = versions[0]
    assert f"published {version} (parent none;" in published.out
    assert registry.get_alias(MODEL_NAME, PRODUCTION_ALIAS) == version
    manifest = registry.get_manifest(MODEL_NAME, version)
    final = read_json(run_dir / "final" / "metrics.json")
    assert manifest.parent is None
    assert manifest.metrics == final["metrics"]
    assert ":trained:" in manifest.frame_encoder and manifest.frame_encoder == final["frame_encoder"]
    run_config = manifest.training["run_config"]
    assert run_config["name"] == "main" and run_config["stages"]["backbone"]["steps"] == 150
    assert run_config["publish"]["reindex"] == "never"
    assert manifest.training["gate"]["production"] is None
    assert manifest.training["stages"]["backbone"]["steps"] == 150
    assert {"report.md", "losses.png", "val_r1.png"} <= set(manifest.files)
    assert registry.read_file(MODEL_NAME, version, "report.md") == (run_dir / "report.md").read_bytes()
    # The published weights are the run's final weights, and load as a model.
    model, loaded = load_model_version(registry, MODEL_NAME, PRODUCTION_ALIAS, device="cpu")
    assert loaded.version == version
    final_weights = load_file(str(run_dir / "final" / "model.safetensors"))
    state = model.state_dict()
    assert set(state) == set(final_weights)
    assert all(state[k].equal(final_weights[k]) for k in final_weights)


# ---------------------------------------------------------------- kill and resume
def session_processes(sid: int) -> list[int]:
    """Live processes of the session ``sid`` (the killed run and everything it started)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[3]) == sid and fields[0] != "Z":  # fields[3]: session id; Z: zombie
            found.append(int(entry.name))
    return found


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL the run's process group, then anything of its session that left the group."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 60
    while (left := session_processes(proc.pid)) and time.monotonic() < deadline:
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
    assert not session_processes(proc.pid), "processes of the killed run are still alive"


@dataclass
class ResumedRun:
    killed_at: dict
    killed_log: str
    result: TrainResult


@pytest.fixture(scope="module")
def resumed(tmp_path_factory, synth, settings) -> ResumedRun:
    """A `vidsearch train` process killed (SIGKILL, whole session) after its first backbone
    checkpoint, then the same run directory trained to the end in this process."""
    root = tmp_path_factory.mktemp("trainer-resume")
    run_dir = root / "run"
    # The killed run records a val check every 5 steps; the resumed one only at the end,
    # so the val history in the final log shows which steps came from the checkpoint.
    config = base_config(run_dir, synth, name="resume", checkpoint_every=5, eval_every=5, stages=SHORT_STAGES)
    config_file = write_config(root / "run.yaml", config)
    state = run_dir / "checkpoints" / "backbone" / "state.json"
    log_file = root / "killed.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with log_file.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "vidsearch.cli", "train", "--config", str(config_file)],
                                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 480
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if json.loads(state.read_text())["step"] >= 5:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.1)
        running = proc.poll() is None
    finally:
        kill_session(proc)
    assert running, f"the run ended (rc {proc.returncode}) before a checkpoint:\n{log_file.read_text()[-3000:]}"
    killed_at = read_json(state)
    assert not (run_dir / "final" / "metrics.json").exists()

    cfg = parse_run_config({**config, "eval_every": 1000})
    result = run_training(cfg, settings, progress=False)
    return ResumedRun(killed_at=killed_at, killed_log=log_file.read_text(), result=result)


def test_a_killed_run_resumes_from_its_checkpoint(resumed):
    total = SHORT_STAGES["backbone"]["steps"]
    killed_step = resumed.killed_at["step"]
    assert 5 <= killed_step < total and not resumed.killed_at["done"]
    result = resumed.result
    assert (result.run_dir / "final" / "metrics.json").is_file()
    backbone = result.logs["backbone"]
    assert backbone["steps"] == total and len(backbone["losses"]) == total
    assert set(backbone["parts"]) == {"in", "phrase"} and len(backbone["parts"]["phrase"]) == total
    # The steps before the kill are the checkpoint's (restored, not re-run): same losses and
    # the killed run's 5-step val checks, then only the resumed run's end-of-stage check.
    assert backbone["losses"][:killed_step] == resumed.killed_at["log"]["losses"]
    assert [step for step, _ in backbone["evals"]] == list(range(5, killed_step + 1, 5)) + [total]
    for stage in ("teacher", "distill", "baseline"):
        assert result.logs[stage]["steps"] == SHORT_STAGES.get(stage, SHORT_STAGES["distill"])["steps"]
    assert ":trained:" in result.frame_encoder


def test_the_resumed_run_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, resumed, settings):
    """Training is a pure function of (config, data, seed): a fresh run of the same config
    in a new run directory, never killed and with other val checks, ends with exactly the
    killed-and-resumed run's weights. This is what lets the README's command reproduce
    the shipped model."""
    config = base_config(tmp_path / "run", Path(resumed.result.config.data.path), name="uninterrupted",
                         checkpoint_every=1000, eval_every=1000, stages=SHORT_STAGES)
    fresh = run_training(parse_run_config(config), settings, progress=False)
    ours = load_file(str(fresh.run_dir / "final" / "model.safetensors"))
    theirs = load_file(str(resumed.result.run_dir / "final" / "model.safetensors"))
    assert set(ours) == set(theirs)
    differ = [name for name in ours if not ours[name].equal(theirs[name])]
    assert not differ, f"{len(differ)} of {len(ours)} tensors differ, e.g. {differ[:3]}"
    assert fresh.metrics == resumed.result.metrics


# ---------------------------------------------------------------- two workers, against production
@dataclass
class SecondRun:
    code: int
    out: str
    err: str
    run_dir: Path
    versions_before: list[str]
    production_before: str


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory, published, resumed) -> SecondRun:
    """The resumed run's config on two Ray Train workers (the --workers flag), published
    against the main run's production version with a margin no model can reach."""
    assert published.code == 0
    root = tmp_path_factory.mktemp("trainer-two-workers")
    config = base_config(root / "run", Path(resumed.result.config.data.path), registry=published.registry.root,
                         name="two-workers", checkpoint_every=5, stages=SHORT_STAGES,
                         publish={"gate_min_delta": 1000})
    config_file = write_config(root / "run.yaml", config)
    versions = published.registry.list_versions(MODEL_NAME)
    production = published.registry.get_alias(MODEL_NAME, PRODUCTION_ALIAS)
    code, out, err = run_cli(["--log-level", "ERROR", "train", "--config", str(config_file), "--workers", "2"])
    return SecondRun(code, out, err, root / "run", versions, production)


def test_a_run_that_cannot_beat_production_exits_3_and_publishes_nothing(two_workers, published):
    assert two_workers.code == 3, two_workers.err[-3000:]
    lines = error_lines(two_workers.err)
    assert len(lines) == 1, two_workers.err[-3000:]
    assert "gate refused" in lines[0] and "points short" in lines[0] and two_workers.production_before in lines[0]
    assert "Traceback" not in two_workers.err
    registry = published.registry
    assert registry.list_versions(MODEL_NAME) == two_workers.versions_before
    assert registry.get_alias(MODEL_NAME, PRODUCTION_ALIAS) == two_workers.production_before
    # Refused after training and reporting: the run's own results are all there.
    assert (two_workers.run_dir / "report.md").is_file() and (two_workers.run_dir / "final" / "metrics.json").is_file()


def test_two_workers_train_the_same_stages_and_report_the_same_metrics(two_workers, resumed):
    """Same config on 1 worker (the resumed run) and 2 workers: same metrics, same stage logs."""
    one = resumed.result
    metrics = read_json(two_workers.run_dir / "final" / "metrics.json")  # what run_training returns
    logs = read_json(two_workers.run_dir / "final" / "logs.json")
    assert yaml.safe_load((two_workers.run_dir / "run.yaml").read_text())["scaling"]["num_workers"] == 2
    assert set(metrics["metrics"]) == set(one.metrics)
    assert list(logs) == list(one.logs)
    for stage, entry in one.logs.items():
        other = logs[stage]
        assert other["steps"] == entry["steps"] and len(other["losses"]) == len(entry["losses"])
        assert set(other["parts"]) == set(entry["parts"])
        assert all(len(v) == entry["steps"] for v in other["parts"].values())
    assert ":trained:" in metrics["frame_encoder"]
    assert (two_workers.run_dir / "final" / "model.safetensors").is_file()
