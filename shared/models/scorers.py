"""Slow scorers: (text, frames) pairs -> (score[B], frame_relevance[B,T]).

Both scorers take aligned pairs (text b with video b): ``TextFeatures`` (token and
sentence features) and frame embeddings ``frames[B,T,D]`` with ``mask[B,T]``. They
serve as the re-ranker and as the TeachCLIP teacher.

Frame relevance is, for both, a probability distribution over the valid frames
(softmax, exactly 0 on padding, sums to 1): TeachCLIP's fine-grained loss takes it
as the target of the student's AFA weights, and its argmax is the "best moment".

Both start out as the plain CLIP similarity: learned parts are residuals whose last
layer is zero-initialised (the cross-encoder's heads, X-CLIP's temporal transformer)
or identity projections (X-CLIP's word/frame projections), so an untrained scorer
re-ranks with meaningful scores instead of noise, and training refines it. X-CLIP's
temporal transformer (with frame position embeddings) is what lets it see frame
order; the untrained one is exactly the identity, so it starts order-agnostic.

Precision: similarities, the temperature-scaled relevance logits and the final
linears always run in fp32, also under the caller's bf16 autocast. Cosines of
normalised vectors are multiplied by temperatures up to 100, and bf16 keeps ~3
significant digits, so bf16 similarities would reorder close candidates and move
the best frame. Only the cross-encoder's joint transformer (the expensive part,
which enters the outputs through the zero-initialised heads) follows the caller's
autocast.

Temperatures are learned log-scales, exponentiated without a clamp so they always
get a gradient (open_clip's recipe); a training loop calls ``clamp_temperatures_()``
on the scorer after every optimizer step to keep them in CLIP's range [1, 100].
"""
from __future__ import annotations

import math
from typing import ContextManager

import torch
import torch.nn.functional as F
from torch import nn

from .config import ScorerConfig
from .masking import masked_mean, masked_softmax, positions, zero_padding
from .temporal import TemporalTransformer, check_heads
from .text import TextFeatures

# CLIP's bound on its learned temperature: logit scale at most 100 (temperature 0.01).
MAX_LOGIT_SCALE = math.log(100.0)
# Start at CLIP's trained temperature. This is exactly the bound, which is harmless:
# the bound is enforced by clamp_temperatures_() between steps, never inside the
# graph, so the gradient at the bound is the true one.
_INIT_LOGIT_SCALE = MAX_LOGIT_SCALE


def _full_precision(x: torch.Tensor) -> ContextManager:
    """Switch off the caller's autocast for the block: the maths inside runs in the
    dtype of its inputs, which the scorers cast to fp32."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def _prepare_frames(frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return zero_padding(F.normalize(zero_padding(frames.float(), mask), dim=-1), mask)


def _check_frame_count(mask: torch.Tensor, max_frames: int) -> None:
    if int(mask.sum(dim=1).max()) > max_frames:
        raise ValueError(f"more valid frames than the scorer's max_frames={max_frames}")


def joint_encoder(width: int, layers: int, heads: int) -> nn.TransformerEncoder:
    """The cross-encoders' joint transformer: pre-norm, GELU, no dropout, a final LayerNorm.
    Nested tensors would drop padded rows and make outputs depend on the batch layout."""
    layer = nn.TransformerEncoderLayer(width, heads, dim_feedforward=4 * width, dropout=0.0,
                                       activation="gelu", batch_first=True, norm_first=True)
    return nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(width), enable_nested_tensor=False)


def zero_read_out(width: int) -> nn.Linear:
    """A width -> 1 read-out that starts at exactly 0 (see the module docstring)."""
    head = nn.Linear(width, 1)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


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
        self.encoder = joint_encoder(width, layers, heads)
        self.score_head, self.relevance_head = zero_read_out(width), zero_read_out(width)
        self.logit_scale = nn.Parameter(torch.tensor(_INIT_LOGIT_SCALE))

    @torch.no_grad()
    def clamp_temperatures_(self) -> None:
        """Clamp the learned log-scale to [0, log 100] in place; call after each optimizer step."""
        self.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)

    def forward(self, text: TextFeatures, frames: torch.Tensor, mask: torch.Tensor,
                video: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``video``: the dual encoder's L2-normalised video embeddings [B,D]; when given, the
        score is a residual on cos(sentence, video) instead of on the mean frame."""
        batch, length = text.mask.shape
        num_frames = frames.shape[1]
        if length > self.max_text:
            raise ValueError(f"{length} text tokens exceed the scorer's limit of {self.max_text}")
        _check_frame_count(mask, self.max_frames)
        with _full_precision(frames):
            f = _prepare_frames(frames, mask)
            sentence = text.sentence.float()
            pooled = F.normalize(masked_mean(f, mask), dim=-1) if video is None else video.float()
            base_score = (pooled * sentence).sum(dim=-1)
            frame_sentence = torch.einsum("btd,bd->bt", f, sentence)

        # The joint encoder is the expensive part and only feeds the zero-initialised
        # heads, so it follows the caller's autocast.
        words = zero_padding(text.tokens.float(), text.mask)
        t = self.text_proj(words) + self.type_embedding.weight[0] + self.text_position.weight[:length]
        v = self.frame_proj(f) + self.type_embedding.weight[1] + self.frame_position(positions(mask))
        cls = self.cls.to(t.dtype).expand(batch, 1, -1)
        sequence = torch.cat([cls, t, v.to(t.dtype)], dim=1)
        valid = torch.cat([mask.new_ones(batch, 1), text.mask, mask], dim=1)
        h = self.encoder(sequence, src_key_padding_mask=~valid)

        with _full_precision(frames):
            h = h.float()
            score = base_score + self.score_head(h[:, 0]).squeeze(-1)
            frame_out = h[:, 1 + length:1 + length + num_frames]
            logits = self.logit_scale.exp() * frame_sentence + self.relevance_head(frame_out).squeeze(-1)
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

    As in published X-CLIP, the frames first go through a temporal transformer with
    frame position embeddings and a residual (``TemporalTransformer``, whose output
    projection is zero-initialised), so frame features, and with them the score,
    depend on frame order once it is trained.

    The whole forward runs in fp32: here the temporal transformer's output *is* the
    frame feature every similarity is taken of, so it cannot be left in bf16, and it
    is small (T tokens of width D per pair).
    """

    def __init__(self, embed_dim: int, layers: int, heads: int, max_frames: int) -> None:
        super().__init__()
        self.max_frames = max_frames
        self.temporal = TemporalTransformer(embed_dim, layers, heads, max_frames)
        self.word_proj = nn.Linear(embed_dim, embed_dim)
        self.frame_proj = nn.Linear(embed_dim, embed_dim)
        for proj in (self.word_proj, self.frame_proj):
            nn.init.eye_(proj.weight)
            nn.init.zeros_(proj.bias)
        # temperatures for: video-word, frame-sentence, frame-word (per frame), frame-word (per word)
        self.logit_scales = nn.Parameter(torch.full((4,), _INIT_LOGIT_SCALE))

    @torch.no_grad()
    def clamp_temperatures_(self) -> None:
        """Clamp the learned log-scales to [0, log 100] in place; call after each optimizer step."""
        self.logit_scales.clamp_(0.0, MAX_LOGIT_SCALE)

    def forward(self, text: TextFeatures, frames: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _check_frame_count(mask, self.max_frames)
        with _full_precision(frames):
            f = self.temporal(_prepare_frames(frames, mask), mask)
            f = zero_padding(F.normalize(self.frame_proj(f), dim=-1), mask)
            words = zero_padding(text.tokens.float(), text.mask)
            w = zero_padding(F.normalize(self.word_proj(words), dim=-1), text.mask)
            s = text.sentence.float()
            v = F.normalize(masked_mean(f, mask), dim=-1)
            scales = self.logit_scales.exp()
            word_mask, frame_mask = text.mask, mask

            video_sentence = (v * s).sum(dim=-1)
            video_word = _attend(torch.einsum("bd,bld->bl", v, w), word_mask, scales[0], dim=1)
            frame_sentence_sims = torch.einsum("btd,bd->bt", f, s)
            frame_sentence = _attend(frame_sentence_sims, frame_mask, scales[1], dim=1)
            matrix = torch.einsum("btd,bld->btl", f, w)
            per_frame = _attend(matrix, word_mask[:, None, :], scales[2], dim=2)
            per_word = _attend(matrix, frame_mask[:, :, None], scales[3], dim=1)
            frame_word = 0.5 * (_attend(per_frame, frame_mask, scales[2], dim=1)
                                + _attend(per_word, word_mask, scales[3], dim=1))

            score = (video_sentence + video_word + frame_sentence + frame_word) / 4.0
            relevance = masked_softmax(scales[1] * frame_sentence_sims, frame_mask)
            return score, relevance


def build_scorer(config: ScorerConfig, embed_dim: int, max_text: int, word_width: int | None = None) -> nn.Module:
    """``word_width``: the text tower's token-embedding width (read by ``word_tokens``)."""
    if config.kind == "cross":
        width = config.width or embed_dim
        check_heads("scorer.heads", width, config.heads)
        return CrossEncoderScorer(embed_dim, width, config.layers, config.heads, max_text, config.max_frames)
    if config.kind == "xclip":
        check_heads("scorer.heads", embed_dim, config.heads)
        return XClipScorer(embed_dim, config.layers, config.heads, config.max_frames)
    if config.kind == "spatial":
        from .spatial_scorer import SpatialCrossScorer

        width = config.width or embed_dim
        check_heads("scorer.heads", width, config.heads)
        return SpatialCrossScorer(embed_dim, config.region_width or embed_dim, config.grid * config.grid, width,
                                  config.layers, config.heads, max_text, config.max_frames,
                                  motion_tokens=config.motion_tokens, word_width=word_width if config.word_tokens else None)
    raise ValueError(f"scorer.kind: unknown kind {config.kind!r}")
