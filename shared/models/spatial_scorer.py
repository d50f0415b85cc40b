"""The spatial cross-encoder: the slow model with its own view of the pixels.

Thinking Fast and Slow's point is that the slow model attends from the words to
detail that a single vector per frame cannot carry. A cross-encoder over the
student's own pooled frame vectors cannot know more than the student (measured on
this project: teacher and student within 0.2 R@1). This one reads, per frame, the
frame vector *and* a ``grid x grid`` of region tokens (``regions.py``), so where a
shape is, and where it is a frame later, is in its input: which way it moved,
whether it grew, what sits on the left.

One joint transformer over ``[CLS] + text tokens + a video token + frame tokens + region
tokens``; every token has a type embedding, frame tokens and region tokens share the
frame's position embedding, and region tokens add the cell's embedding. The slow model
sees everything the fast one does, and more: the video token is the student's own video
embedding, and the CLS input carries the student's cosine with the sentence as a
feature (a learned direction scaled by it). The score is a linear read-out of the CLS
output, standing on its own (not a residual on any cosine): it starts at 0 for every
pair, and training decides how much of the student's view and how much of the regions
it uses. (Trained from scratch without the student's view, the same scorer reached val
R@1 67.5 against the student's 82.3 in the shipped training budget: a joint encoder
learns a good sentence-video similarity far more slowly than it learns to correct one.)

Frame relevance (the best moment, and the distillation target of the student's
frame weights) is a softmax over valid frames of ``cos(frame, sentence)`` plus a
learned, zero-initialised read-out of each frame token: untrained it is TeachCLIP's
raw-cosine softmax (no sharpening temperature), and the moment loss teaches the
read-out where an event is.

Two optional inputs (``scorer.motion_tokens``, ``scorer.word_tokens``): a *motion token*
per frame, its region tokens minus the previous frame's (layer-normed, so the change
rather than the content is what it carries), and each text token's word embedding beside
its contextual feature. Both exist because of a measurement (docs/benchmarks/fast-slow.md,
run 4): the region tokens of an event's first and last frame give its direction to a
linear probe at 99%, yet the joint transformer trained on them stayed at chance on
direction twins, and the text reached it with "moves left" and "moves right" at cosine
0.999. A motion token puts direction one linear read-out away; the word embeddings keep
the words apart that the trained text transformer merged.

Precision as in ``scorers.py``: the joint transformer follows the caller's autocast,
the cosines and read-outs run in fp32.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .masking import masked_softmax, positions, zero_padding
from .scorers import (MAX_LOGIT_SCALE, _check_frame_count, _full_precision, _prepare_frames, joint_encoder,
                      zero_read_out)
from .text import TextFeatures

# The score is unbounded, so the temperature only sets where training starts: at 20,
# a read-out spread of +-0.25 already gives InfoNCE logits of +-5.
_INIT_LOGIT_SCALE = math.log(20.0)


def _zero_linear(width_in: int, width_out: int) -> nn.Linear:
    layer = nn.Linear(width_in, width_out)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


class SpatialCrossScorer(nn.Module):
    def __init__(self, embed_dim: int, region_width: int, cells: int, width: int, layers: int, heads: int,
                 max_text: int, max_frames: int, *, motion_tokens: bool = False,
                 word_width: int | None = None) -> None:
        super().__init__()
        self.max_text, self.max_frames, self.cells = max_text, max_frames, cells
        self.region_width = region_width
        self.text_proj = nn.Linear(embed_dim, width)
        self.frame_proj = nn.Linear(embed_dim, width)
        self.region_proj = nn.Linear(region_width, width)
        self.video_proj = nn.Linear(embed_dim, width)
        self.student_feature = nn.Parameter(torch.randn(width) * 0.02)
        self.type_embedding = nn.Embedding(4, width)
        self.text_position = nn.Embedding(max_text, width)
        self.frame_position = nn.Embedding(max_frames, width)
        self.cell_position = nn.Embedding(cells, width)
        for emb in (self.type_embedding, self.text_position, self.frame_position, self.cell_position):
            nn.init.normal_(emb.weight, std=0.02)
        # Separate modules, not new rows of type_embedding: versions published without them
        # load unchanged.
        self.motion_norm = nn.LayerNorm(cells * region_width) if motion_tokens else None
        self.motion_proj = nn.Linear(cells * region_width, width) if motion_tokens else None
        self.motion_type = nn.Parameter(torch.randn(width) * 0.02) if motion_tokens else None
        self.word_proj = nn.Linear(word_width, width) if word_width else None
        # The motion match: a late-interaction term beside the joint transformer, each word
        # against its best-matching frame change (X-CLIP's word-frame max, on motion tokens).
        # Measured: the joint transformer alone, handed motion tokens, fitted only 65% of its
        # own direction-twin training pairs in 300 steps. The key starts at zero, so an
        # untrained scorer still scores 0.
        self.motion_query = nn.Linear(word_width or embed_dim, width) if motion_tokens else None
        self.motion_key = _zero_linear(cells * region_width, width) if motion_tokens else None
        self.cls = nn.Parameter(torch.randn(width) * 0.02)
        self.encoder = joint_encoder(width, layers, heads)
        self.score_head, self.relevance_head = zero_read_out(width), zero_read_out(width)
        self.logit_scale = nn.Parameter(torch.tensor(_INIT_LOGIT_SCALE))

    @torch.no_grad()
    def clamp_temperatures_(self) -> None:
        self.logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)

    def _check_regions(self, regions: torch.Tensor | None, frames: torch.Tensor) -> torch.Tensor:
        if regions is None:
            raise ValueError("the spatial scorer needs region tokens (regions[B,T,G,W]); this index or "
                             "feature set has none: re-index it with this model version")
        b, t = frames.shape[:2]
        want = (b, t, self.cells, self.region_width)
        if tuple(regions.shape) != want:
            raise ValueError(f"regions: expected shape {want}, got {tuple(regions.shape)}")
        return regions

    @staticmethod
    def _motion(regions: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """regions[B,T,G,W] (normalised, zero on padding) -> (change since the previous frame
        [B,T,G*W], valid[B,T]): frame t's token is valid when t and t-1 both are; frame 0's never."""
        flat = regions.flatten(2)
        change = torch.zeros_like(flat)
        change[:, 1:] = flat[:, 1:] - flat[:, :-1]
        moved = torch.zeros_like(mask)
        moved[:, 1:] = mask[:, 1:] & mask[:, :-1]
        return change * moved[..., None], moved

    def _motion_match(self, text: TextFeatures, tokens: torch.Tensor, motion: torch.Tensor,
                      moved: torch.Tensor) -> torch.Tensor:
        """[B]: the mean over real words of each word's best dot product with a frame's change
        (frames without a change excluded); words are the word embeddings when the scorer has
        them, else the contextual tokens."""
        with _full_precision(motion):
            words = tokens if text.words is None or self.word_proj is None else text.words.float()
            query = self.motion_query(zero_padding(words.float(), text.mask))  # [B,L,W]
            key = self.motion_key(motion.float())  # [B,T,W]
            sims = torch.einsum("blw,btw->blt", query, key).masked_fill(~moved[:, None, :], float("-inf"))
            best = sims.max(dim=-1).values  # [B,L]
            best = torch.where(torch.isfinite(best) & text.mask, best, torch.zeros_like(best))
            return best.sum(dim=1) / text.mask.sum(dim=1).clamp(min=1)

    def forward(self, text: TextFeatures, frames: torch.Tensor, mask: torch.Tensor,
                regions: torch.Tensor | None = None,
                video: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``video``[B,D]: the student's L2-normalised video embeddings of these videos."""
        regions = self._check_regions(regions, frames)
        if video is None or tuple(video.shape) != (frames.shape[0], frames.shape[2]):
            raise ValueError(f"the spatial scorer needs the student's video embeddings [B,D] "
                             f"(got {None if video is None else tuple(video.shape)})")
        batch, length = text.mask.shape
        num_frames, cells = frames.shape[1], self.cells
        if length > self.max_text:
            raise ValueError(f"{length} text tokens exceed the scorer's limit of {self.max_text}")
        _check_frame_count(mask, self.max_frames)
        with _full_precision(frames):
            f = _prepare_frames(frames, mask)
            sentence = text.sentence.float()
            frame_sentence = torch.einsum("btd,bd->bt", f, sentence)
            r = zero_padding(F.normalize(regions.float(), dim=-1), mask)
            student_video = F.normalize(video.float(), dim=-1)
            student_score = (student_video * sentence).sum(dim=-1)  # [B]

        types = self.type_embedding.weight
        frame_pos = self.frame_position(positions(mask))  # [B,T,W]
        words = zero_padding(text.tokens.float(), text.mask)
        t = self.text_proj(words) + types[0] + self.text_position.weight[:length]
        if self.word_proj is not None:
            if text.words is None:
                raise ValueError("the scorer reads word embeddings (scorer.word_tokens): encode the text with "
                                 "the model's own scorer text tower, not from another service's rows")
            t = t + self.word_proj(zero_padding(text.words.float(), text.mask))
        v = self.frame_proj(f) + types[1] + frame_pos
        g = (self.region_proj(r) + types[2] + frame_pos[:, :, None, :]
             + self.cell_position.weight[None, None]).flatten(1, 2)  # [B,T*G,W]
        cls = (self.cls + student_score[:, None] * self.student_feature).to(t.dtype)[:, None, :]
        u = (self.video_proj(student_video) + types[3])[:, None, :]
        parts = [cls, t, u.to(t.dtype), v.to(t.dtype), g.to(t.dtype)]
        region_mask = mask[:, :, None].expand(-1, -1, cells).flatten(1, 2)
        ones = mask.new_ones(batch, 1)
        masks = [ones, text.mask, ones, mask, region_mask]
        motion_match = None
        if self.motion_proj is not None:
            motion, moved = self._motion(r, mask)
            normed = self.motion_norm(motion)
            parts.append((self.motion_proj(normed) + self.motion_type + frame_pos).to(t.dtype))
            masks.append(moved)
            motion_match = self._motion_match(text, words, normed, moved)
        sequence = torch.cat(parts, dim=1)
        valid = torch.cat(masks, dim=1)
        h = self.encoder(sequence, src_key_padding_mask=~valid)

        with _full_precision(frames):
            h = h.float()
            score = self.score_head(h[:, 0]).squeeze(-1)
            if motion_match is not None:
                score = score + motion_match
            frame_out = h[:, 2 + length:2 + length + num_frames]
            logits = frame_sentence + self.relevance_head(frame_out).squeeze(-1)
            return score, masked_softmax(logits, mask)
