"""Training augmentation on real decoded synthetic frames: what changes, what must not."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vidsearch.config import DecodeSettings
from vidsearch.services.trainer.augment import _shift_background, make_pixels
from vidsearch.services.trainer.config import AugmentSection
from vidsearch.synth import generate_dataset, load_manifest
from vidsearch.video import decode_video

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


@pytest.fixture(scope="module")
def frames(tmp_path_factory) -> np.ndarray:
    """uint8[B,F,S,S,3]: two videos through the ingest decoder."""
    root = tmp_path_factory.mktemp("augment")
    generate_dataset(root, 2, 11, val_frac=0.0, test_frac=0.0, progress=False)
    decode = DecodeSettings(allowed_prefixes=[str(root)])
    videos = [decode_video(r.uri, decode, num_frames=8, resize_to=64).frames for r in load_manifest(root)]
    return np.stack([np.asarray(v) for v in videos])


def as_unit(video: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(video).permute(0, 3, 1, 2).float() / 255.0


def test_the_backdrop_shifts_and_the_objects_keep_their_colour(frames):
    x = as_unit(frames[0])
    backdrop = x[0].reshape(3, -1).median(dim=1).values.view(1, 3, 1, 1)
    near = (x - backdrop).abs().amax(dim=1, keepdim=True) < 0.06
    assert 0.5 < near.float().mean() < 1.0  # mostly backdrop, some object pixels
    out = _shift_background(x, 0.2, torch.Generator().manual_seed(0))
    moved = (out - x)[near.expand_as(x)]
    assert moved.abs().min() > 1e-3 and torch.allclose(moved, moved[0].expand_as(moved))  # one shift for the video
    assert torch.equal(out[~near.expand_as(x)], x[~near.expand_as(x)])


def test_without_augmentation_the_frames_are_only_normalised(frames):
    mask = np.ones(frames.shape[:2], dtype=bool)
    pixels, out_mask, picked = make_pixels(frames, mask, 4, MEAN, STD, None, torch.Generator().manual_seed(0))
    assert picked == [[0, 2, 4, 6]] * 2 and out_mask.all()
    want = (as_unit(frames[1][[0, 2, 4, 6]]) - 0.5) / 0.25
    assert torch.allclose(pixels[1], want, atol=1e-6)


def test_augmentation_is_reproducible_from_the_generator_and_keeps_frame_order(frames):
    mask = np.ones(frames.shape[:2], dtype=bool)
    config = AugmentSection(channel_jitter=0.12, background_shift=0.2)
    a = make_pixels(frames, mask, 4, MEAN, STD, config, torch.Generator().manual_seed(5))
    b = make_pixels(frames, mask, 4, MEAN, STD, config, torch.Generator().manual_seed(5))
    c = make_pixels(frames, mask, 4, MEAN, STD, config, torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0]) and a[2] == b[2]
    assert not torch.equal(a[0], c[0])
    assert all(index == sorted(index) and len(set(index)) == len(index) for index in a[2] + c[2])


def test_augmentation_ranges_are_validated():
    with pytest.raises(ValueError, match="background_shift"):
        AugmentSection(background_shift=0.9)
