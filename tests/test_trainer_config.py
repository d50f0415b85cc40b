"""The run config (one-line errors naming the field, paths relative to the file, CLI
overrides), the publish gate on a real registry, and the batch plan."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.torch import save_file

from vidsearch.cli import main
from vidsearch.models import build_model, load_model_config
from vidsearch.models.persist import PRODUCTION_ALIAS, save_model_version
from vidsearch.registry import ModelRegistry
from vidsearch.services.trainer.batches import BatchPlan, merge_neighbours, twin_neighbours
from vidsearch.services.trainer.config import RunConfig, load_run_config, parse_run_config
from vidsearch.services.trainer.errors import TrainingError
from vidsearch.services.trainer.job import TrainResult
from vidsearch.services.trainer.publish import GateRefused, check_gate
from vidsearch.services.trainer.stages import _shard
from vidsearch.services.trainer.train_cli import _overrides, configure

from trainer_support import base_config, keep_logging, write_config  # noqa: F401 (keep_logging: autouse)

MODEL_NAME = "vidsearch"


@pytest.fixture()
def config_file(tmp_path) -> Path:
    return write_config(tmp_path / "configs" / "run.yaml", base_config(tmp_path / "run", tmp_path / "synth"))


def bad(tmp_path: Path, config: dict, *fragments: str) -> str:
    path = write_config(tmp_path / "bad.yaml", config)
    with pytest.raises(TrainingError) as info:
        load_run_config(path)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


# ---------------------------------------------------------------- loading
def test_a_valid_config_loads_with_its_values_and_defaults(config_file):
    cfg = load_run_config(config_file)
    assert isinstance(cfg, RunConfig)
    assert cfg.model.preset == "tiny-afa" and cfg.data.kind == "synth"
    assert cfg.stages.backbone.steps == 12 and cfg.stages.teacher.batch_size == 8
    assert cfg.stages.distill.alpha == 1.0 and cfg.stages.distill.baseline is True  # defaults filled in
    assert cfg.scaling.num_workers == 1 and cfg.publish.enabled is False
    # The validated config round-trips through its YAML (what run.yaml and the manifest hold).
    assert parse_run_config(yaml.safe_load(cfg.to_yaml())) == cfg


def test_relative_paths_resolve_against_the_config_file_not_the_cwd(tmp_path, monkeypatch):
    config = base_config(Path("out/run"), Path("../data/synth"))
    path = write_config(tmp_path / "configs" / "run.yaml", config)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_run_config(path)
    assert Path(cfg.data.path).resolve() == (tmp_path / "data" / "synth").resolve()
    assert Path(cfg.run_dir).resolve() == (tmp_path / "configs" / "out" / "run").resolve()
    # Absolute paths and URLs are kept as they are.
    absolute = write_config(tmp_path / "abs.yaml", base_config(tmp_path / "run", tmp_path / "synth"))
    assert load_run_config(absolute).data.path == str(tmp_path / "synth")
    url = base_config(tmp_path / "run", tmp_path / "synth", data={"kind": "jsonl", "path": "s3://bucket/m.jsonl"})
    assert load_run_config(write_config(tmp_path / "url.yaml", url)).data.path == "s3://bucket/m.jsonl"


@pytest.mark.parametrize("change, fragments", [
    ({"stages": {"backbone": {"stepz": 3}}}, ["stages.backbone.stepz", "Extra inputs"]),
    ({"colour": "red"}, ["colour", "Extra inputs"]),
    ({"stages": {"backbone": {"steps": -5}}}, ["stages.backbone.steps", "greater than or equal to 1"]),
    # Each stage re-declares some StageBase fields; the constraints must survive that.
    ({"stages": {"teacher": {"batch_size": 1}}}, ["stages.teacher.batch_size"]),
    ({"stages": {"backbone": {"lr": 0}}}, ["stages.backbone.lr", "greater than 0"]),
    ({"stages": {"teacher": {"lr": -1e-3}}}, ["stages.teacher.lr"]),
    ({"stages": {"distill": {"lr": -1e-3}}}, ["stages.distill.lr"]),
    ({"stages": {"distill": {"steps": 0}}}, ["stages.distill.steps"]),
    ({"data": {"kind": "mp4"}}, ["data.kind", "synth"]),
    ({"augment": {"crop_scale": [0.5, 1.2]}}, ["augment.crop_scale"]),
    ({"augment": {"crop_scale": [0.9, 0.5]}}, ["augment.crop_scale"]),
    ({"augment": {"crop_scale": [0.0, 1.0]}}, ["augment.crop_scale"]),
    ({"stages": {"backbone": {"enabled": False}, "teacher": {"enabled": False}, "distill": {"enabled": False}}},
     ["stages", "at least one stage"]),
    ({"publish": {"reindex": "sometimes"}}, ["publish.reindex"]),
    # The gate reads only val: test.* stays held out.
    ({"publish": {"gate_metric": "test.student.R@1"}}, ["publish.gate_metric", "'test.student.R@1' is not a val metric"]),
    ({"publish": {"gate_rerank_metric": "test.rerank@20.R@1"}}, ["publish.gate_rerank_metric", "not a val metric"]),
    ({"publish": {"gate_metric": "val.student.MdR"}}, ["publish.gate_metric", "lower is better"]),
    ({"publish": {"gate_se_k": -1}}, ["publish.gate_se_k"]),
    ({"evaluate": {"rerank_k": [10, 0]}}, ["evaluate.rerank_k"]),
    ({"scaling": {"num_workers": 0}}, ["scaling.num_workers"]),
    ({"data": {"val_frac": 1.0}}, ["data.val_frac"]),
    ({"data": {"frames": "cache"}}, ["data.frames"]),
    ({"data": {"frames": "index"}}, ["data.frames", "stages.backbone.enabled: false"]),
])
def test_each_bad_field_is_one_line_naming_it(tmp_path, change, fragments):
    message = bad(tmp_path, base_config(tmp_path / "run", tmp_path / "synth", **change), *fragments)
    assert message.startswith("run config")


def test_a_missing_data_section_is_named(tmp_path):
    config = base_config(tmp_path / "run", tmp_path / "synth")
    del config["data"]
    bad(tmp_path, config, "data", "Field required")


def test_several_errors_are_still_one_line_and_counted(tmp_path):
    config = base_config(tmp_path / "run", tmp_path / "synth",
                         stages={"backbone": {"steps": 0}, "teacher": {"steps": 0}})
    bad(tmp_path, config, "stages.backbone.steps", "(and 1 more)")


def test_bad_yaml_is_one_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: x\nstages: {backbone: [unclosed\n")
    with pytest.raises(TrainingError) as info:
        load_run_config(path)
    assert "not valid YAML" in str(info.value) and "\n" not in str(info.value)


def test_a_yaml_that_is_not_a_mapping_is_one_line(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(TrainingError, match="must be a mapping"):
        load_run_config(path)


def test_a_missing_file_is_one_line_naming_it(tmp_path):
    with pytest.raises(TrainingError) as info:
        load_run_config(tmp_path / "nope.yaml")
    assert "nope.yaml" in str(info.value) and "\n" not in str(info.value)


def test_overrides_apply_over_the_file(config_file):
    cfg = load_run_config(config_file, {"stages.backbone.steps": 7, "scaling.num_workers": 2,
                                        "publish.enabled": False, "seed": None})
    assert cfg.stages.backbone.steps == 7 and cfg.scaling.num_workers == 2
    assert cfg.seed == 0  # None means "not given"
    with pytest.raises(TrainingError, match="stages.distill.steps"):
        load_run_config(config_file, {"stages.distill.steps": 0})
    with pytest.raises(TrainingError, match="override name.x: name is not a section"):
        load_run_config(config_file, {"name.x": 1})


# ---------------------------------------------------------------- the CLI
def test_cli_flags_map_onto_the_run_config(config_file, tmp_path):
    parser = argparse.ArgumentParser()
    configure(parser)
    args = parser.parse_args(["--config", str(config_file), "--backbone-steps", "3", "--teacher-steps", "4",
                              "--distill-steps", "5", "--workers", "2", "--cpus-per-worker", "3", "--seed", "7",
                              "--preset", "tiny", "--max-videos", "9", "--gate-metric", "val.teacher.R@1",
                              "--registry", str(tmp_path / "reg"), "--reindex", "never", "--run-dir", "elsewhere",
                              "--no-teacher", "--gpu"])
    cfg = load_run_config(args.run_config, _overrides(args))
    assert (cfg.stages.backbone.steps, cfg.stages.teacher.steps, cfg.stages.distill.steps) == (3, 4, 5)
    assert cfg.scaling.num_workers == 2 and cfg.scaling.cpus_per_worker == 3 and cfg.scaling.use_gpu is True
    assert cfg.seed == 7 and cfg.model.preset == "tiny" and cfg.data.max_videos == 9
    assert cfg.publish.gate_metric == "val.teacher.R@1" and cfg.publish.registry == str(tmp_path / "reg")
    assert cfg.publish.reindex == "never" and cfg.run_dir == "elsewhere"
    assert cfg.stages.teacher.enabled is False and cfg.stages.backbone.enabled is True
    # Flags not given leave the file's values alone.
    plain = load_run_config(config_file, _overrides(parser.parse_args(["--config", str(config_file), "--no-publish"])))
    assert plain.stages.backbone.steps == 12 and plain.scaling.num_workers == 1 and plain.publish.enabled is False


def test_cli_non_numeric_steps_is_a_usage_error(config_file, capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--config", str(config_file), "--backbone-steps", "x"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--backbone-steps" in err and "invalid int value" in err


def test_cli_out_of_range_override_exits_2_with_one_line(config_file, capsys):
    code = main(["train", "--config", str(config_file), "--backbone-steps", "0"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith("vidsearch train: run config: stages.backbone.steps")


def test_cli_bad_config_file_exits_2_with_one_line(tmp_path, capsys):
    path = write_config(tmp_path / "bad.yaml", base_config(tmp_path / "run", tmp_path / "synth",
                                                          augment={"crop_scale": [0.5, 2.0]}))
    code = main(["train", "--config", str(path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "augment.crop_scale" in err
    code = main(["train", "--config", str(tmp_path / "missing.yaml")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "missing.yaml" in err


def test_cli_test_split_gate_metric_exits_2_with_one_line(config_file, capsys):
    code = main(["train", "--config", str(config_file), "--gate-metric", "test.student.R@1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err == ("vidsearch train: run config: publish.gate_metric: Value error, 'test.student.R@1' is not a val "
                   "metric; the gate reads only val.* (test.* stays held out)")


def test_cli_flags_disable_stages_into_a_bad_config(config_file, capsys):
    code = main(["train", "--config", str(config_file), "--no-backbone", "--no-teacher", "--no-distill"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "at least one stage" in err


# ---------------------------------------------------------------- the gate
@pytest.fixture(scope="module")
def tiny_model():
    return build_model(load_model_config("tiny"), device="cpu", seed=0)


# The val data hash both sides record here: the gate compares stored numbers (these tests
# cover the arithmetic; tests/test_trainer_gate.py covers other val data, on real runs).
VAL_HASH = "a" * 64


@pytest.fixture()
def registry(tmp_path, tiny_model) -> ModelRegistry:
    """A real registry whose production version scored val.student.R@1 = 50."""
    reg = ModelRegistry(str(tmp_path / "registry"))
    version = save_model_version(reg, MODEL_NAME, tiny_model, metrics={"val.student.R@1": 50.0, "val.teacher.R@1": 55.0},
                                 training={"val_data_hash": VAL_HASH})
    reg.set_alias(MODEL_NAME, PRODUCTION_ALIAS, version)
    return reg


def result_with(tmp_path: Path, model, registry_root: str, value: float | None, **publish) -> TrainResult:
    """A TrainResult as run_training returns it, with the gate metric set to ``value``."""
    run_dir = tmp_path / "run"
    (run_dir / "final").mkdir(parents=True, exist_ok=True)
    weights = run_dir / "final" / "model.safetensors"
    save_file({k: v.contiguous().clone() for k, v in model.state_dict().items()}, str(weights))
    cfg = parse_run_config(base_config(run_dir, tmp_path / "synth", publish={
        "enabled": True, "registry": registry_root,
        "model_name": MODEL_NAME, "reindex": "never", **publish}))
    metrics = {"val.teacher.R@1": 70.0, "val.student.R@5": 90.0}
    if value is not None:
        metrics["val.student.R@1"] = value
    return TrainResult(run_dir=run_dir, config=cfg, model_config=model.config.to_dict(), weights=weights,
                       frame_encoder=model.frame_encoder_id, metrics=metrics,
                       logs={"backbone": {"steps": 12, "samples_per_s": 1.0, "seconds": 1.0}},
                       data_hash="0" * 64, parent_frame_encoder=model.frame_encoder_id, data_info={"kind": "synth"},
                       val_data_hash=VAL_HASH)


def test_gate_refuses_a_model_10_points_worse(tmp_path, tiny_model, registry):
    production = registry.get_alias(MODEL_NAME, PRODUCTION_ALIAS)
    with pytest.raises(GateRefused) as info:
        check_gate(result_with(tmp_path, tiny_model, registry.root, 40.0), registry, MODEL_NAME)
    message = str(info.value)
    assert "10.00 points short" in message and production in message and "\n" not in message
    assert message.startswith("gate refused: val.student.R@1 = 40.00")


def test_gate_passes_a_better_model(tmp_path, tiny_model, registry):
    gate = check_gate(result_with(tmp_path, tiny_model, registry.root, 60.0), registry, MODEL_NAME)
    assert gate["new"] == 60.0 and gate["production_value"] == 50.0
    assert gate["production"] == registry.get_alias(MODEL_NAME, PRODUCTION_ALIAS)


def test_gate_refuses_a_tie(tmp_path, tiny_model, registry):
    with pytest.raises(GateRefused, match="0.00 points short"):
        check_gate(result_with(tmp_path, tiny_model, registry.root, 50.0), registry, MODEL_NAME)


def test_gate_min_delta_is_a_margin(tmp_path, tiny_model, registry):
    with pytest.raises(GateRefused, match=r"1.00 points short.*\(50.00 \+ margin 5.00 = max\(min_delta 5, "):
        check_gate(result_with(tmp_path, tiny_model, registry.root, 54.0, gate_min_delta=5.0), registry, MODEL_NAME)
    # Beating production by exactly the margin is still a tie with it.
    with pytest.raises(GateRefused, match="0.00 points short"):
        check_gate(result_with(tmp_path, tiny_model, registry.root, 55.0, gate_min_delta=5.0), registry, MODEL_NAME)
    gate = check_gate(result_with(tmp_path, tiny_model, registry.root, 55.5, gate_min_delta=5.0), registry, MODEL_NAME)
    assert gate["min_delta"] == 5.0 and gate["margin"] == 5.0 and gate["path"] == "stored"


def test_gate_on_another_metric(tmp_path, tiny_model, registry):
    result = result_with(tmp_path, tiny_model, registry.root, 40.0, gate_metric="val.teacher.R@1")
    assert check_gate(result, registry, MODEL_NAME)["production_value"] == 55.0


def test_gate_without_production_passes(tmp_path, tiny_model):
    empty = ModelRegistry(str(tmp_path / "empty"))
    gate = check_gate(result_with(tmp_path, tiny_model, str(tmp_path / 'empty'), 1.0), empty, MODEL_NAME)
    assert gate["production"] is None and gate["production_value"] is None


def test_gate_metric_that_was_not_computed_is_one_line(tmp_path, tiny_model, registry):
    with pytest.raises(TrainingError) as info:
        check_gate(result_with(tmp_path, tiny_model, registry.root, None), registry, MODEL_NAME)
    assert not isinstance(info.value, GateRefused)
    assert "val.student.R@1" in str(info.value) and "val.teacher.R@1" in str(info.value)


# ---------------------------------------------------------------- the batch plan
N = 40


def pair_twins(n: int = N) -> list[list[int]]:
    """Video 2k and 2k+1 are each other's twin."""
    return [[i ^ 1] for i in range(n)]


def test_batches_hold_distinct_indices_of_the_right_size():
    plan = BatchPlan(N, 8, 1, pair_twins(), seed=0, stage=1)
    for step in range(3 * plan.per_epoch + 2):
        index = plan.indices(step)
        assert len(index) == 8 and len(set(index.tolist())) == 8
        assert index.min() >= 0 and index.max() < N


def test_every_video_appears_in_every_epoch_with_its_twin():
    plan = BatchPlan(N, 8, 1, pair_twins(), seed=0, stage=1)
    for epoch in range(2):
        seen: set[int] = set()
        with_twin: set[int] = set()
        for step in range(epoch * plan.per_epoch, (epoch + 1) * plan.per_epoch):
            batch = set(plan.indices(step).tolist())
            seen |= batch
            with_twin |= {v for v in batch if v ^ 1 in batch}
        assert seen == set(range(N))
        # Every video is an anchor once per epoch, and an anchor brings its twin.
        assert with_twin == set(range(N))


def test_anchors_bring_their_twins_into_the_batch():
    with_twins = BatchPlan(N, 8, 1, pair_twins(), seed=0, stage=1)
    without = BatchPlan(N, 8, 0, pair_twins(), seed=0, stage=1)
    random_pairs, twin_pairs = 0, 0
    for step in range(20):
        batch = set(with_twins.indices(step).tolist())
        paired = {v for v in batch if v ^ 1 in batch}
        assert len(paired) >= with_twins.anchors  # each anchor and its twin, at least
        twin_pairs += len(paired)
        plain = set(without.indices(step).tolist())
        random_pairs += len({v for v in plain if v ^ 1 in plain})
    assert twin_pairs > 2 * random_pairs


def test_mined_neighbours_follow_the_twins():
    ids = [f"v{i}" for i in range(6)]
    negatives = [[{"video_id": "v1", "relation": "reversed"}], [{"video_id": "v0", "relation": "reversed"}],
                 [{"video_id": "other-split", "relation": "swap:colour"}], [], [], []]
    twins = twin_neighbours(ids, negatives)
    assert twins == [[1], [0], [], [], [], []]
    assert merge_neighbours(twins, [[1, 2], [3], [4], [5], [0], [1]]) == [[1, 2], [0, 3], [4], [5], [0], [1]]


def test_the_same_step_gives_the_same_batch_in_a_new_plan():
    """Resume-exactness: a restarted run computes step k's batch without replaying 0..k-1."""
    counts = [1 + i % 4 for i in range(N)]
    first = BatchPlan(N, 8, 1, pair_twins(), seed=3, stage=2)
    expected = {step: (first.indices(step), first.captions(step, first.indices(step), counts))
                for step in range(12)}
    again = BatchPlan(N, 8, 1, pair_twins(), seed=3, stage=2)
    for step in (11, 4, 0, 7):  # any order
        index, captions = expected[step]
        assert np.array_equal(again.indices(step), index)
        assert np.array_equal(again.captions(step, index, counts), captions)
        assert all(0 <= c < counts[i] for i, c in zip(index, captions))
    other_seed = BatchPlan(N, 8, 1, pair_twins(), seed=4, stage=2)
    other_stage = BatchPlan(N, 8, 1, pair_twins(), seed=3, stage=3)
    assert any(not np.array_equal(other_seed.indices(s), expected[s][0]) for s in range(12))
    assert any(not np.array_equal(other_stage.indices(s), expected[s][0]) for s in range(12))


def test_batch_size_is_capped_by_the_dataset_and_needs_two_videos():
    plan = BatchPlan(5, 64, 2, None, seed=0, stage=1)
    assert sorted(plan.indices(0).tolist()) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="at least 2 videos"):
        BatchPlan(1, 8, 0, None, seed=0, stage=1)


def test_worker_shards_split_the_global_batch():
    plan = BatchPlan(N, 16, 1, pair_twins(), seed=0, stage=1)
    for step in range(5):
        full = plan.indices(step)
        shards = [_shard(full, rank, 2) for rank in range(2)]
        assert sorted(np.concatenate(shards).tolist()) == sorted(full.tolist())
        assert abs(len(shards[0]) - len(shards[1])) <= 1


def test_worker_shards_keep_anchors_with_their_hard_negatives():
    plan = BatchPlan(N, 16, 1, pair_twins(), seed=0, stage=1)
    full = plan.indices(0)
    in_batch = sum(1 for v in full.tolist() if v ^ 1 in set(full.tolist()))
    kept = 0
    for rank in range(2):
        shard = set(_shard(full, rank, 2).tolist())
        kept += sum(1 for v in shard if v ^ 1 in shard)
    assert kept >= in_batch // 2, (kept, in_batch)
