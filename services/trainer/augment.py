"""Augmentation of cached uint8 frames into model input, so the model does not learn
the generator's exact pixels.

Every change keeps what a caption says true: crops keep the object in view (the
crop is mild and one per video, so motion direction is unchanged), colour shifts
are small enough that red stays red, and there is no flip (it would swap left
and right). Temporal jitter picks frames near the uniform positions and keeps
their order. All randomness comes from the ``torch.Generator`` passed in.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .config import AugmentSection


def pick_frames(valid: int, count: int, jitter: bool, gen: torch.Generator) -> list[int]:
    """``count`` ordered indices into ``valid`` frames: uniform, or near-uniform with jitter."""
    if valid <= count:
        return list(range(valid))
    stride = valid / count
    centres = (torch.arange(count, dtype=torch.float64) + 0.5) * stride - 0.5
    if jitter:
        centres = centres + (torch.rand(count, generator=gen, dtype=torch.float64) - 0.5) * stride
    index = centres.round().clamp(0, valid - 1).long()
    return sorted(int(i) for i in index)


def _random_crop(x: torch.Tensor, scale: tuple[float, float], gen: torch.Generator) -> torch.Tensor:
    """One random resized crop for all frames of a video: x[T,3,S,S] -> [T,3,S,S]."""
    size = x.shape[-1]
    area = float(torch.empty(1).uniform_(scale[0], scale[1], generator=gen))
    ratio = math.exp(float(torch.empty(1).uniform_(math.log(3 / 4), math.log(4 / 3), generator=gen)))
    w = max(1, min(size, int(round(size * math.sqrt(area * ratio)))))
    h = max(1, min(size, int(round(size * math.sqrt(area / ratio)))))
    top = int(torch.randint(0, size - h + 1, (1,), generator=gen))
    left = int(torch.randint(0, size - w + 1, (1,), generator=gen))
    crop = x[:, :, top:top + h, left:left + w]
    return F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


_BACKGROUND_TOLERANCE = 0.06  # decoded flat areas vary by a few levels around their colour


def _shift_background(x: torch.Tensor, max_shift: float, gen: torch.Generator) -> torch.Tensor:
    """Shift the tone of the pixels near a video's dominant colour, x[T,3,S,S] in 0..1.

    The dominant colour is the per-channel median of the first frame (the backdrop
    when it fills most of the view). A global brightness shift moves the backdrop and
    the objects together; lighting that changes only the backdrop changes their
    contrast, which the model must not read as a different colour.
    """
    backdrop = x[0].reshape(3, -1).median(dim=1).values.view(1, 3, 1, 1)
    near = (x - backdrop).abs().amax(dim=1, keepdim=True) < _BACKGROUND_TOLERANCE
    shift = (torch.rand(1, generator=gen) * 2 - 1) * max_shift
    return torch.where(near, x + shift, x)


def make_pixels(frames: np.ndarray, mask: np.ndarray, num_frames: int, mean: Sequence[float], std: Sequence[float],
                config: AugmentSection | None, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
    """uint8 frames[B,F,S,S,3] + mask[B,F] -> (pixels[B,T,3,S,S] normalised, mask[B,T], picked indices).

    ``config`` None (or disabled) = no augmentation: uniform picks, no pixel changes.
    """
    augment = config is not None and config.enabled
    batch, size = frames.shape[0], frames.shape[2]
    out = torch.zeros((batch, num_frames, 3, size, size), dtype=torch.float32)
    out_mask = torch.zeros((batch, num_frames), dtype=torch.bool)
    picked: list[list[int]] = []
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    for b in range(batch):
        index = pick_frames(int(mask[b].sum()), num_frames, augment and config.temporal_jitter, gen)
        picked.append(index)
        x = torch.from_numpy(np.ascontiguousarray(frames[b, index])).permute(0, 3, 1, 2).float() / 255.0
        if augment:
            x = _random_crop(x, config.crop_scale, gen)
            if config.background_shift > 0:
                x = _shift_background(x, config.background_shift, gen)
            shift = (torch.rand(1, generator=gen) * 2 - 1) * config.brightness
            gain = 1 + (torch.rand(1, 3, 1, 1, generator=gen) * 2 - 1) * config.channel_jitter
            x = x * gain + shift
            if config.noise_std > 0:
                x = x + torch.randn(x.shape, generator=gen) * config.noise_std
            x = x.clamp(0.0, 1.0)
        out[b, :len(index)] = (x - mean_t) / std_t
        out_mask[b, :len(index)] = True
    return out, out_mask, picked
