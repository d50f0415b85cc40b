"""Frame preprocessing with tensor ops: uint8 frames -> normalised CLIP input.

Matches open_clip's default eval transform (resize the shorter side, centre crop,
mean/std normalisation) but runs on a whole [T,H,W,3] batch at once, on whatever
device the model lives on, instead of a PIL loop per frame.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


def _resized_size(in_h: int, in_w: int, out_h: int, out_w: int) -> tuple[int, int]:
    """Resize so the crop box fits entirely ("shortest" mode), rounding like torchvision."""
    if out_h == out_w:
        # torchvision's Resize(int): the short side becomes S, the long one int(S * long / short).
        if in_h <= in_w:
            return out_h, int(out_h * in_w / in_h)
        return int(out_w * in_h / in_w), out_w
    scale = max(out_h / in_h, out_w / in_w)
    return max(out_h, int(in_h * scale)), max(out_w, int(in_w * scale))


def preprocess_frames(frames: np.ndarray | torch.Tensor, size: int | Sequence[int],
                      mean: Sequence[float], std: Sequence[float],
                      device: torch.device | str = "cpu", interpolation: str = "bicubic") -> torch.Tensor:
    """frames uint8[T,H,W,3] (RGB) -> float32[T,3,S_h,S_w] on ``device``."""
    if isinstance(frames, np.ndarray):
        if frames.dtype != np.uint8:
            raise ValueError(f"frames: expected uint8, got {frames.dtype}")
        frames = torch.from_numpy(np.ascontiguousarray(frames))
    elif not isinstance(frames, torch.Tensor):
        raise ValueError(f"frames: expected a numpy array or tensor, got {type(frames).__name__}")
    if frames.dtype != torch.uint8:
        raise ValueError(f"frames: expected uint8, got {frames.dtype}")
    if frames.dim() != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"frames: expected shape [T,H,W,3] with T >= 1, got {tuple(frames.shape)}")
    out_h, out_w = _pair(size)
    x = frames.to(device).permute(0, 3, 1, 2).float()
    in_h, in_w = x.shape[-2:]
    new_h, new_w = _resized_size(in_h, in_w, out_h, out_w)
    if (new_h, new_w) != (in_h, in_w):
        mode = "bicubic" if interpolation == "bicubic" else "bilinear"
        x = F.interpolate(x, size=(new_h, new_w), mode=mode, align_corners=False, antialias=True)
        x = x.clamp(0.0, 255.0)  # bicubic overshoots; PIL clips to the uint8 range
    # Same offsets as torchvision's CenterCrop.
    top, left = int(round((new_h - out_h) / 2.0)), int(round((new_w - out_w) / 2.0))
    x = x[:, :, top:top + out_h, left:left + out_w] / 255.0
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return ((x - mean_t) / std_t).contiguous()
