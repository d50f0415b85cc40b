"""Losses over the global batch: with two Ray Train workers (a real TorchTrainer, gloo), each
embedding its shard and all-gathering the rows, InfoNCE and TeachCLIP's CgT (and the whole
teacher and distil stage losses) equal the one-worker loss on the same global batch, and so
do the gradients after the runner's all-reduce. With one worker the gather is the input.

The worker function lives in this module and is shipped to the workers by value; the
one-worker reference is computed in the test process, without a process group.
"""
from __future__ import annotations

import copy
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vidsearch.models import build_model, load_model_config
from vidsearch.services.trainer.batches import BatchPlan
from vidsearch.services.trainer.collective import gather_rows, shard_bounds, shard_sizes
from vidsearch.services.trainer.config import AugmentSection, DistillStage, TeacherStage
from vidsearch.services.trainer.frames import FrameCache
from vidsearch.services.trainer.loss import cgt_loss, symmetric_infonce
from vidsearch.services.trainer.runner import _allreduce_grads
from vidsearch.services.trainer.stages import (
    STAGE_IDS, CaptionBank, FrozenFeatures, _shard, distill_loss, encode_cache, teacher_loss,
)
from vidsearch.services.trainer.worker import _set_trainable, _student_parameters
from vidsearch.synth_scenes import plan_dataset

TOLERANCE = 1e-5
# An odd global batch, so the two shards differ in size (4 and 3 rows) and the gather pads.
ROWS, WIDTH, NEGATIVES = 7, 6, 5
OWNERS = [0, 0, 2, 4, 6]  # the batch row each negative caption was made from (ascending)


# ---------------------------------------------------------------- an embedding problem
def _problem() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return {"text_in": torch.randn(ROWS, 10, generator=g), "video_in": torch.randn(ROWS, 12, generator=g),
            "negative_in": torch.randn(NEGATIVES, 10, generator=g),
            "valid": torch.rand(ROWS, NEGATIVES, generator=g) > 0.25,
            "teacher": 4 * torch.randn(ROWS, ROWS, generator=g),
            "text_w": torch.randn(10, WIDTH, generator=g), "video_w": torch.randn(12, WIDTH, generator=g)}


def embedding_losses(rank: int, world: int) -> dict[str, Any]:
    """InfoNCE (with caption negatives) and CgT of linear text/video encoders, each worker
    encoding its shard; the loss value and the all-reduced gradients, per loss."""
    prob = _problem()
    start, stop = shard_bounds(ROWS, rank, world)
    sizes = shard_sizes(ROWS, world)
    owners = np.asarray(OWNERS)
    first, last = int(np.searchsorted(owners, start)), int(np.searchsorted(owners, stop))
    negative_sizes = [int(np.searchsorted(owners, b) - np.searchsorted(owners, a))
                      for a, b in (shard_bounds(ROWS, r, world) for r in range(world))]
    out: dict[str, Any] = {}
    for name in ("in", "cgt"):
        text_w, video_w = torch.nn.Parameter(prob["text_w"].clone()), torch.nn.Parameter(prob["video_w"].clone())
        scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        params = [text_w, video_w, scale]
        text = gather_rows(F.normalize(prob["text_in"][start:stop] @ text_w, dim=-1), sizes)
        video = gather_rows(F.normalize(prob["video_in"][start:stop] @ video_w, dim=-1), sizes)
        if name == "in":
            negatives = gather_rows(F.normalize(prob["negative_in"][first:last] @ text_w, dim=-1), negative_sizes)
            loss = symmetric_infonce(text, video, scale, negatives, prob["valid"])
        else:
            loss = cgt_loss(scale.exp() * (text @ video.T), prob["teacher"])
        loss.backward()
        _allreduce_grads(params, world)
        out[name] = {"loss": float(loss.detach()), "grads": [p.grad.clone() for p in params],
                     "gathered": text.detach().clone()}
    return out


# ---------------------------------------------------------------- the real stage losses
def make_world(n: int = 12, num_frames: int = 4, size: int = 32, seed: int = 0):
    """A bank of synthetic captions and events and an in-memory frame cache (no decoding)."""
    specs = plan_dataset(n, seed=seed, num_frames=24)
    bank = CaptionBank(captions=[list(s.captions) for s in specs],
                       events=[[e.to_dict(8.0) for e in s.events] for s in specs])
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, (n, 2 * num_frames, size, size, 3), dtype=np.uint8)
    mask = np.ones((n, 2 * num_frames), bool)
    mask[-1, -2:] = False
    stamps = np.tile(np.linspace(0.0, 3.0, 2 * num_frames, dtype=np.float32), (n, 1))
    cache = FrameCache([f"v{i}" for i in range(n)], frames, mask, stamps, Path("/nonexistent"))
    twins = [[i ^ 1] if (i ^ 1) < n else [] for i in range(n)]
    return bank, cache, twins


def _frozen_features(model, cache: FrameCache) -> FrozenFeatures:
    clean = encode_cache(model, cache, model.config.num_frames, None, 0, 0)
    views = [encode_cache(model, cache, model.config.num_frames, AugmentSection(), 0, v + 1) for v in range(2)]
    return FrozenFeatures(clean.frames, clean.mask, clean.times, views=torch.stack([v.frames for v in views]),
                          view_mask=torch.stack([v.mask for v in views]),
                          view_times=torch.stack([v.times for v in views]))


def _step(loss_fn, params, step: int, world: int) -> dict[str, Any]:
    for p in params:
        p.grad = None
    loss, parts = loss_fn(step)
    loss.backward()
    _allreduce_grads(params, world)
    return {"loss": float(loss.detach()), "parts": parts,
            "grads": [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]}


def stage_losses(rank: int, world: int) -> dict[str, Any]:
    """Two steps of the teacher stage (batch 8, even shards) and of distillation (batch 7,
    uneven shards), both with caption negatives, from the same seeded model and world."""
    torch.set_num_threads(1)
    bank, cache, twins = make_world()
    n = len(bank.captions)
    model = build_model(load_model_config("tiny-afa"), device="cpu", seed=0).eval()
    features = _frozen_features(model, cache)
    model.freeze_teacher_view()
    out: dict[str, Any] = {}
    teacher_stage = TeacherStage(batch_size=8, caption_negatives=2, moment_weight=0.5)
    params = _set_trainable(model, model.scorer)
    plan = BatchPlan(n, teacher_stage.batch_size, 2, twins, 0, STAGE_IDS["teacher"])
    loss_fn = teacher_loss(model, features, bank, plan, teacher_stage, 0, rank, world)
    out["teacher"] = [_step(loss_fn, params, step, world) for step in (0, 1)]
    teacher = copy.deepcopy(model).eval()
    distill_stage = DistillStage(batch_size=7, caption_negatives=2)
    params, _ = _student_parameters(model, distill_stage)
    plan = BatchPlan(n, distill_stage.batch_size, 2, twins, 0, STAGE_IDS["distill"])
    loss_fn = distill_loss(model, teacher, features, bank, plan, distill_stage, 0, rank, world)
    out["distill"] = [_step(loss_fn, params, step, world) for step in (0, 1)]
    return out


def _two_worker_loop(config: dict[str, Any]) -> None:
    import ray.train

    torch.set_num_threads(1)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    assert torch.distributed.get_backend() == "gloo"
    result = {"world": world, "embedding": embedding_losses(rank, world), "stages": stage_losses(rank, world)}
    torch.save(result, Path(config["out"]) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def two_workers(ray_local, tmp_path_factory) -> list[dict[str, Any]]:
    from ray import cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out = tmp_path_factory.mktemp("global-batch")
    # The workers cannot import a test module: ship this one's functions by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        TorchTrainer(_two_worker_loop, train_loop_config={"out": str(out)},
                     scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
                     run_config=RunConfig(name="global-batch", storage_path=str(out / "ray"))).fit()
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    return [torch.load(out / f"rank{rank}.pt") for rank in range(2)]


@pytest.fixture(scope="module")
def one_worker() -> dict[str, Any]:
    torch.set_num_threads(1)
    return {"embedding": embedding_losses(0, 1), "stages": stage_losses(0, 1)}


def _assert_close(ours: dict[str, Any], theirs: dict[str, Any], label: str) -> None:
    assert abs(ours["loss"] - theirs["loss"]) <= TOLERANCE, (label, ours["loss"], theirs["loss"])
    for key in ours.get("parts", {}):
        assert abs(ours["parts"][key] - theirs["parts"][key]) <= TOLERANCE, (label, key, ours["parts"], theirs["parts"])
    assert len(ours["grads"]) == len(theirs["grads"])
    for index, (a, b) in enumerate(zip(ours["grads"], theirs["grads"])):
        assert a.shape == b.shape
        worst = float((a - b).abs().max()) if a.numel() else 0.0
        # float32 sums in another order: 1e-5 of the gradient's own size (or absolute, below 1)
        size = max(1.0, float(b.abs().max()) if b.numel() else 0.0)
        assert worst <= TOLERANCE * size, f"{label}: gradient {index} (max |g| {size}) differs by {worst}"


# ---------------------------------------------------------------- tests
def test_shards_are_contiguous_in_rank_order_and_match_the_batch_split():
    for rows in range(1, 20):
        for world in (1, 2, 3, 4):
            full = np.arange(100, 100 + rows)
            bounds = [shard_bounds(rows, rank, world) for rank in range(world)]
            assert [b - a for a, b in bounds] == shard_sizes(rows, world)
            for rank, (a, b) in enumerate(bounds):
                assert np.array_equal(full[a:b], _shard(full, rank, world))
            assert np.array_equal(np.concatenate([full[a:b] for a, b in bounds]), full)


def test_without_a_process_group_the_gather_is_the_tensor_itself():
    x = torch.randn(3, 4, requires_grad=True)
    assert gather_rows(x) is x and gather_rows(x, [3]) is x


def test_two_workers_gather_every_row_in_batch_order(two_workers, one_worker):
    assert [r["world"] for r in two_workers] == [2, 2]
    for name in ("in", "cgt"):
        reference = one_worker["embedding"][name]["gathered"]
        for result in two_workers:  # every rank holds the whole batch, in order
            assert torch.allclose(result["embedding"][name]["gathered"], reference, atol=1e-6)


@pytest.mark.parametrize("loss", ["in", "cgt"])
def test_infonce_and_cgt_over_two_workers_equal_one_worker_loss_and_gradients(two_workers, one_worker, loss):
    reference = one_worker["embedding"][loss]
    for rank, result in enumerate(two_workers):
        _assert_close(result["embedding"][loss], reference, f"{loss} rank {rank}")


@pytest.mark.parametrize("stage", ["teacher", "distill"])
def test_the_stage_losses_over_two_workers_equal_one_worker(two_workers, one_worker, stage):
    """The real teacher and distil losses (InfoNCE with caption negatives, moment, CgT, FgT):
    the same values and parameter gradients with the batch split over two workers."""
    reference = one_worker["stages"][stage]
    assert {"in", "moment"} <= set(reference[0]["parts"]) if stage == "teacher" else \
        {"in", "cgt", "fgt"} <= set(reference[0]["parts"])
    for rank, result in enumerate(two_workers):
        for step, (ours, theirs) in enumerate(zip(result["stages"][stage], reference)):
            _assert_close(ours, theirs, f"{stage} step {step} rank {rank}")
