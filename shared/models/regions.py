"""Region tokens: the frame tower's spatial map, the slow model's own view of the pixels.

The recall embedding keeps one vector per frame; whatever the frame tower knew about
*where* things are is pooled away. The spatial scorer reads what was thrown away: the
tower's last spatial feature map in the joint embedding space, averaged to a small
``grid x grid`` of cells per frame, optionally narrowed to ``width`` dimensions.

- ViT towers: the patch tokens after ``ln_post``, through the tower's output
  projection (the same map the class token takes).
- ModifiedResNet towers: each cell of the last stage, with its attention-pool
  position embedding, through the pool's value and output projections (what the
  attention pool averages to make the frame embedding).

Both come out of the *same* forward pass as the frame embedding, so ingest pays for
them once, and they are fixed by the frame tower: a new scorer or head re-indexes
from the stored tokens; only a new frame tower (or another grid/width) re-decodes.

Narrowing to ``width`` uses a fixed orthonormal projection seeded from the width and
the embedding size (no learned parameters), so the same spec always gives the same
tokens, whatever model version computed them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

REGION_SEED = 20261207


def region_projection(embed_dim: int, width: int) -> torch.Tensor | None:
    """A fixed [embed_dim, width] orthonormal-column projection, or None when width == embed_dim."""
    if width == embed_dim:
        return None
    if not 0 < width < embed_dim:
        raise ValueError(f"region width {width} must be in 1..{embed_dim}")
    gen = torch.Generator().manual_seed(REGION_SEED + 7919 * embed_dim + width)
    q, _ = torch.linalg.qr(torch.randn(embed_dim, width, generator=gen))
    return q.contiguous()


def _vit_maps(visual: nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    previous = visual.output_tokens
    visual.output_tokens = True
    try:
        pooled, tokens = visual(pixels)
    finally:
        visual.output_tokens = previous
    if visual.proj is not None:
        tokens = tokens @ visual.proj
    side = int(round(tokens.shape[1] ** 0.5))
    if side * side != tokens.shape[1]:
        raise ValueError(f"patch tokens {tokens.shape[1]} do not form a square grid")
    return pooled, tokens.reshape(tokens.shape[0], side, side, -1)


def _resnet_maps(visual: nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = visual.stem(pixels.to(visual.conv1.weight.dtype))
    x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))
    pool = visual.attnpool
    pooled = pool(x)
    n, c, h, w = x.shape
    cells = x.reshape(n, c, h * w).permute(0, 2, 1) + pool.positional_embedding[1:].to(x.dtype)
    dense = pool.c_proj(pool.v_proj(cells))
    return pooled, dense.reshape(n, h, w, -1)


def frames_and_maps(visual: nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """pixels[N,3,S,S] -> (frame embeddings [N,D], spatial map [N,h,w,D]), one forward pass."""
    if hasattr(visual, "attnpool") and hasattr(visual, "layer4"):
        return _resnet_maps(visual, pixels)
    if hasattr(visual, "output_tokens") and hasattr(visual, "ln_post"):
        return _vit_maps(visual, pixels)
    raise ValueError(f"region tokens need an open_clip VisionTransformer or ModifiedResNet tower, "
                     f"not {type(visual).__name__}")


def pool_regions(maps: torch.Tensor, grid: int, projection: torch.Tensor | None) -> torch.Tensor:
    """spatial map [N,h,w,D] -> L2-normalised region tokens [N, grid*grid, W] (row-major cells)."""
    n, h, w, d = maps.shape
    if grid > min(h, w):
        raise ValueError(f"region grid {grid} is finer than the tower's {h}x{w} spatial map")
    cells = F.adaptive_avg_pool2d(maps.permute(0, 3, 1, 2).float(), grid)  # [N,D,g,g]
    cells = cells.flatten(2).transpose(1, 2)  # [N,g*g,D]
    if projection is not None:
        cells = cells @ projection.to(cells.device)
    return F.normalize(cells, dim=-1)
