"""Bad inputs around the spatial slow model get one clear error, and a run without a teacher
stage leaves the teacher's own copies of the student as they were."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vidsearch.config import ConfigError, load_settings
from vidsearch.models import build_model
from vidsearch.services.reranker.scoring import RerankRequest
from vidsearch.services.trainer.errors import TrainingError
from vidsearch.services.trainer.worker import _check_index_features


def request(**fields) -> RerankRequest:
    frames = np.ones((2, 3, 4), dtype=np.float32)
    return RerankRequest(text="a red square", frames=frames, mask=np.ones((2, 3), bool), model_version="v",
                         **fields)


def test_rerank_requests_refuse_misshapen_or_non_finite_regions():
    assert request(regions=np.ones((2, 3, 4, 8), np.float32)).regions.shape == (2, 3, 4, 8)
    with pytest.raises(ValueError, match=r"regions: expected a \[K, T, G, W\] array with \[K, T\] = \(2, 3\)"):
        request(regions=np.ones((2, 2, 4, 8), np.float32))
    with pytest.raises(ValueError, match=r"regions: expected a \[K, T, G, W\]"):
        request(regions=np.ones((2, 3, 8), np.float32))
    bad = np.ones((2, 3, 4, 8), np.float32)
    bad[1, 2, 0, 0] = np.nan
    with pytest.raises(ValueError, match="regions: contains NaN or infinity"):
        request(regions=bad)


def test_training_a_spatial_scorer_from_index_frames_is_refused_with_one_line():
    with pytest.raises(TrainingError, match="data.frames=index: the index stores no region tokens"):
        _check_index_features(build_model("tiny-spatial", device="cpu", seed=0))
    _check_index_features(build_model("tiny", device="cpu", seed=0))  # a scorer without regions: fine


def test_an_unknown_region_dtype_is_refused_naming_the_setting():
    with pytest.raises(ConfigError, match="region_dtype"):
        load_settings(env={"VIDSEARCH_STORE__REGION_DTYPE": "int4"})
    assert load_settings(env={"VIDSEARCH_STORE__REGION_DTYPE": "float16"}).store.region_dtype == "float16"


def test_freezing_the_teacher_view_copies_the_student_as_it_is_now():
    model = build_model("tiny-spatial", device="cpu", seed=0)
    with torch.no_grad():
        for p in model.head.parameters():
            p.add_(1.0)
    assert any(not torch.equal(a, b) for a, b in zip(model.head.state_dict().values(),
                                                    model.scorer_head.state_dict().values()))
    model.freeze_teacher_view()
    assert all(torch.equal(a, b) for a, b in zip(model.head.state_dict().values(),
                                                 model.scorer_head.state_dict().values()))


def test_rebuilding_a_version_keeps_the_copies_its_teacher_was_trained_with():
    from vidsearch.services.trainer.job import _with_scorer

    model = build_model("tiny-spatial", device="cpu", seed=0)
    with torch.no_grad():  # the student moved on after its teacher was trained (distillation)
        for p in model.head.parameters():
            p.add_(1.0)
    teacher_head = {k: v.clone() for k, v in model.scorer_head.state_dict().items()}
    scorer = {**model.config.scorer.__dict__, "own_text": True}  # e.g. distillation now trains the text tower
    rebuilt = _with_scorer(model, scorer, seed=0, fresh_scorer=False)
    assert all(torch.equal(rebuilt.scorer_head.state_dict()[k], v) for k, v in teacher_head.items())
    # The new text-tower copy (none before) is the student's.
    assert torch.equal(rebuilt.scorer_text.token_embedding.weight, rebuilt.clip.token_embedding.weight)
