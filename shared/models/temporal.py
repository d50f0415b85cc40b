"""CLIP4Clip's temporal transformer over frame embeddings, shared by the seqTransf and AFA heads.

Frame position embeddings are added, a transformer encoder runs with a key-padding
mask, and its output is added back onto the input frames (CLIP4Clip's residual).
The output projection is zero-initialised, so an untrained temporal model is the
identity and a freshly built seqTransf/AFA head behaves exactly like meanP instead
of adding noise to pretrained CLIP features; training moves it away from zero.
"""
from __future__ import annotations

import torch
from torch import nn

from .masking import positions


def check_heads(where: str, width: int, heads: int) -> None:
    if width % heads:
        raise ValueError(f"{where}: width {width} is not divisible by {heads} attention heads")


class TemporalTransformer(nn.Module):
    def __init__(self, dim: int, layers: int, heads: int, max_frames: int) -> None:
        super().__init__()
        self.max_frames = max_frames
        self.position = nn.Embedding(max_frames, dim)
        nn.init.normal_(self.position.weight, std=0.01)
        layer = nn.TransformerEncoderLayer(
            dim, heads, dim_feedforward=4 * dim, dropout=0.0, activation="gelu",
            batch_first=True, norm_first=True)
        # Nested tensors would drop padded rows and make outputs depend on the batch layout.
        self.encoder = nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(dim), enable_nested_tensor=False)
        self.out = nn.Linear(dim, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """frames[B,T,D] (padding already zeroed), mask[B,T] -> frames[B,T,D]."""
        valid = int(mask.sum(dim=1).max())
        if valid > self.max_frames:
            raise ValueError(f"{valid} valid frames exceed the head's max_frames={self.max_frames}")
        h = frames + self.position(positions(mask)).to(frames.dtype)
        h = self.encoder(h, src_key_padding_mask=~mask)
        return frames + self.out(h)
