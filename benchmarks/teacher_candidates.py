"""The slow model trained on the task it serves: ranking the student's top candidates
(benchmarks/teacher_probe.py; measured, not yet a trainer objective: docs/benchmarks/fast-slow.md, run 4).

In-batch InfoNCE (``stages.teacher_loss``) shows the slow model a caption against the other
videos of a random batch. Most of them differ in colour or shape, which the student's cosine
(one of the slow model's inputs) already separates, so the loss is low from the first steps
and nothing in it asks the model to look at the region tokens (docs/benchmarks/fast-slow.md:
three runs, the teacher within a point of the student, direction twins at chance, although a
linear probe reads direction from the same region tokens at 99%).

Here every training row is one caption against its own video, its twins (the same event
played backwards, or one attribute swapped) and the rest of the student's top recall for
that caption, the re-ranker's candidate list at serving time: every negative is one the
student finds hard. A second, text-side term ranks the caption against counterfactual
captions of the same video (a direction word or an attribute changed), so "moves left" and
"moves right" must be told apart on the same pixels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from vidsearch.models import TextFeatures, VideoTextModel

from vidsearch.services.trainer.batches import step_rng
from vidsearch.services.trainer.stages import CaptionBank, FrozenFeatures, caption_negatives, text_batches

# Distinct from stages.STAGE_IDS' streams, so the candidate rows never repeat the in-batch draws.
_STREAM_ROWS, _STREAM_VIEW, _STREAM_NEGATIVES = 21, 22, 23


@dataclass
class CandidateLists:
    """Per training caption: its video and the videos the slow model must rank for it."""

    owners: np.ndarray  # [Q] the video each caption describes
    texts: list[str]  # [Q]
    candidates: np.ndarray  # [Q,K] video indices; column 0 is the caption's own video

    def __len__(self) -> int:
        return len(self.texts)


@torch.no_grad()
def candidate_lists(model: VideoTextModel, features: FrozenFeatures, bank: CaptionBank,
                    twins: Sequence[Sequence[int]], count: int, chunk: int = 512) -> CandidateLists:
    """Every caption's own video, then its twins, then the student's highest-recalled others,
    ``count`` in all (fewer only when the split has fewer videos)."""
    num_videos = features.frames.shape[0]
    count = min(count, num_videos)
    if count < 2:
        raise ValueError(f"candidate lists need at least 2 videos, got {num_videos}")
    video = torch.cat([model.aggregate(features.frames[i:i + 256].to(model.device),
                                       features.mask[i:i + 256].to(model.device))
                       for i in range(0, num_videos, 256)])
    texts = [c for caps in bank.captions for c in caps]
    owners = np.repeat(np.arange(len(bank.captions)), bank.counts()).astype(np.int64)
    lists = np.empty((len(texts), count), dtype=np.int64)
    for start in range(0, len(texts), chunk):
        sims = (text_batches(model, texts[start:start + chunk]) @ video.T).cpu()
        # Enough of the top to fill a list after removing the owner and its twins.
        top = sims.topk(min(num_videos, count + 8), dim=1).indices.numpy()
        for row, ranked in enumerate(top):
            owner = int(owners[start + row])
            chosen = [owner, *[t for t in twins[owner] if t != owner]][:count]
            taken = set(chosen)
            for video_index in ranked:
                if len(chosen) >= count:
                    break
                if int(video_index) not in taken:
                    taken.add(int(video_index))
                    chosen.append(int(video_index))
            lists[start + row] = chosen
    return CandidateLists(owners=owners, texts=texts, candidates=lists)


TextEncoder = Callable[[Sequence[str]], TextFeatures]


def own_words_student_sentence(model: VideoTextModel) -> TextEncoder:
    """Text features for a slow model whose own text tower was restarted: the word tokens from
    that tower, the sentence vector (the student's cosine, one of the slow model's inputs) from
    the student's, so the slow model keeps the student's view while its words are its own."""
    def encode(texts: Sequence[str]) -> TextFeatures:
        own = model.encode_scorer_text(texts)
        with torch.no_grad():
            student = model.encode_text_features(texts)
        return TextFeatures(own.tokens, own.mask, student.sentence, own.words)
    return encode


def candidate_rows(lists: CandidateLists, batch: int, seed: int, stage: int, step: int) -> np.ndarray:
    """Step ``step``'s captions: one pass over every caption per epoch, in a seeded order."""
    per_epoch = max(1, len(lists) // batch)
    epoch, chunk = divmod(step, per_epoch)
    order = np.random.default_rng([seed, stage, epoch, _STREAM_ROWS]).permutation(len(lists))
    return order[chunk * batch:(chunk + 1) * batch]


def candidate_teacher_loss(model: VideoTextModel, features: FrozenFeatures, bank: CaptionBank,
                           lists: CandidateLists, *, batch_size: int, caption_negatives_per_video: int,
                           text_weight: float, seed: int, stage: int, train_text: bool = False,
                           encode: TextEncoder | None = None) -> Callable[[int], tuple[torch.Tensor, dict[str, float]]]:
    """``loss_fn(step)``: cross-entropy of each caption's own video among its candidates
    (scaled by the scorer's temperature), plus ``text_weight`` times the cross-entropy of the
    caption against counterfactual captions of its own video. ``train_text``: the slow model's
    own text tower learns too (else its token features are the student's, frozen). ``encode``: how
    captions become the slow model's text features (default: its own text tower)."""
    encode = encode or model.encode_scorer_text
    width = lists.candidates.shape[1]

    def loss_fn(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        rows = candidate_rows(lists, batch_size, seed, stage, step)
        views = features.views.shape[0] if features.views is not None else 0
        v = int(step_rng(seed, stage, step, _STREAM_VIEW).integers(views)) if views else None
        frames, mask, _, regions = features.view(v)
        cands = torch.as_tensor(lists.candidates[rows].reshape(-1))
        texts = [lists.texts[r] for r in rows]
        with torch.set_grad_enabled(train_text):
            text = encode(texts)
        repeat = torch.arange(len(rows), device=model.device).repeat_interleave(width)
        scores, _ = model.score_pairs(text.select(repeat), frames[cands].to(model.device), mask[cands].to(model.device),
                                      regions=None if regions is None else regions[cands].to(model.device))
        scale = model.scorer.logit_scale.exp()
        logits = (scale * scores).view(len(rows), width)
        target = torch.zeros(len(rows), dtype=torch.long, device=logits.device)
        loss_video = F.cross_entropy(logits.float(), target)
        loss, parts = loss_video, {"video": float(loss_video.detach())}
        owners = lists.owners[rows]
        negatives = caption_negatives(bank, owners, caption_negatives_per_video,
                                      step_rng(seed, stage, step, _STREAM_NEGATIVES))
        if negatives is not None and text_weight > 0:
            with torch.set_grad_enabled(train_text):
                changed = encode(negatives.texts)
            at = negatives.owners
            own_videos = torch.as_tensor(owners[at.numpy()])
            wrong, _ = model.score_pairs(changed, frames[own_videos].to(model.device),
                                         mask[own_videos].to(model.device),
                                         regions=None if regions is None else regions[own_videos].to(model.device))
            # Row b: the true caption's score on its video, then its counterfactuals (-inf elsewhere).
            extra = torch.full((len(rows), len(negatives.texts)), float("-inf"), device=logits.device)
            extra[at.to(logits.device), torch.arange(len(negatives.texts), device=logits.device)] = scale * wrong.float()
            has = torch.isfinite(extra).any(dim=1)
            if bool(has.any()):
                text_logits = torch.cat([logits[:, :1].float(), extra], dim=1)[has]
                loss_text = F.cross_entropy(text_logits, torch.zeros(int(has.sum()), dtype=torch.long,
                                                                     device=logits.device))
                loss = loss + text_weight * loss_text
                parts["text"] = float(loss_text.detach())
        return loss, parts
    return loss_fn
