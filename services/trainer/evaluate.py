"""Text->video quality of a trained model on one split: every caption against every video.

Rows reported (R@1/5/10 in percent, MdR, MnR):
- ``student``: dual-encoder recall (text tower + head), what the ANN index ranks by;
- ``teacher``: the slow scorer over the whole corpus (the slow model's ceiling);
- ``rerank@K``: student top-K re-ordered by the serving fusion (beta·rerank + (1-beta)·recall,
  per-query min-max) — exactly what a gRPC Search returns; the rest keep recall order;
plus twin accuracy: how often a caption's own video outscores its reversed twin, its
direction twin (one event played backwards) or its attribute-swapped twin.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from vidsearch.models import VideoTextModel
from vidsearch.retrieval_metrics import retrieval_metrics

from .stages import CaptionBank, text_batches


@dataclass
class EvalSet:
    """Frozen clean frame features of one split and its captions and twins."""

    video_ids: list[str]
    frames: torch.Tensor  # [N,T,D]
    mask: torch.Tensor
    bank: CaptionBank
    twins: list[list[tuple[int, str]]]  # per video: (twin index, relation)
    times: torch.Tensor | None = None  # [N,T] frame timestamps (seconds), for moment accuracy
    regions: torch.Tensor | None = None  # [N,T,G,W] region tokens, for a spatial scorer

    def queries(self) -> tuple[list[str], np.ndarray]:
        texts = [c for caps in self.bank.captions for c in caps]
        owners = np.repeat(np.arange(len(self.bank.captions)), [len(c) for c in self.bank.captions])
        return texts, owners.astype(np.int64)


def _fuse_rows(recall: np.ndarray, rerank: np.ndarray, beta: float) -> np.ndarray:
    """Per-row min-max fusion, the vectorised form of services.query.fusion.fuse."""
    def minmax(x: np.ndarray) -> np.ndarray:
        low, high = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
        span = np.where(high - low > 0, high - low, 1.0)
        return np.where(high - low > 0, (x - low) / span, 1.0)
    return beta * minmax(rerank) + (1.0 - beta) * minmax(recall)


def rerank_similarity(student: np.ndarray, teacher: np.ndarray, k: int, beta: float) -> np.ndarray:
    """A similarity matrix whose ranking is: fused top-k first, then the rest by recall."""
    k = min(k, student.shape[1])
    top = np.argsort(-student, axis=1, kind="stable")[:, :k]
    recall = np.take_along_axis(student, top, axis=1)
    rerank = np.take_along_axis(teacher, top, axis=1)
    fused = _fuse_rows(recall, rerank, beta)
    out = student - student.max() - 10.0  # below every fused score
    np.put_along_axis(out, top, 10.0 + fused, axis=1)
    return out


@torch.no_grad()
def student_matrix(model: VideoTextModel, data: EvalSet, texts: list[str]) -> np.ndarray:
    video = torch.cat([model.aggregate(data.frames[i:i + 256].to(model.device), data.mask[i:i + 256].to(model.device))
                       for i in range(0, data.frames.shape[0], 256)])
    return (text_batches(model, texts) @ video.T).cpu().numpy()


@torch.no_grad()
def teacher_matrix(model: VideoTextModel, data: EvalSet, texts: list[str], chunk: int = 64) -> np.ndarray:
    rows = []
    frames, mask = data.frames.to(model.device), data.mask.to(model.device)
    regions = data.regions.to(model.device) if data.regions is not None and model.uses_regions else None
    for start in range(0, len(texts), chunk):
        scores, _ = model.score_matrix(texts[start:start + chunk], frames, mask, pair_chunk=4096, regions=regions)
        rows.append(scores.cpu().numpy())
    return np.concatenate(rows)


def twin_accuracy(sim: np.ndarray, owners: np.ndarray, twins: Sequence[Sequence[tuple[int, str]]]) -> dict[str, float]:
    """Share of (caption, twin) pairs where the caption's own video scores higher, per relation kind."""
    wins: dict[str, list[bool]] = {}
    for row, owner in enumerate(owners):
        for twin, relation in twins[owner]:
            kind = relation if relation in ("reversed", "direction") else (
                "swap" if relation.startswith("swap") else None)
            if kind is not None:
                wins.setdefault(kind, []).append(bool(sim[row, owner] > sim[row, twin]))
    return {f"twin_{k}": 100.0 * float(np.mean(v)) for k, v in sorted(wins.items())}


def twin_breakdown(sim: np.ndarray, owners: np.ndarray, twins: Sequence[Sequence[tuple[int, str]]]) -> dict[str, float]:
    """Twin accuracy per exact relation ("reversed", "swap:shape", "reversed+swap:size", ...):
    which attribute a model is blind to."""
    wins: dict[str, list[bool]] = {}
    for row, owner in enumerate(owners):
        for twin, relation in twins[owner]:
            wins.setdefault(relation, []).append(bool(sim[row, owner] > sim[row, twin]))
    return {relation: 100.0 * float(np.mean(v)) for relation, v in sorted(wins.items())}


@torch.no_grad()
def moment_accuracy(model: VideoTextModel, data: EvalSet) -> dict[str, float]:
    """For every event phrase (synthetic data), is the best frame inside the event's window?

    ``moment_rerank``: argmax of the scorer's frame relevance for the phrase (what a
    re-ranked result reports); ``moment_recall``: argmax of the phrase's cosine with each
    stored frame (what a result that was not re-ranked reports, the service's own
    function); ``moment_afa``: argmax of the head's text-agnostic frame weights (what FgT
    trains; no result reports it). Percent of phrases.
    """
    from vidsearch.services.query.fusion import best_frames, frame_text_cosine

    rows, phrases, windows = [], [], []
    for video, events in enumerate(data.bank.events):
        for event in events:
            rows.append(video)
            phrases.append(str(event["phrase"]))
            windows.append((float(event["start_s"]), float(event["end_s"])))
    if not rows or data.times is None:
        return {}
    index = torch.as_tensor(rows)
    frames, mask = data.frames[index].to(model.device), data.mask[index].to(model.device)
    regions = data.regions[index].to(model.device) if data.regions is not None and model.uses_regions else None
    picks: dict[str, list[int]] = {"moment_rerank": [], "moment_recall": [], "moment_afa": []}
    with torch.inference_mode():
        for start in range(0, len(rows), 256):
            part = slice(start, start + 256)
            _, relevance = model.score_pairs(phrases[part], frames[part], mask[part],
                                             regions=None if regions is None else regions[part])
            _, weights = model.aggregate_with_weights(frames[part], mask[part])
            sentence = model.encode_text(phrases[part]).float().cpu().numpy()
            valid = mask[part].cpu().numpy()
            cosine = np.stack([frame_text_cosine(text, video) for text, video in
                               zip(sentence, frames[part].float().cpu().numpy())])
            picks["moment_rerank"] += best_frames(relevance.float().cpu().numpy(), valid).tolist()
            picks["moment_recall"] += best_frames(cosine, valid).tolist()
            picks["moment_afa"] += best_frames(weights.float().cpu().numpy(), valid).tolist()
    out = {}
    for name, frame_of in picks.items():
        hits = [low - 1e-6 <= float(data.times[video][frame]) < high - 1e-6
                for video, frame, (low, high) in zip(rows, frame_of, windows)]
        out[name] = 100.0 * float(np.mean(hits))
    return out


def shares_teacher(a: VideoTextModel, b: VideoTextModel) -> bool:
    """True when ``a`` and ``b`` score every pair alike with their slow scorers: the same scorer
    weights, reading the same text features (its own text tower, or equal student towers), and
    not built on the head (``scorer.base=head``), so one teacher matrix serves both."""
    if a.config.scorer != b.config.scorer or (a.config.scorer.kind == "cross" and a.config.scorer.base == "head"):
        return False
    parts = [(a.scorer, b.scorer)]
    if a.scorer_head is not None and b.scorer_head is not None:
        parts.append((a.scorer_head, b.scorer_head))
    parts.append((a.scorer_text, b.scorer_text) if a.scorer_text is not None and b.scorer_text is not None
                 else (a.clip, b.clip))
    for left, right in parts:
        mine, theirs = left.state_dict(), right.state_dict()
        if mine.keys() != theirs.keys() or any(not torch.equal(mine[k], theirs[k]) for k in mine
                                               if not k.startswith("visual.")):
            return False
    return True


def evaluate_model(model: VideoTextModel, data: EvalSet, *, rerank_k: Sequence[int], beta: float,
                   teacher: bool = True, slow: np.ndarray | None = None) -> dict[str, dict[str, float]]:
    """{row: {metric: value}} for the student, the teacher and each re-rank depth.

    ``slow``: this model's teacher matrix over ``data`` (queries x videos) when the caller has
    it (it is the costly part: every caption against every video through the slow scorer)."""
    was_training = model.training
    model.eval()
    try:
        texts, owners = data.queries()
        student = student_matrix(model, data, texts)
        out = {"student": {**retrieval_metrics(student, owners), **twin_accuracy(student, owners, data.twins)}}
        if teacher:
            slow = teacher_matrix(model, data, texts) if slow is None else slow
            out["teacher"] = {**retrieval_metrics(slow, owners), **twin_accuracy(slow, owners, data.twins)}
            for k in rerank_k:
                fused = rerank_similarity(student, slow, k, beta)
                out[f"rerank@{k}"] = {**retrieval_metrics(fused, owners), **twin_accuracy(fused, owners, data.twins)}
        return out
    finally:
        model.train(was_training)


def flatten_metrics(split: str, rows: dict[str, dict[str, float]], prefix: str = "") -> dict[str, float]:
    """{"val.student.R@1": ...}: the names the gate and the manifest use."""
    return {f"{split}.{prefix}{row}.{metric}": float(value) for row, metrics in rows.items()
            for metric, value in metrics.items()}
