"""Fast video heads: frame embeddings [B,T,D] + mask [B,T] -> one video embedding [B,D].

Every head returns ``(video, weights)``: the L2-normalised video embedding and the
per-frame weights it used (uniform over valid frames for the pooling heads, the
learned attention for AFA), so callers and the distillation loss see one API.
Frames are L2-normalised on entry (CLIP4Clip normalises before pooling) and padded
frames are zeroed before any arithmetic, which makes padding exact.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import HeadConfig
from .masking import masked_mean, masked_softmax, uniform_weights, zero_padding
from .temporal import TemporalTransformer, check_heads


def _prepare(frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return zero_padding(F.normalize(zero_padding(frames, mask), dim=-1), mask)


class MeanPoolHead(nn.Module):
    """CLIP4Clip meanP: mean of normalised frames over valid frames, normalised."""

    def forward(self, frames: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = _prepare(frames, mask)
        return F.normalize(masked_mean(x, mask), dim=-1), uniform_weights(mask)


class SeqTransfHead(nn.Module):
    """CLIP4Clip seqTransf: temporal transformer + residual, then masked mean."""

    def __init__(self, dim: int, layers: int, heads: int, max_frames: int) -> None:
        super().__init__()
        self.temporal = TemporalTransformer(dim, layers, heads, max_frames)

    def forward(self, frames: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.temporal(_prepare(frames, mask), mask)
        x = zero_padding(F.normalize(x, dim=-1), mask)
        return F.normalize(masked_mean(x, mask), dim=-1), uniform_weights(mask)


class SeqLSTMHead(nn.Module):
    """CLIP4Clip seqLSTM: an LSTM over the valid frames + residual, then masked mean.

    Valid frames are moved to the front (stable, so their order is kept) and packed,
    so the LSTM never reads padding whatever the mask pattern. The residual branch
    goes through a zero-initialised projection, so an untrained head equals meanP.
    """

    def __init__(self, dim: int, layers: int) -> None:
        super().__init__()
        self.lstm = nn.LSTM(dim, dim, num_layers=layers, batch_first=True)
        self.out = nn.Linear(dim, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, frames: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = _prepare(frames, mask)
        order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices
        x = torch.gather(x, 1, order.unsqueeze(-1).expand_as(x))
        lengths = mask.sum(dim=1)
        packed_mask = torch.arange(mask.shape[1], device=mask.device)[None, :] < lengths[:, None]
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.lstm(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        y = zero_padding(F.normalize(x + self.out(out.to(x.dtype)), dim=-1), packed_mask)
        return F.normalize(masked_mean(y, packed_mask), dim=-1), uniform_weights(mask)


class AFAHead(nn.Module):
    """TeachCLIP attentional frame aggregation.

    Optionally a temporal transformer first (``layers`` > 0, TeachCLIP's student),
    then text-agnostic per-frame logits w from a small MLP; the video is the sum of
    the frames weighted by softmax(w / temperature) over valid frames, normalised,
    and the returned weights are softmax(w) (what FgT distils and the best-moment
    fallback reads; same argmax). The MLP's last layer is
    zero-initialised: untrained weights are uniform, i.e. the head starts as meanP.
    """

    def __init__(self, dim: int, layers: int, heads: int, max_frames: int, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = float(temperature)
        self.temporal = TemporalTransformer(dim, layers, heads, max_frames) if layers > 0 else None
        self.weight_mlp = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, 1))
        nn.init.zeros_(self.weight_mlp[2].weight)
        nn.init.zeros_(self.weight_mlp[2].bias)

    def forward(self, frames: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = _prepare(frames, mask)
        if self.temporal is not None:
            x = self.temporal(x, mask)
        x = zero_padding(F.normalize(x, dim=-1), mask)
        logits = self.weight_mlp(x).squeeze(-1).float()
        weights = masked_softmax(logits, mask)
        pooling = weights if self.temperature == 1.0 else masked_softmax(logits / self.temperature, mask)
        video = (pooling.unsqueeze(-1) * x.float()).sum(dim=1)
        return F.normalize(video, dim=-1), weights


def build_head(config: HeadConfig, embed_dim: int) -> nn.Module:
    if config.kind == "meanP":
        return MeanPoolHead()
    if config.kind == "seqLSTM":
        return SeqLSTMHead(embed_dim, config.layers)
    if config.kind in ("seqTransf", "afa") and (config.kind == "seqTransf" or config.layers > 0):
        check_heads("head.heads", embed_dim, config.heads)
    if config.kind == "seqTransf":
        return SeqTransfHead(embed_dim, config.layers, config.heads, config.max_frames)
    if config.kind == "afa":
        return AFAHead(embed_dim, config.layers, config.heads, config.max_frames, config.temperature)
    raise ValueError(f"head.kind: unknown kind {config.kind!r}")
