"""Slow scorers: (text, frames) pairs -> (score[B], frame_relevance[B,T]).

Both scorers take aligned pairs (text b with video b): ``TextFeatures`` (token and
sentence features) and frame embeddings ``frames[B,T,D]`` with ``mask[B,T]``. They
serve as the re-ranker and as the TeachCLIP teacher.

Frame relevance is, for both, a probability distribution over the valid frames
(softmax, exactly 0 on padding, sums to 1): TeachCLIP's fine-grained loss takes it
as the target of the student's AFA weights, and its argmax is the "best moment".

Both start out as the plain CLIP similarity: learned parts are residuals whose last
layer is zero-initialised (cross) or identity projections (xclip), so an untrained
scorer re-ranks with meaningful scores instead of noise, and training refines it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ScorerConfig
from .masking import masked_mean, masked_softmax, positions, zero_padding
from .temporal import check_heads
from .text import TextFeatures

_INIT_LOGIT_SCALE = math.log(100.0)  # CLIP's trained temperature, 1 / 0.01


def _prepare_frames(frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return zero_padding(F.normalize(zero_padding(frames, mask), dim=-1), mask)


class CrossEncoderScorer(nn.Module):
    """CLIP4Clip's "tight" cross-encoder.

    Text token features and frame features are projected to one width, given type
    embeddings (text / video) and position embeddings, concatenated after a learned
    [CLS] token and encoded jointly by a transformer with a key-padding mask.
    score = cos(sentence, meanP video) + Linear(CLS output);
    relevance = softmax over valid frames of (scale * cos(frame, sentence) + Linear(frame token outputs)).
    Both linears start at zero (see module docstring).
    """

    def __init__(self, embed_dim: int, width: int, layers: int, heads: int,
                 max_text: int, max_frames: int) -> None:
        super().__init__()
        self.max_text, self.max_frames = max_text, max_frames
        self.text_proj = nn.Linear(embed_dim, width)
        self.frame_proj = nn.Linear(embed_dim, width)
        self.type_embedding = nn.Embedding(2, width)
        self.text_position = nn.Embedding(max_text, width)
        self.frame_position = nn.Embedding(max_frames, width)
        for emb in (self.type_embedding, self.text_position, self.frame_position):
            nn.init.normal_(emb.weight, std=0.01)
        self.cls = nn.Parameter(torch.randn(width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=4 * width, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(width), enable_nested_tensor=False)
        self.score_head = nn.Linear(width, 1)
        self.relevance_head = nn.Linear(width, 1)
        for head in (self.score_head, self.relevance_head):
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        self.logit_scale = nn.Parameter(torch.tensor(_INIT_LOGIT_SCALE))

    def forward(self, text: TextFeatures, frames: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch, length = text.mask.shape
        num_frames = frames.shape[1]
        if length > self.max_text:
            raise ValueError(f"{length} text tokens exceed the scorer's limit of {self.max_text}")
        if int(mask.sum(dim=1).max()) > self.max_frames:
            raise ValueError(f"more valid frames than the scorer's max_frames={self.max_frames}")
        f = _prepare_frames(frames, mask)
        sentence = text.sentence.to(f.dtype)
        video = F.normalize(masked_mean(f, mask), dim=-1)
        base_score = (video * sentence).sum(dim=-1)
        frame_sentence = torch.einsum("btd,bd->bt", f, sentence)

        words = zero_padding(text.tokens.to(f.dtype), text.mask)
        t = self.text_proj(words) + self.type_embedding.weight[0] + self.text_position.weight[:length]
        v = self.frame_proj(f) + self.type_embedding.weight[1] + self.frame_position(positions(mask))
        cls = self.cls.to(t.dtype).expand(batch, 1, -1)
        sequence = torch.cat([cls, t, v.to(t.dtype)], dim=1)
        valid = torch.cat([mask.new_ones(batch, 1), text.mask, mask], dim=1)
        h = self.encoder(sequence, src_key_padding_mask=~valid)

        score = base_score.float() + self.score_head(h[:, 0]).squeeze(-1).float()
        frame_out = h[:, 1 + length:1 + length + num_frames]
        logits = self.logit_scale.exp().clamp(max=100.0) * frame_sentence.float() \
            + self.relevance_head(frame_out).squeeze(-1).float()
        return score, masked_softmax(logits, mask)


def _attend(sims: torch.Tensor, mask: torch.Tensor, scale: torch.Tensor, dim: int) -> torch.Tensor:
    """X-CLIP's attention over a similarity matrix: softmax(scale * s)-weighted sum of s along dim."""
    mask = mask.expand_as(sims)
    weights = masked_softmax(scale * sims, mask, dim=dim)
    return (weights * sims.float().masked_fill(~mask, 0.0)).sum(dim=dim)


class XClipScorer(nn.Module):
    """X-CLIP multi-grained contrast: the mean of video-sentence, video-word,
    frame-sentence and frame-word similarities, each fine-grained one reduced with
    softmax attention over its similarity matrix (frame-word in both directions).
    Frame relevance = softmax over valid frames of the frame-sentence similarities.
    """

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.word_proj = nn.Linear(embed_dim, embed_dim)
        self.frame_proj = nn.Linear(embed_dim, embed_dim)
        for proj in (self.word_proj, self.frame_proj):
            nn.init.eye_(proj.weight)
            nn.init.zeros_(proj.bias)
        # temperatures for: video-word, frame-sentence, frame-word (per frame), frame-word (per word)
        self.logit_scales = nn.Parameter(torch.full((4,), _INIT_LOGIT_SCALE))

    def forward(self, text: TextFeatures, frames: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = _prepare_frames(frames, mask)
        f = zero_padding(F.normalize(self.frame_proj(f), dim=-1), mask)
        words = zero_padding(text.tokens.to(f.dtype), text.mask)
        w = zero_padding(F.normalize(self.word_proj(words), dim=-1), text.mask)
        s = text.sentence.to(f.dtype)
        v = F.normalize(masked_mean(f, mask), dim=-1)
        scales = self.logit_scales.exp().clamp(max=100.0)
        word_mask, frame_mask = text.mask, mask

        video_sentence = (v * s).sum(dim=-1).float()
        video_word = _attend(torch.einsum("bd,bld->bl", v, w), word_mask, scales[0], dim=1)
        frame_sentence_sims = torch.einsum("btd,bd->bt", f, s)
        frame_sentence = _attend(frame_sentence_sims, frame_mask, scales[1], dim=1)
        matrix = torch.einsum("btd,bld->btl", f, w)
        per_frame = _attend(matrix, word_mask[:, None, :], scales[2], dim=2)
        per_word = _attend(matrix, frame_mask[:, :, None], scales[3], dim=1)
        frame_word = 0.5 * (_attend(per_frame, frame_mask, scales[2], dim=1)
                            + _attend(per_word, word_mask, scales[3], dim=1))

        score = (video_sentence + video_word + frame_sentence + frame_word) / 4.0
        relevance = masked_softmax(scales[1] * frame_sentence_sims.float(), frame_mask)
        return score, relevance


def build_scorer(config: ScorerConfig, embed_dim: int, max_text: int) -> nn.Module:
    if config.kind == "cross":
        width = config.width or embed_dim
        check_heads("scorer.heads", width, config.heads)
        return CrossEncoderScorer(embed_dim, width, config.layers, config.heads, max_text, config.max_frames)
    if config.kind == "xclip":
        return XClipScorer(embed_dim)
    raise ValueError(f"scorer.kind: unknown kind {config.kind!r}")
