"""The publish gate against real models: one real training run (tiny model, real Ray Train,
a real synthetic dataset), production versions in a real registry, and every way the gate
refuses: other val data it cannot re-evaluate on, a win inside the bootstrap margin, a drop
of the re-ranked metric. Also which student is published, and what the manifest says."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vidsearch.config import load_settings
from vidsearch.models import ModelConfig, build_model, load_model_config
from vidsearch.models.persist import PRODUCTION_ALIAS, save_model_version
from vidsearch.registry import ModelRegistry
from vidsearch.services.trainer.config import parse_run_config
from vidsearch.services.trainer.evaluate import evaluate_model, flatten_metrics
from vidsearch.services.trainer.gate import (BASELINE_MODEL_FILE, bootstrap_se, published_metrics, query_ranks,
                                             val_data_hash)
from vidsearch.services.trainer.job import TrainResult, run_training
from vidsearch.services.trainer.publish import GateRefused, candidate_weights, check_gate, publish_run, select_student
from vidsearch.services.trainer.worker import BASELINE_HEAD_FILE, _eval_set, _evaluate, _write_final

from trainer_support import PRESET, base_config, keep_logging, merge, read_json, write_synth  # noqa: F401

pytestmark = pytest.mark.usefixtures("ray_local")

NAME = "vidsearch"
REPO = Path(__file__).resolve().parents[1]
# Enough backbone steps for a student clearly above the untrained one (see test_trainer_run).
# The gate is what is under test, not distillation: the student stage here trains the head
# alone on InfoNCE (a 10-step teacher has nothing to teach). The re-ranked gate's test builds
# its better-student / worse-re-ranker pair by construction, not from how well these steps went.
STAGES = {"backbone": {"steps": 150, "batch_size": 16}, "teacher": {"steps": 10, "batch_size": 16},
          "distill": {"steps": 10, "batch_size": 8, "train_text": False, "in_weight": 1.0, "alpha": 0.0,
                      "gamma": 0.0}}
RERANK = "val.rerank@10.R@1"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> TrainResult:
    root = tmp_path_factory.mktemp("gate")
    synth = write_synth(root / "synth", n=60, seed=1)
    cfg = parse_run_config(base_config(root / "run", synth, registry=root / "unused", name="gate", stages=STAGES,
                                       publish={"gate_rerank_metric": RERANK}))
    return run_training(cfg, load_settings(None), progress=False)


def with_publish(result: TrainResult, registry: ModelRegistry, **publish) -> TrainResult:
    config = parse_run_config(merge(result.config.to_dict(), {"publish": {"registry": registry.root, **publish}}))
    return dataclasses.replace(result, config=config)


def untrained(model_config: dict | None = None):
    """The preset's untrained model, or one of a run's own config (``TrainResult.model_config``)."""
    config = load_model_config(PRESET) if model_config is None else ModelConfig.from_dict(model_config)
    return build_model(config, device="cpu", seed=0)


def measured(model, result: TrainResult, split: str) -> dict[str, float]:
    """The model's real metrics on one of the run's splits, named as if it were val."""
    data = read_json(result.run_dir / "data.json")[split]
    rows = evaluate_model(model, _eval_set(model, data, result.config.seed), rerank_k=[10], beta=result.beta)
    return flatten_metrics("val", rows)


def production(registry: ModelRegistry, model, metrics: dict[str, float], val_hash: str | None) -> str:
    version = save_model_version(registry, NAME, model, metrics=metrics,
                                 training={"val_data_hash": val_hash} if val_hash else {})
    registry.set_alias(NAME, PRODUCTION_ALIAS, version)
    return version


def one_line(info: pytest.ExceptionInfo) -> str:
    message = str(info.value)
    assert "\n" not in message and message.startswith("gate refused: ") and "nothing was published" in message
    return message


def test_the_run_records_its_val_hash_and_bootstrap_errors(run):
    data = read_json(run.run_dir / "data.json")
    assert run.val_data_hash == val_data_hash(data["val"]) != val_data_hash(data["test"])
    se = run.metrics["val.student.R@1.se"]
    assert 0 < se < 20 and "val.rerank@10.R@1.se" in run.metrics and "val.baseline_student.R@1.se" in run.metrics
    assert not any(k.startswith("test.") and k.endswith(".se") for k in run.metrics)
    # The recorded SE is the bootstrap of the final model's own per-query ranks.
    # The run's own model config: distillation trains the text tower, so its scorer has its own.
    model = build_model(ModelConfig.from_dict(run.model_config), device="cpu", seed=0, load_weights=False)
    model.load_state_dict(load_file(str(run.weights)))
    ranks = query_ranks(model, _eval_set(model, data["val"], run.config.seed), ["student"], run.beta)["student"]
    assert bootstrap_se(ranks, "R@1") == pytest.approx(se, abs=1e-6)
    assert 100.0 * (ranks <= 1).mean() == pytest.approx(run.metrics["val.student.R@1"])
    # The baseline's full model is saved beside its head.
    assert (run.weights.parent / BASELINE_MODEL_FILE).is_file() and (run.weights.parent / BASELINE_HEAD_FILE).is_file()


def test_production_measured_on_other_val_data_is_re_evaluated_on_this_one(run, tmp_path):
    registry = ModelRegistry(str(tmp_path / "registry"))
    data = read_json(run.run_dir / "data.json")
    old = untrained()
    # Its recorded numbers are real, but from other data (this run's test split).
    other = measured(old, run, "test")
    version = production(registry, old, other, val_data_hash(data["test"]))
    result = with_publish(run, registry)
    gate = check_gate(result, registry, NAME)
    truth = measured(old, run, "val")
    assert gate["path"] == "re-evaluated" and gate["production"] == version
    assert gate["production_value"] == pytest.approx(truth["val.student.R@1"])
    assert gate["production_val_data_hash"] == val_data_hash(data["test"]) and gate["val_data_hash"] == run.val_data_hash
    assert gate["rerank"]["production_value"] == pytest.approx(truth[RERANK])

    # The same production with this run's val hash: the stored numbers are used, and agree.
    registry2 = ModelRegistry(str(tmp_path / "registry2"))
    production(registry2, old, truth, run.val_data_hash)
    stored = check_gate(with_publish(run, registry2), registry2, NAME)
    assert stored["path"] == "stored" and stored["production_value"] == pytest.approx(gate["production_value"])


def test_a_production_that_cannot_be_re_evaluated_is_refused_naming_both_hashes(run, tmp_path):
    registry = ModelRegistry(str(tmp_path / "registry"))
    # The shipped model: a 64 px frame tower, no val hash recorded; this run's cache is 32 px.
    version = registry.import_version(ModelRegistry(str(REPO / "deploy" / "models")), NAME)
    registry.set_alias(NAME, PRODUCTION_ALIAS, version)
    with pytest.raises(GateRefused) as info:
        check_gate(with_publish(run, registry), registry, NAME)
    message = one_line(info)
    assert version in message and "none recorded" in message and run.val_data_hash[:12] in message
    assert "64 px" in message and "32 px" in message


def test_a_win_inside_the_bootstrap_margin_is_refused(run, tmp_path):
    registry = ModelRegistry(str(tmp_path / "registry"))
    truth = measured(untrained(), run, "val")
    production(registry, untrained(), truth, run.val_data_hash)
    new, old, se = run.metrics["val.student.R@1"], truth["val.student.R@1"], run.metrics["val.student.R@1.se"]
    gain = new - old
    assert gain > se, (new, old, se)  # the trained student beats the untrained one by more than 1 SE
    k = round(gain / se + 0.5, 2)
    with pytest.raises(GateRefused) as info:
        check_gate(with_publish(run, registry, gate_se_k=k), registry, NAME)
    message = one_line(info)
    assert f"{k * se - gain:.2f} points short" in message and f"{k:g} x SE {se:.2f}" in message
    assert f"margin {k * se:.2f}" in message and "same val data" in message
    # A min_delta above k x SE is the margin instead.
    with pytest.raises(GateRefused, match=rf"margin {gain + 1:.2f} = max\(min_delta {gain + 1:g}, "):
        check_gate(with_publish(run, registry, gate_se_k=0.0, gate_min_delta=round(gain + 1, 6)), registry, NAME)
    gate = check_gate(with_publish(run, registry, gate_se_k=1.0), registry, NAME)
    assert gate["se"] == se and gate["margin"] == pytest.approx(se) and gate["se_k"] == 1.0


def test_a_drop_of_the_re_ranked_metric_is_refused(run, tmp_path):
    """New: the run's student with a re-ranker that ranks backwards. Production: the run's own
    scorer over a head that maps every video to one embedding. The new student is better and its
    re-ranking worse, by construction rather than by how well a few training steps went:

    - production's student gives every video exactly the same score, so under the pessimistic tie
      rule every caption's video ranks last: its student R@1 is 0, below any student that learned
      anything (the run's beats the untrained one by more than its SE, see above);
    - its re-ranking is the scorer alone (min-max of equal recall scores is 1 for all candidates),
      so it has the run's scorer's R@1 on the 10 candidates it gets;
    - the new scorer reads its own copy of the run's text tower with the projection negated and no
      residual: its score is minus the CLIP similarity, so the fusion favours the candidates the
      text matches least, and its R@1 collapses far below the scorer's.
    """
    data = read_json(run.run_dir / "data.json")
    trained = load_file(str(run.weights))
    # New: scorer.own_text, its tower the run's text tower with text_projection negated (sentence and
    # token features negated, so cos(sentence, meanP video) is negated); the residual head zeroed.
    new_config = merge(run.model_config, {"scorer": {"own_text": True}})
    new_model = untrained(new_config)
    missing, unexpected = new_model.load_state_dict(trained, strict=False)
    assert not unexpected and missing and all(k.startswith("scorer_text.") for k in missing)
    new_model.scorer_text.copy_from(new_model.clip)
    with torch.no_grad():
        new_model.scorer_text.text_projection.neg_()
        new_model.scorer.score_head.weight.zero_()
        new_model.scorer.score_head.bias.zero_()
    # Production: the head's frame weights uniform and its temporal residual a constant 2^30 per
    # channel, which swallows the (unit-norm) frames exactly in fp32 (ulp 128): every video's
    # embedding is the same vector, bit for bit.
    old_state = dict(trained)
    for key in ("head.temporal.out.weight", "head.weight_mlp.2.weight", "head.weight_mlp.2.bias"):
        old_state[key] = torch.zeros_like(trained[key])
    old_state["head.temporal.out.bias"] = torch.full_like(trained["head.temporal.out.bias"], 2.0 ** 30)
    old_model = untrained(run.model_config)
    old_model.load_state_dict(old_state)
    old_model.frame_encoder_id = run.frame_encoder
    # The new "run": the same run directory's data, evaluated by the worker's own evaluation.
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "data.json").write_text(json.dumps(data))
    metrics = _evaluate(new_model, None, data, run.config, run.beta)
    _write_final(run_dir, new_model, run.frame_encoder, metrics, run.logs, None)
    result = dataclasses.replace(run, run_dir=run_dir, weights=run_dir / "final" / "model.safetensors", metrics=metrics,
                                 model_config=new_config)
    registry = ModelRegistry(str(tmp_path / "registry"))
    old = measured(old_model, run, "val")
    version = production(registry, old_model, old, run.val_data_hash)
    assert old["val.student.R@1"] == 0.0 < metrics["val.student.R@1"], (metrics["val.student.R@1"], old)
    assert metrics[RERANK] < old[RERANK], (metrics[RERANK], old[RERANK])
    strict = with_publish(result, registry, gate_se_k=0.0)
    with pytest.raises(GateRefused) as info:
        check_gate(strict, registry, NAME)
    message = one_line(info)
    assert message.startswith(f"gate refused: {RERANK} = {metrics[RERANK]:.2f}") and version in message
    assert f"{old[RERANK] - metrics[RERANK]:.2f} points below" in message
    # Off, the same run passes on the student alone.
    assert check_gate(with_publish(result, registry, gate_se_k=0.0, gate_rerank_metric=None), registry, NAME)["rerank"] is None


def test_the_better_student_on_val_is_published_and_the_manifest_says_which(run, tmp_path):
    registry = ModelRegistry(str(tmp_path / "registry"))
    result = with_publish(run, registry)
    choice = select_student(result)
    distilled, baseline = run.metrics["val.student.R@1"], run.metrics["val.baseline_student.R@1"]
    assert choice.which == ("baseline" if baseline > distilled else "distilled")
    outcome = publish_run(result, load_settings(None), progress=False)
    manifest = registry.get_manifest(NAME, outcome.version)
    training = manifest.training
    assert training["published_student"] == choice.which and training["val_data_hash"] == run.val_data_hash
    assert training["student_choice"] == {"metric": "val.student.R@1", "distilled": distilled, "baseline": baseline,
                                          "published": choice.which}
    assert training["gate"]["student"] == choice.which and training["gate"]["path"] == "no production"
    assert manifest.metrics["val.student.R@1"] == max(distilled, baseline)
    published = registry.load(NAME, outcome.version)[0]
    expected = candidate_weights(result, choice.which)
    assert set(published) == set(expected) and all(published[k].equal(expected[k]) for k in expected)


def test_the_baseline_is_its_full_model_or_the_final_weights_with_its_head(run, tmp_path):
    full = candidate_weights(run, "baseline")
    assert all(full[k].equal(v) for k, v in load_file(str(run.weights.parent / BASELINE_MODEL_FILE)).items())
    # An old run directory (no baseline_model.safetensors): the final weights with the baseline head.
    old = tmp_path / "final"
    old.mkdir()
    for name in ("model.safetensors", BASELINE_HEAD_FILE):
        (old / name).write_bytes((run.weights.parent / name).read_bytes())
    rebuilt = candidate_weights(dataclasses.replace(run, weights=old / "model.safetensors"), "baseline")
    # Distillation trains only the head today, so both ways give the same model.
    assert set(rebuilt) == set(full) and all(rebuilt[k].equal(full[k]) for k in full)
    # Published under the baseline, its numbers take the plain names; the distilled ones stay on record.
    renamed = published_metrics(run.metrics, "baseline")
    assert renamed["val.student.R@1"] == run.metrics["val.baseline_student.R@1"]
    assert renamed["val.distilled_student.R@1"] == run.metrics["val.student.R@1"]
    assert renamed[RERANK] == run.metrics["val.baseline_rerank@10.R@1"]
