"""Distillation from the spatial teacher through the trainer's own stage runner: the
student's text tower and head train, while the frozen teacher (its own text tower, the
batch's region tokens) scores a fixed batch exactly as before, and so does the student
model's own slow scorer (it reads its frozen copy of the text tower)."""
from __future__ import annotations

import copy

import numpy as np
import torch

from vidsearch.models import ModelConfig, build_model, load_model_config
from vidsearch.services.trainer.batches import BatchPlan
from vidsearch.services.trainer.config import DistillStage
from vidsearch.services.trainer.runner import StageContext, run_stage
from vidsearch.services.trainer.stages import (STAGE_IDS, CaptionBank, FrozenFeatures, distill_loss,
                                               text_tower_parameters)
from vidsearch.services.trainer.worker import _student_parameters

from test_models import _perturb

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("square", "circle")


def spatial_teacher_model():
    data = load_model_config("tiny-spatial").to_dict()
    data["scorer"]["own_text"] = True
    model = build_model(ModelConfig.from_dict(data), device="cpu", seed=0)
    _perturb(model, 2)  # a "trained" head and scorer: non-zero read-outs, so the teacher has an opinion
    return model


def features_of(model, videos: int = 8, frames: int = 4) -> FrozenFeatures:
    """Frame features and region tokens of real (random-pixel) frames, from the frame tower."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(videos * frames, 40, 40, 3), dtype=np.uint8)
    with torch.no_grad():
        embedded, regions = model.encode_frames_and_regions(model.preprocess(pixels))
    mask = torch.ones(videos, frames, dtype=torch.bool)
    mask[1, 3:] = False
    emb = embedded.view(videos, frames, -1) * mask[..., None]
    cells = regions.view(videos, frames, *regions.shape[1:]) * mask[..., None, None]
    times = torch.arange(frames, dtype=torch.float32).expand(videos, -1) * 0.5
    return FrozenFeatures(emb, mask, times.clone(), regions=cells)


def test_distill_trains_the_text_tower_and_never_moves_the_spatial_teacher(tmp_path):
    model = spatial_teacher_model()
    features = features_of(model)
    n = features.frames.shape[0]
    bank = CaptionBank(captions=[[f"a {COLOURS[i % 4]} {SHAPES[i // 4]} on the {'left' if i % 2 else 'right'}"]
                                 for i in range(n)], events=[[] for _ in range(n)])
    teacher = copy.deepcopy(model).eval()
    stage = DistillStage(steps=4, batch_size=4, lr=5e-3, warmup_frac=0.0, hard_negatives=0, baseline=False)
    assert stage.train_text and stage.alpha > 0 and stage.gamma > 0

    texts = [c[0] for c in bank.captions]

    def teacher_scores() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return teacher.score_matrix(teacher.encode_scorer_text(texts), features.frames, features.mask,
                                        regions=features.regions)

    def own_scores() -> torch.Tensor:
        with torch.no_grad():
            return model.score_matrix(model.encode_scorer_text(texts), features.frames, features.mask,
                                      regions=features.regions)[0]

    before_teacher, before_relevance = teacher_scores()
    before_own = own_scores()
    assert before_teacher.std() > 1e-3  # the teacher's scores carry information to distil
    with torch.no_grad():
        before_text = model.encode_text(texts)
    text_before = [p.detach().clone() for p in text_tower_parameters(model)]
    head_before = [p.detach().clone() for p in model.head.parameters()]

    params, scales = _student_parameters(model, stage)
    assert all(id(p) in scales for p in text_tower_parameters(model))
    plan = BatchPlan(n, stage.batch_size, stage.hard_negatives, None, 0, STAGE_IDS["distill"])
    loss = distill_loss(model, teacher, features, bank, plan, stage, 0, 0, 1)
    _, parts = loss(0)
    assert {"in", "cgt", "fgt"} <= set(parts)
    log = run_stage("distill", stage, model, params, loss, StageContext(run_dir=tmp_path, checkpoint_every=1000,
                                                                        log_every=1000), lr_scales=scales)
    assert log.steps == 4 and all(np.isfinite(log.losses))

    moved = [not torch.equal(a, b) for a, b in zip(text_before, text_tower_parameters(model))]
    assert sum(moved) >= len(moved) // 2, moved  # the text tower trained (not only its temperature)
    assert any(not torch.equal(a, b) for a, b in zip(head_before, model.head.parameters()))
    with torch.no_grad():
        assert (model.encode_text(texts) - before_text).abs().max() > 1e-4

    after_teacher, after_relevance = teacher_scores()
    assert torch.equal(after_teacher, before_teacher) and torch.equal(after_relevance, before_relevance)
    # The student model's own slow scorer reads its frozen copy: what it publishes re-ranks as before.
    assert torch.equal(own_scores(), before_own)
