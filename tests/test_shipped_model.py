"""The model shipped in deploy/models finds videos it has never seen, from captions it has never seen.

Fresh synthetic videos (a seed the shipped model was not trained on) go through
the same decoder and frame tower as ingest; every caption is a query against all
of them. Thresholds sit below what was measured (docs/benchmarks/quality.md),
with a margin for a different draw of videos.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vidsearch.config import load_settings
from vidsearch.models.persist import PRODUCTION_ALIAS, load_model_version
from vidsearch.models.shipped import SHIPPED_REGISTRY, shipped_registry, shipped_version
from vidsearch.services.trainer.datasets import DatasetSource, load_dataset, trusting_dataset_root
from vidsearch.services.trainer.evaluate import (evaluate_model, moment_accuracy, rerank_similarity, student_matrix,
                                                 teacher_matrix)
from vidsearch.synth import generate_dataset

# The shipped model measured R@5 97.3 (student + rerank@20) on its test split (manifest metrics);
# 70 leaves room for another draw of 120 videos.
MIN_R5 = 70.0
HELD_OUT_SEED = 4242


@pytest.fixture(scope="module")
def shipped():
    registry = shipped_registry()
    assert registry is not None, f"no shipped model under {SHIPPED_REGISTRY}"
    model, manifest = load_model_version(registry, "vidsearch", PRODUCTION_ALIAS, device="cpu")
    return model, manifest


@pytest.fixture(scope="module")
def held_out(tmp_path_factory, shipped):
    from vidsearch.services.trainer.worker import _eval_set  # the trainer's own eval path

    model, _ = shipped
    root = tmp_path_factory.mktemp("heldout")
    generate_dataset(root, 120, HELD_OUT_SEED, val_frac=0.0, test_frac=0.0, progress=False)
    source = DatasetSource(kind="synth", path=str(root))
    decode = trusting_dataset_root(load_settings().decode, source)
    videos = load_dataset(source, decode)
    from vidsearch.services.trainer.frames import build_cache

    size = model.image_size if isinstance(model.image_size, int) else min(model.image_size)
    cache = build_cache(videos, decode, frames=model.config.num_frames, size=size, cache_dir=root / "cache",
                        label="eval", progress=False)
    split = {"video_ids": [v.video_id for v in videos], "captions": [list(v.captions) for v in videos],
             "events": [list(v.events) for v in videos], "hard_negatives": [list(v.hard_negatives) for v in videos],
             "eval_cache": str(cache.path)}
    return _eval_set(model, split, 0)


def test_the_shipped_model_is_the_registry_production_and_verifies(shipped):
    model, manifest = shipped
    assert manifest.version == shipped_version()
    assert ":trained:" in manifest.frame_encoder
    assert manifest.metrics["test.rerank@20.R@1"] > 0
    assert manifest.training["run_config"]["model"]["preset"] == "synth-resnet"


def test_most_held_out_captions_find_their_video_in_the_top_5(shipped, held_out):
    model, _ = shipped
    settings = load_settings()
    rows = evaluate_model(model, held_out, rerank_k=(20,), beta=settings.serve.beta)
    assert rows["rerank@20"]["R@5"] >= MIN_R5, rows
    assert rows["student"]["R@5"] >= MIN_R5 - 10, rows


def test_reranking_keeps_the_order_accuracy_on_reversed_twins(shipped, held_out):
    model, _ = shipped
    texts, owners = held_out.queries()
    with torch.inference_mode():
        student = student_matrix(model, held_out, texts)
        teacher = teacher_matrix(model, held_out, texts)
    fused = rerank_similarity(student, teacher, 20, load_settings().serve.beta)
    pairs = [(row, owner, twin) for row, owner in enumerate(owners)
             for twin, relation in held_out.twins[owner] if relation == "reversed"]
    assert len(pairs) >= 20
    recall_right = np.mean([student[r, o] > student[r, t] for r, o, t in pairs])
    rerank_right = np.mean([fused[r, o] > fused[r, t] for r, o, t in pairs])
    # Re-ranking must never cost order accuracy. The issue asks for strictly more; the shipped
    # teacher does not deliver it yet (measured 91.1% for both on these 120 videos, and
    # docs/benchmarks/quality.md), so that target is reported as unmet, not asserted.
    assert recall_right >= 0.85, recall_right
    assert rerank_right >= recall_right, (rerank_right, recall_right)


def test_the_best_moment_finds_the_described_event(shipped, held_out):
    """The scorer's relevance head was trained (moment loss): for a phrase describing one event,
    its best frame lands in that event's window far more often than the text-agnostic AFA
    weights' does; and so does the recall-only moment (the phrase's cosine with each stored
    frame), which is what a result reports when the reranker did not run. Measured on the
    test split: 99.6, 99.6 and 40.5 (docs/benchmarks/quality.md)."""
    model, _ = shipped
    moments = moment_accuracy(model, held_out)
    assert moments["moment_rerank"] > moments["moment_afa"] + 10, moments
    assert moments["moment_rerank"] >= 80 and moments["moment_recall"] >= 80, moments
