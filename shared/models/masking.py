"""Masked reductions shared by the heads and scorers.

Padding must be exact: a video padded with garbage frames has to give bit-for-bit
the result of the unpadded video (up to float reassociation). So padded values are
zeroed *before* any arithmetic (0 * NaN is NaN, so multiplying by the mask is not
enough), and softmaxes fill padded logits with -inf.
"""
from __future__ import annotations

import torch


def check_mask(frames: torch.Tensor, mask: torch.Tensor, what: str = "frames") -> torch.Tensor:
    """Validate shapes of ``frames[B,T,D]`` and ``mask[B,T]``; return the mask as bool."""
    if frames.dim() != 3:
        raise ValueError(f"{what}: expected [B,T,D], got shape {tuple(frames.shape)}")
    if mask.shape != frames.shape[:2]:
        raise ValueError(f"{what} mask: expected shape {tuple(frames.shape[:2])}, got {tuple(mask.shape)}")
    if frames.shape[0] == 0:
        raise ValueError(f"{what}: the batch is empty")
    mask = mask.to(device=frames.device, dtype=torch.bool)
    if not bool(mask.any(dim=1).all()):
        raise ValueError(f"{what} mask: every row needs at least one valid frame")
    return mask


def zero_padding(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Replace padded positions of ``x[B,T,...]`` with zeros (NaN-safe)."""
    return x.masked_fill(~mask.view(*mask.shape, *([1] * (x.dim() - mask.dim()))), 0.0)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over dim 1 of ``x[B,T,D]`` counting only valid positions."""
    total = zero_padding(x, mask).sum(dim=1)
    count = mask.sum(dim=1, keepdim=True).clamp(min=1).to(total.dtype)
    return total / count


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax over ``dim`` with padded entries at exactly 0; computed in fp32.

    A slice with no valid entry yields zeros, not NaN.
    """
    logits = logits.float().masked_fill(~mask, float("-inf"))
    weights = torch.softmax(logits, dim=dim)
    return torch.nan_to_num(weights, nan=0.0)


def uniform_weights(mask: torch.Tensor) -> torch.Tensor:
    """1/T_valid on valid frames, 0 on padding: the implicit weights of mean pooling."""
    m = mask.float()
    return m / m.sum(dim=1, keepdim=True).clamp(min=1)


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Index of each valid frame among the valid frames (0, 1, ...); padding gets 0.

    Position embeddings looked up with these indices do not depend on where the
    padding sits, so any mask pattern (not only trailing padding) is exact.
    """
    pos = mask.long().cumsum(dim=1) - 1
    return pos.clamp(min=0) * mask.long()
