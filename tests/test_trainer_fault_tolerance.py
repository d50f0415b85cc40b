"""Training that survives its workers: real Ray Train (two CPU workers on the session's
local Ray) with a worker that SIGKILLs itself mid-stage (``scaling.fault_injection``).

The run restarts by itself from its last Ray Train checkpoint and ends with exactly the
weights of an uninterrupted run of the same config; with ``max_failures: 0`` the same kill
ends the run with one line. Also: the restore picks the further-along of Ray Train's
checkpoint and the run directory's own, and bad fault-tolerance settings are one line.
"""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from vidsearch.cli import main
from vidsearch.config import load_settings
from vidsearch.services.trainer.config import load_run_config, parse_run_config
from vidsearch.services.trainer.errors import TrainingError
from vidsearch.services.trainer.job import run_training
from vidsearch.services.trainer import recovery

from trainer_support import base_config, keep_logging, merge, write_config, write_synth  # noqa: F401

# Short stages, checkpointing every 2 steps; caption negatives and event phrases on, so the
# gathered negatives and the per-worker phrase loss are replayed after the restart too.
STAGES = {"backbone": {"steps": 6, "batch_size": 8, "phrase_weight": 1.0, "caption_negatives": 1},
          "teacher": {"steps": 6, "batch_size": 8, "caption_negatives": 1},
          "distill": {"steps": 4, "batch_size": 7, "baseline": False}}
SCALING = {"num_workers": 2, "cpus_per_worker": 1}
# Rank 1 dies before the teacher's 4th step: the backbone is done and the teacher's last
# checkpoint is at step 2, so the restart restores both and replays step 3.
KILL = {"stage": "teacher", "after_steps": 3, "rank": 1}
# Rank 0 dies in distillation and the run directory's checkpoints go with it (as when the
# restarted rank 0 runs on a node that cannot see them): only Ray Train's storage has them.
KILL_AND_LOSE = {"stage": "distill", "after_steps": 3, "rank": 0, "lose_checkpoints": True}


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return write_synth(tmp_path_factory.mktemp("fault-data") / "synth", n=24, seed=3)


@pytest.fixture(scope="module")
def settings():
    return load_settings(None)


def _config(run_dir: Path, data: Path, **scaling) -> dict:
    return base_config(run_dir, data, name="faults", checkpoint_every=2, eval_every=1000, stages=STAGES,
                       scaling={**SCALING, **scaling}, evaluate={"splits": []})


@pytest.fixture(scope="module")
def killed(ray_local, tmp_path_factory, synth, settings):
    run_dir = tmp_path_factory.mktemp("fault-killed") / "run"
    result = run_training(parse_run_config(_config(run_dir, synth, max_failures=1, fault_injection=KILL)),
                          settings, progress=False)
    return result


@pytest.fixture(scope="module")
def lost(ray_local, tmp_path_factory, synth, settings):
    run_dir = tmp_path_factory.mktemp("fault-lost") / "run"
    return run_training(parse_run_config(_config(run_dir, synth, max_failures=1, fault_injection=KILL_AND_LOSE)),
                        settings, progress=False)


@pytest.fixture(scope="module")
def uninterrupted(ray_local, tmp_path_factory, synth, settings):
    run_dir = tmp_path_factory.mktemp("fault-clean") / "run"
    return run_training(parse_run_config(_config(run_dir, synth)), settings, progress=False)


def test_the_killed_worker_really_died_and_the_run_finished(killed):
    marker = killed.run_dir / "fault-injected-teacher-3-rank1"
    assert marker.is_file(), sorted(p.name for p in killed.run_dir.iterdir())
    assert json.loads(marker.read_text())["step"] == 3
    assert len(_restores(killed.run_dir)) == 1  # one restart, which found a Ray Train checkpoint
    assert (killed.run_dir / "final" / "model.safetensors").is_file()
    for stage, steps in (("backbone", 6), ("teacher", 6), ("distill", 4)):
        assert killed.logs[stage]["steps"] == steps and len(killed.logs[stage]["losses"]) == steps
    # Ray Train keeps the run's checkpoints in its storage (default <run_dir>/ray), keep_checkpoints of
    # them registered; the latest holds every stage's state.
    storage = killed.run_dir / "ray" / recovery.RAY_RUN_NAME
    snapshot = json.loads((storage / "checkpoint_manager_snapshot.json").read_text())
    assert 1 <= len(snapshot["checkpoint_results"]) <= 2
    latest = storage / snapshot["latest_checkpoint_result"]["checkpoint_dir_name"]
    assert {p.name for p in latest.iterdir()} == {"backbone", "teacher", "distill"}
    assert snapshot["latest_checkpoint_result"]["metrics"] == {"stage": "distill", "step": 4,
                                                               "loss": killed.logs["distill"]["losses"][-1]}


def test_the_restarted_run_ends_with_the_weights_of_an_uninterrupted_run(killed, uninterrupted):
    ours = load_file(str(killed.run_dir / "final" / "model.safetensors"))
    theirs = load_file(str(uninterrupted.run_dir / "final" / "model.safetensors"))
    assert set(ours) == set(theirs)
    differ = [name for name in ours if not ours[name].equal(theirs[name])]
    assert not differ, f"{len(differ)} of {len(ours)} tensors differ, e.g. {differ[:3]}"
    for stage in ("backbone", "teacher", "distill"):
        assert killed.logs[stage]["losses"] == uninterrupted.logs[stage]["losses"], stage
        assert killed.logs[stage]["parts"] == uninterrupted.logs[stage]["parts"], stage
    assert killed.frame_encoder == uninterrupted.frame_encoder


def _restores(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / recovery.RESTORES_FILE).read_text().splitlines()]


def test_a_restart_that_lost_the_run_directory_checkpoints_resumes_from_ray_train_storage(lost, uninterrupted):
    assert (lost.run_dir / "fault-injected-distill-3-rank0").is_file()
    restores = _restores(lost.run_dir)
    assert len(restores) == 1 and restores[0]["source"] == "ray" and restores[0]["run_dir_steps"] == 0, restores
    assert restores[0]["ray_steps"] >= 6  # at least the backbone's, whichever report Ray Train had registered
    ours = load_file(str(lost.run_dir / "final" / "model.safetensors"))
    theirs = load_file(str(uninterrupted.run_dir / "final" / "model.safetensors"))
    assert set(ours) == set(theirs) and all(ours[name].equal(theirs[name]) for name in ours)
    for stage in ("backbone", "teacher", "distill"):
        assert lost.logs[stage]["losses"] == uninterrupted.logs[stage]["losses"], stage


def test_without_retries_the_same_kill_ends_the_run_with_one_line(ray_local, tmp_path, synth, settings):
    config = _config(tmp_path / "run", synth, max_failures=0,
                     fault_injection={"stage": "backbone", "after_steps": 1, "rank": 1})
    with pytest.raises(TrainingError) as info:
        run_training(parse_run_config(config), settings, progress=False)
    message = str(info.value)
    assert message.startswith("training failed:") and "\n" not in message
    assert not (tmp_path / "run" / "final" / "metrics.json").exists()


# ---------------------------------------------------------------- restore source
def _stage_state(root: Path, stage: str, step: int) -> None:
    where = root / stage
    where.mkdir(parents=True, exist_ok=True)
    (where / f"state-{step}.safetensors").write_text("weights")
    (where / "state.json").write_text(json.dumps({"step": step, "done": False, "weights": f"state-{step}.safetensors"}))


def _ray_train_run(storage: Path, name: str, run_dir: Path, ranks: tuple[int, ...],
                   report: Path | None = None) -> list[int]:
    """One real Ray Train run (one CPU worker) named ``name`` in ``storage``: its worker calls
    recovery.restore_ray_checkpoint(run_dir, rank) for each of ``ranks`` with whatever
    ray.train.get_checkpoint() gives it (the latest checkpoint an earlier run of the same name
    reported, or None), then reports ``report`` as this run's checkpoint. The restore code runs
    where it runs in training: inside a Ray Train worker. Returns the run directory's progress
    after each rank's restore."""
    import ray.train
    from ray.train import RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trace = storage / f"{name}-progress.json"

    def loop() -> None:
        seen = []
        for rank in ranks:
            recovery.restore_ray_checkpoint(run_dir, rank=rank)
            seen.append(recovery.progress(run_dir / recovery.CHECKPOINTS))
        trace.write_text(json.dumps(seen))
        checkpoint = None if report is None else ray.train.Checkpoint.from_directory(str(report))
        ray.train.report({"step": 1}, checkpoint=checkpoint)

    TorchTrainer(loop, scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                 run_config=RayRunConfig(name=name, storage_path=str(storage))).fit()
    return json.loads(trace.read_text())


def test_a_further_along_ray_checkpoint_replaces_the_run_directory_checkpoints(ray_local, tmp_path):
    ray_side, run_dir, storage = tmp_path / "ray-ckpt", tmp_path / "run", tmp_path / "storage"
    _stage_state(ray_side, "backbone", 6)
    _stage_state(ray_side, "teacher", 4)
    _ray_train_run(storage, "further", tmp_path / "unused", (), report=ray_side)  # a first run reports it
    _stage_state(run_dir / "checkpoints", "backbone", 4)  # e.g. a rank 0 that lost its disk and started over
    (run_dir / "checkpoints.restoring").mkdir()  # left by a start that died while restoring
    # The run again (same name and storage): Ray Train hands its worker the reported checkpoint.
    # Rank 1 first (it only reads through rank 0: nothing may change), then rank 0.
    assert _ray_train_run(storage, "further", run_dir, (1, 0)) == [4, 10]
    assert recovery.progress(run_dir / "checkpoints") == 10
    assert json.loads((run_dir / "checkpoints" / "teacher" / "state.json").read_text())["step"] == 4
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints", recovery.RESTORES_FILE]
    assert recovery.progress(ray_side) == 10  # copied, not moved
    restores = _restores(run_dir)
    assert [r["source"] for r in restores] == ["ray"]  # rank 1 recorded nothing
    assert (restores[0]["ray_steps"], restores[0]["run_dir_steps"]) == (10, 4)
    assert Path(restores[0]["checkpoint"]).is_relative_to(storage / "further")  # Ray Train's persisted copy


def test_a_run_directory_checkpoint_newer_than_ray_train_s_is_kept(ray_local, tmp_path):
    ray_side, run_dir, storage = tmp_path / "ray-ckpt", tmp_path / "run", tmp_path / "storage"
    _stage_state(ray_side, "backbone", 4)
    _stage_state(run_dir / "checkpoints", "backbone", 6)  # written, then rank 0 died before reporting it
    # A first run finds no Ray Train checkpoint: the run directory's stays untouched.
    _ray_train_run(storage, "newer", run_dir, (0,), report=ray_side)
    assert recovery.progress(run_dir / "checkpoints") == 6
    assert not (run_dir / recovery.RESTORES_FILE).exists()
    _ray_train_run(storage, "newer", run_dir, (0,))  # now Ray Train has one, 4 steps in: behind ours
    assert recovery.progress(run_dir / "checkpoints") == 6
    restores = _restores(run_dir)
    assert [(r["source"], r["ray_steps"], r["run_dir_steps"]) for r in restores] == [("run_dir", 4, 6)]
    assert Path(restores[0]["checkpoint"]).is_relative_to(storage / "newer")


def test_a_recorded_training_error_fails_the_next_attempt_at_once(tmp_path):
    recovery.raise_recorded_abort(tmp_path)  # nothing recorded: nothing raised
    recovery.record_abort(tmp_path, TrainingError("stage teacher: loss became nan at step 3; lower stages.teacher.lr"))
    with pytest.raises(TrainingError, match="loss became nan at step 3"):
        recovery.raise_recorded_abort(tmp_path)
    recovery.clear_abort(tmp_path)
    recovery.raise_recorded_abort(tmp_path)


# ---------------------------------------------------------------- config
def _bad(tmp_path: Path, change: dict, *fragments: str) -> str:
    path = write_config(tmp_path / "bad.yaml", merge(base_config(tmp_path / "run", tmp_path / "synth"), change))
    with pytest.raises(TrainingError) as info:
        load_run_config(path)
    message = str(info.value)
    assert message.startswith("run config") and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


@pytest.mark.parametrize("change, fragments", [
    ({"scaling": {"max_failures": -1}}, ["scaling.max_failures", "greater than or equal to 0"]),
    ({"scaling": {"max_failures": "often"}}, ["scaling.max_failures"]),
    ({"scaling": {"keep_checkpoints": 0}}, ["scaling.keep_checkpoints"]),
    ({"scaling": {"storage_path": ""}}, ["scaling.storage_path"]),
    ({"scaling": {"fault_injection": {"stage": "warmup", "after_steps": 1}}}, ["scaling.fault_injection.stage"]),
    ({"scaling": {"fault_injection": {"stage": "teacher", "after_steps": -2}}},
     ["scaling.fault_injection.after_steps"]),
    ({"scaling": {"fault_injection": {"stage": "teacher", "after_steps": 8}}},
     ["scaling.fault_injection.after_steps", "not below the stage's 8 steps"]),
    ({"scaling": {"fault_injection": {"stage": "teacher", "after_steps": 1, "rank": 1}}},
     ["scaling.fault_injection.rank", "scaling.num_workers (1)"]),
    ({"scaling": {"fault_injection": {"stage": "teacher", "after_steps": 1}}, "stages": {"teacher": {"enabled": False}}},
     ["scaling.fault_injection.stage", "does not run"]),
    ({"scaling": {"fault_injection": {"stage": "teacher", "after_steps": 1, "when": "now"}}},
     ["scaling.fault_injection.when"]),
    ({"scaling": {"num_workers": 12}}, ["stages.teacher.batch_size: 8 is fewer than scaling.num_workers (12)"]),
])
def test_bad_fault_tolerance_settings_are_one_line_naming_the_field(tmp_path, change, fragments):
    _bad(tmp_path, change, *fragments)


def test_the_cli_refuses_a_negative_max_failures_with_one_line(tmp_path):
    path = write_config(tmp_path / "bad.yaml", merge(base_config(tmp_path / "run", tmp_path / "synth"),
                                                     {"scaling": {"max_failures": -3}}))
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["train", "--config", str(path)])
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err.getvalue()
    assert lines[0].startswith("vidsearch train: run config: scaling.max_failures"), lines[0]


def test_storage_path_defaults_under_the_run_dir_and_is_relative_to_the_config_file(tmp_path):
    plain = load_run_config(write_config(tmp_path / "a" / "run.yaml", base_config(tmp_path / "run", tmp_path / "synth")))
    assert plain.scaling.storage_path is None and plain.scaling.max_failures == 3
    assert recovery.storage_path(plain) == str((tmp_path / "run").resolve() / "ray")
    config = merge(base_config(tmp_path / "run", tmp_path / "synth"), {"scaling": {"storage_path": "shared/ckpt"}})
    placed = load_run_config(write_config(tmp_path / "b" / "run.yaml", config))
    assert placed.scaling.storage_path == str(tmp_path / "b" / "shared" / "ckpt")
    remote = parse_run_config(merge(base_config(tmp_path / "run", tmp_path / "synth"),
                                    {"scaling": {"storage_path": "s3://bucket/runs/x"}}))
    assert recovery.storage_path(remote) == "s3://bucket/runs/x"
