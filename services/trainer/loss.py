"""The training losses: InfoNCE (CLIP4Clip), TeachCLIP's CgT and FgT, and the moment loss.

All take fp32 logits or probabilities; masks mark valid frames. Each is small
enough to check against a hand computation (tests/test_trainer_losses.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

_EPS = 1e-8


def infonce_logits(logits: torch.Tensor, video_extra: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE of a square [B,B] (text x video) logit matrix whose diagonal holds the pairs.

    ``video_extra[B,E]``: logits of each video against E extra *negative* captions
    (counterfactual captions), appended to the video->text direction only; -inf
    marks a caption that is not a negative for that video.
    """
    if logits.dim() != 2 or logits.shape[0] != logits.shape[1]:
        raise ValueError(f"logits must be square [B,B], got {tuple(logits.shape)}")
    if video_extra is not None and (video_extra.dim() != 2 or video_extra.shape[0] != logits.shape[0]):
        raise ValueError(f"video_extra must be [B,E] with B={logits.shape[0]}, got {tuple(video_extra.shape)}")
    target = torch.arange(logits.shape[0], device=logits.device)
    logits = logits.float()
    per_video = logits.T if video_extra is None else torch.cat([logits.T, video_extra.float()], dim=1)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(per_video, target))


def symmetric_infonce(text: torch.Tensor, video: torch.Tensor, logit_scale: torch.Tensor,
                      negatives: torch.Tensor | None = None, negative_mask: torch.Tensor | None = None) -> torch.Tensor:
    """InfoNCE of L2-normalised text[B,D] and video[B,D]; ``logit_scale`` is log(1/temperature).

    ``negatives[E,D]``: extra negative captions for every video, except where
    ``negative_mask[B,E]`` is False (a caption that does describe that video)."""
    if text.shape != video.shape or text.dim() != 2:
        raise ValueError(f"text {tuple(text.shape)} and video {tuple(video.shape)} must both be [B,D]")
    scale = logit_scale.exp()
    extra = None
    if negatives is not None and negatives.shape[0] > 0:
        extra = scale * (video.float() @ negatives.float().T)
        if negative_mask is not None:
            extra = extra.masked_fill(~negative_mask, float("-inf"))
    return infonce_logits(scale * (text.float() @ video.float().T), extra)


def phrase_infonce(text: torch.Tensor, video: torch.Tensor, logit_scale: torch.Tensor,
                   interchangeable: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of P event phrases (text[P,D]) against the frames of their events
    (video[P,D]), both L2-normalised. ``interchangeable[P,P]`` marks pairs whose phrases say
    the same thing (two "small red circle moves left" events of different videos): those are
    no negatives of each other and are left out; the diagonal is always the positive."""
    if text.shape != video.shape or text.dim() != 2:
        raise ValueError(f"text {tuple(text.shape)} and video {tuple(video.shape)} must both be [P,D]")
    if interchangeable.shape != (text.shape[0], text.shape[0]):
        raise ValueError(f"interchangeable must be [P,P] with P={text.shape[0]}, got {tuple(interchangeable.shape)}")
    logits = logit_scale.exp() * (text.float() @ video.float().T)
    off_diagonal = interchangeable & ~torch.eye(text.shape[0], dtype=torch.bool, device=interchangeable.device)
    return infonce_logits(logits.masked_fill(off_diagonal.to(logits.device), float("-inf")))


def _pearson_distance(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Mean over rows of 1 - Pearson correlation between rows of p and q."""
    p = p - p.mean(dim=-1, keepdim=True)
    q = q - q.mean(dim=-1, keepdim=True)
    corr = (p * q).sum(-1) / (p.norm(dim=-1) * q.norm(dim=-1) + _EPS)
    return (1.0 - corr).mean()


def cgt_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """TeachCLIP coarse-grained teaching: the Pearson distance between the softmax rows (text->video)
    of the student's and the teacher's [B,B] logits, *plus* the same for the columns (video->text),
    as the reference sums the two directions. The teacher is a target: no gradient flows into it."""
    teacher = teacher.detach().float()
    student = student.float()
    rows = _pearson_distance(F.softmax(student / temperature, dim=1), F.softmax(teacher / temperature, dim=1))
    cols = _pearson_distance(F.softmax(student.T / temperature, dim=1), F.softmax(teacher.T / temperature, dim=1))
    return rows + cols


def sharpen(relevance: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(log(relevance) / temperature) over valid frames: the FgT target at a temperature
    (1.0 keeps the teacher's own distribution)."""
    if temperature == 1.0:
        return relevance.float().masked_fill(~mask, 0.0)
    logits = torch.log(relevance.float().clamp_min(_EPS)) / temperature
    logits = logits.masked_fill(~mask, float("-inf"))
    return F.softmax(logits, dim=-1).masked_fill(~mask, 0.0)


def fgt_loss(student_weights: torch.Tensor, teacher_relevance: torch.Tensor, mask: torch.Tensor,
             temperature: float = 1.0) -> torch.Tensor:
    """TeachCLIP fine-grained teaching: cross-entropy terms -target * log(weight) between the teacher's
    frame-text relevance of the matched pairs (soft labels over valid frames) and the student's AFA
    weights, both [B,T], *averaged over the B x T valid elements* as the reference averages
    (not summed over frames: that made it T times stronger)."""
    target = sharpen(teacher_relevance.detach(), mask, temperature)
    log_weights = torch.log(student_weights.float().clamp_min(_EPS))
    terms = -(target * log_weights).masked_fill(~mask, 0.0)
    return terms.sum() / mask.sum().clamp_min(1)


def moment_loss(relevance: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """-log of the relevance mass on the frames inside the described event's window.

    ``relevance[B,T]`` sums to 1 over valid frames; ``inside[B,T]`` marks the frames
    in the window. Rows whose window holds no sampled frame are left out (0 if none remain).
    """
    rows = inside.any(dim=-1)
    if not bool(rows.any()):
        return relevance.sum() * 0.0
    mass = (relevance.float() * inside).sum(dim=-1)[rows]
    return -torch.log(mass.clamp_min(_EPS)).mean()
