"""The three training stages as loss functions over one shared model, plus the frozen
frame features the later two train on.

a. backbone: frame tower + head + text tower from augmented pixels (InfoNCE);
b. teacher: the slow scorer on frozen frame features: InfoNCE over the batch (which
   carries twins and mined negatives) plus the moment loss on event phrases, which
   is what trains the scorer's relevance head;
c. distill: the head (temporal transformer + AFA) and the text tower with TeachCLIP's
   in_weight*l_IN + alpha*l_CgT + gamma*l_FgT. The teacher is a frozen copy with its own
   text tower (``scorer.own_text``), so training the student's text tower never moves the
   teacher's inputs.

With several workers each one embeds its contiguous shard of the step's global batch and
the losses are computed over the whole batch from the gathered rows (collective.gather_rows):
InfoNCE, CgT, FgT and the moment loss of the teacher and distil stages, and the backbone's
InfoNCE, do not depend on the number of workers. What a step draws for the whole batch
(captions, counterfactual captions, event targets) comes from the one-worker streams.
Still per worker: the backbone's pixel augmentation and its event-phrase loss.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from vidsearch.models import VideoTextModel
from vidsearch.synth_scenes import Event, caption_key, clause, counterfactual_caption, events_key

from .augment import make_pixels
from .batches import BatchPlan, step_rng
from .collective import gather_rows, shard_bounds, shard_sizes
from .config import AugmentSection, BackboneStage, DistillStage, TeacherStage
from .frames import FrameCache
from .loss import cgt_loss, fgt_loss, infonce_logits, moment_loss, phrase_infonce, symmetric_infonce

STAGE_IDS = {"backbone": 1, "teacher": 2, "distill": 3, "baseline": 4, "features": 5}


@dataclass
class CaptionBank:
    """Every caption of every video of a split, and (synthetic data) each video's events."""

    captions: list[list[str]]
    events: list[list[dict]]

    def counts(self) -> list[int]:
        return [len(c) for c in self.captions]


@dataclass
class FrozenFeatures:
    """Frame features from the trained frame tower: clean (ingest frames) and augmented views."""

    frames: torch.Tensor  # [N,T,D]
    mask: torch.Tensor  # [N,T]
    times: torch.Tensor  # [N,T] seconds
    views: torch.Tensor | None = None  # [V,N,T,D]
    view_mask: torch.Tensor | None = None
    view_times: torch.Tensor | None = None
    # Region tokens of the spatial scorer (None when the scorer reads none): [N,T,G,W], [V,N,T,G,W]
    regions: torch.Tensor | None = None
    view_regions: torch.Tensor | None = None

    def view(self, v: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        if v is None or self.views is None:
            return self.frames, self.mask, self.times, self.regions
        regions = None if self.view_regions is None else self.view_regions[v]
        return self.views[v], self.view_mask[v], self.view_times[v], regions


def _generator(seed: int, stage: str, step: int, rank: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(step_rng(seed, STAGE_IDS[stage], step, 100 + rank).integers(2**62)))


def _normalisation(model: VideoTextModel) -> tuple[Sequence[float], Sequence[float]]:
    return model._mean, model._std  # noqa: SLF001 - the model owns its preprocess constants


@dataclass
class EncodedFrames:
    """Frame features of a frame cache: frames[N,T,D], mask[N,T], times[N,T] (seconds), and the
    region tokens [N,T,G,W] when the model's scorer reads them (from the same tower pass)."""

    frames: torch.Tensor
    mask: torch.Tensor
    times: torch.Tensor
    regions: torch.Tensor | None = None


@torch.no_grad()
def encode_cache(model: VideoTextModel, cache: FrameCache, num_frames: int, augment: AugmentSection | None,
                 seed: int, view: int, batch_size: int = 64) -> EncodedFrames:
    """Frame features of a frame cache (augmented when ``augment`` is given)."""
    model.eval()
    mean, std = _normalisation(model)
    feats, masks, times, regions = [], [], [], []
    for start in range(0, len(cache), batch_size):
        stop = min(start + batch_size, len(cache))
        gen = _generator(seed, "features", view * 100_000 + start, 0)
        pixels, mask, picked = make_pixels(cache.frames[start:stop], cache.mask[start:stop], num_frames,
                                           mean, std, augment, gen)
        b, t = mask.shape
        encoded, cells = model.encode_frames_and_regions(pixels.flatten(0, 1).to(model.device))
        encoded = encoded.view(b, t, -1).cpu()
        stamps = torch.zeros((b, t))
        for row, index in enumerate(picked):
            stamps[row, :len(index)] = torch.from_numpy(cache.timestamps[start + row, index])
        feats.append(encoded * mask[..., None])
        masks.append(mask)
        times.append(stamps)
        if cells is not None:
            regions.append(cells.view(b, t, *cells.shape[1:]).cpu() * mask[..., None, None])
    return EncodedFrames(torch.cat(feats), torch.cat(masks), torch.cat(times),
                         torch.cat(regions) if regions else None)


def text_batches(model: VideoTextModel, texts: list[str], batch_size: int = 256) -> torch.Tensor:
    return torch.cat([model.encode_text(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)])


@torch.no_grad()
def mine_neighbours(model: VideoTextModel, features: FrozenFeatures, bank: CaptionBank, count: int) -> list[list[int]]:
    """For each video, the ``count`` other videos its first caption recalls highest."""
    if count <= 0:
        return [[] for _ in bank.captions]
    video = torch.cat([model.aggregate(features.frames[i:i + 256], features.mask[i:i + 256])
                       for i in range(0, features.frames.shape[0], 256)])
    text = text_batches(model, [c[0] for c in bank.captions])
    sims = (text @ video.T).cpu()
    sims.fill_diagonal_(float("-inf"))
    return sims.topk(min(count, sims.shape[1] - 1), dim=1).indices.tolist()


@dataclass
class CaptionNegatives:
    """Counterfactual captions made for a batch's videos (text-side hard negatives)."""

    texts: list[str]
    owners: torch.Tensor  # [E] the batch row each caption was made from
    valid: torch.Tensor  # [B,E] False where the caption does describe that batch video

    def owned(self, start: int, stop: int) -> tuple[int, int]:
        """[first, last) of the captions made from batch rows [start, stop): they are made row
        by row, so a worker's shard owns one contiguous run of them."""
        owners = self.owners.numpy()
        return int(np.searchsorted(owners, start)), int(np.searchsorted(owners, stop))

    def sizes(self, shard: "Shard") -> list[int]:
        """How many of the captions each worker's shard owns (for gather_rows)."""
        return _sizes_by_row(self.owners.numpy(), shard)

    def extra_logits(self, own: torch.Tensor, batch: int) -> torch.Tensor:
        """[B,E] logits with each caption scored only against its own video (``own[E]``)."""
        extra = torch.full((batch, len(self.texts)), float("-inf"), device=own.device)
        extra[self.owners.to(own.device), torch.arange(len(self.texts), device=own.device)] = own.float()
        return extra


def caption_negatives(bank: CaptionBank, index: np.ndarray, count: int,
                      rng: np.random.Generator) -> CaptionNegatives | None:
    """``count`` counterfactual captions per batch video that has events; None when none could be made."""
    if count <= 0:
        return None
    texts, owners, keys = [], [], []
    for row, video in enumerate(index):
        for _ in range(count if bank.events[video] else 0):
            made = counterfactual_caption(rng, bank.events[video])
            if made is not None:
                texts.append(made[0])
                owners.append(row)
                keys.append(made[1])
    if not texts:
        return None
    # A changed caption can describe another video of the batch (the anchor's swap
    # twin, which hard negatives put there): it is no negative for that one.
    video_keys = [events_key(bank.events[v]) if bank.events[v] else None for v in index]
    valid = torch.tensor([[vk != key for key in keys] for vk in video_keys], dtype=torch.bool)
    return CaptionNegatives(texts=texts, owners=torch.as_tensor(owners), valid=valid)


def _step_negatives(bank: CaptionBank, full: np.ndarray, count: int, seed: int, stage: str,
                    step: int) -> CaptionNegatives | None:
    """A stage step's caption negatives for the whole global batch ``full``, reproducible from
    (seed, stage, step) like the batch itself: every worker draws the same ones (stream 10, the
    one a single worker has always used) and embeds those of its own rows."""
    return caption_negatives(bank, full, count, step_rng(seed, STAGE_IDS[stage], step, 10))


def _shard(index: np.ndarray, rank: int, world: int) -> np.ndarray:
    # Contiguous shards, in rank order: gathering every worker's rows rebuilds the batch in
    # BatchPlan's order (collective.shard_bounds is the same split).
    return np.array_split(index, world)[rank] if world > 1 else index


@dataclass
class Shard:
    """A step's global batch and this worker's contiguous rows [start, stop) of it."""

    full: np.ndarray  # [B] video index of each row
    choice: np.ndarray  # [B] which caption of its video each row uses
    start: int
    stop: int
    sizes: list[int]  # rows held by each worker, in rank order

    @property
    def index(self) -> np.ndarray:
        return self.full[self.start:self.stop]

    @property
    def picks(self) -> np.ndarray:
        return self.choice[self.start:self.stop]


def step_shard(plan: BatchPlan, step: int, counts: Sequence[int], rank: int, world: int) -> Shard:
    """Step ``step``'s global batch (a pure function of the step) and ``rank``'s rows of it."""
    full = plan.indices(step)
    start, stop = shard_bounds(len(full), rank, world)
    return Shard(full, plan.captions(step, full, counts), start, stop, shard_sizes(len(full), world))


def _sizes_by_row(rows: np.ndarray, shard: Shard) -> list[int]:
    """Per worker, how many entries of the ascending batch-row list ``rows`` its shard holds."""
    edges = np.cumsum([0, *shard.sizes])
    return [int(np.searchsorted(rows, hi) - np.searchsorted(rows, lo)) for lo, hi in zip(edges[:-1], edges[1:])]


@dataclass
class EventPhrases:
    """Every event of a batch whose window holds a sampled frame, worded as a phrase."""

    rows: torch.Tensor  # [P] batch row of the event's video
    texts: list[str]
    windows: torch.Tensor  # [P,T] the sampled frames inside the event's window
    interchangeable: torch.Tensor  # [P,P] True where two phrases describe the same event


def event_phrases(bank: CaptionBank, index: np.ndarray, times: torch.Tensor, mask: torch.Tensor,
                  rng: np.random.Generator) -> EventPhrases | None:
    """Each event of each batch video (``times[B,T]``: its sampled frames' seconds), with a random
    wording of its phrase; None when no event holds a sampled frame."""
    rows, texts, windows, keys = [], [], [], []
    for row, video in enumerate(index):
        for data in bank.events[video]:
            window = event_window(times[row], data) & mask[row]
            if not bool(window.any()):
                continue
            event = Event.from_dict(data)
            rows.append(row)
            texts.append(clause(event, int(rng.integers(6)), gerund=bool(rng.random() < 0.3)))
            windows.append(window)
            keys.append(caption_key((event,)))
    if not rows:
        return None
    same = torch.tensor([[a == b for b in keys] for a in keys], dtype=torch.bool)
    return EventPhrases(torch.as_tensor(rows), texts, torch.stack(windows), same)


def _phrase_loss(model: VideoTextModel, encoded: torch.Tensor, phrases: EventPhrases,
                 text: torch.Tensor) -> torch.Tensor:
    # The head runs over each event's own frames only, so its temporal transformer sees
    # the event's motion (left vs right share the same frames' mean) and nothing else.
    rows = phrases.rows.to(encoded.device)
    event_video = model.aggregate(encoded[rows], phrases.windows.to(encoded.device))
    return phrase_infonce(text, event_video, model.clip.logit_scale, phrases.interchangeable)


def backbone_loss(model: VideoTextModel, cache: FrameCache, bank: CaptionBank, plan: BatchPlan,
                  config: BackboneStage, augment: AugmentSection, seed: int, rank: int, world: int):
    mean, std = _normalisation(model)
    num_frames = model.config.num_frames
    counts = bank.counts()

    def loss_fn(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        shard = step_shard(plan, step, counts, rank, world)
        index, picks = shard.index, shard.picks
        gen = _generator(seed, "backbone", step, rank)
        order = np.argsort(index)  # sorted reads from the memory map
        pixels, mask, picked = make_pixels(cache.frames[index[order]], cache.mask[index[order]], num_frames,
                                           mean, std, augment, gen)
        inverse = np.argsort(order)
        pixels, mask = pixels[inverse], mask[inverse]
        b, t = mask.shape
        encoded = model.encode_frames(pixels.flatten(0, 1).to(model.device)).view(b, t, -1)
        video = model.aggregate(encoded, mask)
        negatives = _step_negatives(bank, shard.full, config.caption_negatives, seed, "backbone", step)
        first, last = negatives.owned(shard.start, shard.stop) if negatives is not None else (0, 0)
        extra_texts = negatives.texts[first:last] if negatives is not None else []
        phrases = None
        if config.phrase_weight > 0:
            times = torch.zeros((b, t))
            for row in range(b):
                frames_of_row = picked[inverse[row]]
                times[row, :len(frames_of_row)] = torch.from_numpy(cache.timestamps[index[row], frames_of_row])
            phrases = event_phrases(bank, index, times, mask, step_rng(seed, STAGE_IDS["backbone"], step, 20 + rank))
        phrase_texts = phrases.texts if phrases is not None else []
        text = model.encode_text([bank.captions[i][c] for i, c in zip(index, picks)] + extra_texts + phrase_texts)
        text, extra, phrase_text = text[:b], text[b:b + len(extra_texts)], text[b + len(extra_texts):]
        # InfoNCE over the global batch: every worker's rows, back in the batch's order.
        extra = gather_rows(extra, negatives.sizes(shard)) if negatives is not None else None
        loss_in = symmetric_infonce(gather_rows(text, shard.sizes), gather_rows(video, shard.sizes),
                                    model.clip.logit_scale, extra,
                                    negatives.valid.to(video.device) if negatives is not None else None)
        parts = {"in": float(loss_in.detach())}
        loss = loss_in
        if phrases is not None:
            loss_phrase = _phrase_loss(model, encoded, phrases, phrase_text)
            loss = loss + config.phrase_weight * loss_phrase
            parts["phrase"] = float(loss_phrase.detach())
        return loss, parts
    return loss_fn


def _batch_view(features: FrozenFeatures, plan_seed: int, stage: str, step: int, index: np.ndarray):
    views = features.views.shape[0] if features.views is not None else 0
    v = int(step_rng(plan_seed, STAGE_IDS[stage], step, 3).integers(views)) if views else None
    frames, mask, times, regions = features.view(v)
    return frames[index], mask[index], times[index], None if regions is None else regions[index]


def event_window(times: torch.Tensor, event: dict) -> torch.Tensor:
    """Which of the sampled frames (``times[T]``, seconds) lie in the event's [start_s, end_s)."""
    return (times >= float(event["start_s"]) - 1e-6) & (times < float(event["end_s"]) - 1e-6)


def _event_targets(bank: CaptionBank, index: np.ndarray, times: torch.Tensor, rng: np.random.Generator):
    """One event phrase per video that has events, and which sampled frames fall in its window."""
    rows, phrases, inside = [], [], []
    for row, video in enumerate(index):
        events = bank.events[video]
        if not events:
            continue
        event = events[int(rng.integers(len(events)))]
        window = event_window(times[row], event)
        rows.append(row)
        phrases.append(str(event["phrase"]))
        inside.append(window)
    if not rows:
        return None
    return torch.as_tensor(rows), phrases, torch.stack(inside)


@dataclass
class FrozenBatch:
    """A step's batch on frozen features: the *global* batch's frames (every worker holds every
    video's features, so no frames need gathering) and this worker's captions."""

    shard: Shard
    texts: list[str]  # this worker's rows' captions
    frames: torch.Tensor  # [B,T,D] on the device
    mask: torch.Tensor  # [B,T]
    times: torch.Tensor  # [B,T] seconds, on the CPU
    regions: torch.Tensor | None  # [B,T,G,W]

    def local(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor[self.shard.start:self.shard.stop]


def _frozen_batch(features: FrozenFeatures, bank: CaptionBank, plan: BatchPlan, counts: list[int], seed: int,
                  stage: str, step: int, rank: int, world: int, device: torch.device) -> FrozenBatch:
    shard = step_shard(plan, step, counts, rank, world)
    frames, mask, times, regions = _batch_view(features, seed, stage, step, shard.full)
    texts = [bank.captions[i][c] for i, c in zip(shard.index, shard.picks)]
    return FrozenBatch(shard, texts, frames.to(device), mask.to(device), times,
                       None if regions is None else regions.to(device))


def teacher_loss(model: VideoTextModel, features: FrozenFeatures, bank: CaptionBank, plan: BatchPlan,
                 config: TeacherStage, seed: int, rank: int, world: int):
    counts = bank.counts()

    def loss_fn(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        batch = _frozen_batch(features, bank, plan, counts, seed, "teacher", step, rank, world, model.device)
        shard, frames, mask, regions = batch.shard, batch.frames, batch.mask, batch.regions
        with torch.no_grad():
            text = model.encode_scorer_text(batch.texts)
        # This worker's captions against every video of the batch: its rows of the [B,B] matrix.
        scores = gather_rows(model.score_matrix(text, frames, mask, regions=regions)[0], shard.sizes)
        scale = model.scorer.logit_scale.exp()
        extra = None
        negatives = _step_negatives(bank, shard.full, config.caption_negatives, seed, "teacher", step)
        if negatives is not None:
            # Scored against their own video only: a [B,E] cross-encoder pass would cost E times the batch.
            first, last = negatives.owned(shard.start, shard.stop)
            own = torch.zeros(0, device=frames.device)
            if last > first:
                with torch.no_grad():
                    changed = model.encode_scorer_text(negatives.texts[first:last])
                owners = negatives.owners[first:last].to(frames.device)
                own, _ = model.score_pairs(changed, frames[owners], mask[owners],
                                           regions=None if regions is None else regions[owners])
            own = gather_rows(own, negatives.sizes(shard))
            extra = negatives.extra_logits(scale * own, len(shard.full))
        loss_in = infonce_logits(scale * scores, extra)
        parts = {"in": float(loss_in.detach())}
        loss = loss_in
        targets = _event_targets(bank, shard.full, batch.times, step_rng(seed, STAGE_IDS["teacher"], step, 4))
        if targets is not None and config.moment_weight > 0:
            rows, phrases, inside = targets
            first, last = int(np.searchsorted(rows.numpy(), shard.start)), int(np.searchsorted(rows.numpy(), shard.stop))
            relevance = torch.zeros((0, frames.shape[1]), device=frames.device)
            if last > first:
                with torch.no_grad():
                    phrase_text = model.encode_scorer_text(phrases[first:last])
                at = rows[first:last].to(frames.device)
                _, relevance = model.score_pairs(phrase_text, frames[at], mask[at],
                                                 regions=None if regions is None else regions[at])
            relevance = gather_rows(relevance, _sizes_by_row(rows.numpy(), shard))
            loss_moment = moment_loss(relevance, inside.to(relevance.device) & mask[rows.to(mask.device)])
            loss = loss + config.moment_weight * loss_moment
            parts["moment"] = float(loss_moment.detach())
        return loss, parts
    return loss_fn


def text_tower_parameters(model: VideoTextModel) -> list[torch.nn.Parameter]:
    """The student's text tower: every open_clip parameter outside the frame tower."""
    return [p for name, p in model.clip.named_parameters() if not name.startswith("visual.")]


def distill_loss(model: VideoTextModel, teacher: VideoTextModel, features: FrozenFeatures, bank: CaptionBank,
                 plan: BatchPlan, config: DistillStage, seed: int, rank: int, world: int, *, distil: bool = True):
    """TeachCLIP's student objective, in_weight*l_IN + alpha*l_CgT + gamma*l_FgT, over the head and
    (``config.train_text``) the text tower; ``distil=False`` is the non-distilled baseline (l_IN only).

    ``teacher`` is the frozen copy that teaches: its scorer reads its own text tower and the
    batch's region tokens, so moving the student's text tower never moves the teacher's inputs.
    """
    counts = bank.counts()

    def loss_fn(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        # The baseline sees exactly the distilled student's batches ("distill" seeds both).
        batch = _frozen_batch(features, bank, plan, counts, seed, "distill", step, rank, world, model.device)
        shard, texts = batch.shard, batch.texts
        negatives = _step_negatives(bank, shard.full, config.caption_negatives, seed, "distill", step)
        first, last = negatives.owned(shard.start, shard.stop) if negatives is not None else (0, 0)
        extra_texts = negatives.texts[first:last] if negatives is not None else []
        with torch.set_grad_enabled(config.train_text and torch.is_grad_enabled()):
            encoded = model.encode_text(texts + extra_texts)
        text, changed = encoded[:len(texts)], encoded[len(texts):]
        video, weights = model.aggregate_with_weights(batch.local(batch.frames), batch.local(batch.mask))
        # The student's [B,B] matrix over the global batch, from every worker's rows.
        text, video = gather_rows(text, shard.sizes), gather_rows(video, shard.sizes)
        scale = model.clip.logit_scale.exp().detach()
        student = scale * (text @ video.T)
        extra = None
        if negatives is not None:
            changed = gather_rows(changed, negatives.sizes(shard))
            extra = (scale * (video @ changed.T)).masked_fill(~negatives.valid.to(video.device), float("-inf"))
        loss_in = infonce_logits(student, extra)
        parts = {"in": float(loss_in.detach())}
        loss = loss_in
        if distil and (config.alpha > 0 or config.gamma > 0):
            with torch.no_grad():
                # This worker's captions against every video: its rows of the teacher's matrix.
                scores, relevance = teacher.score_matrix(teacher.encode_scorer_text(texts), batch.frames, batch.mask,
                                                         regions=batch.regions)
                teacher_logits = gather_rows(teacher.scorer.logit_scale.exp() * scores, shard.sizes)
                rows = torch.arange(len(texts))
                matched = gather_rows(relevance[rows, shard.start + rows], shard.sizes)
            loss_cgt = cgt_loss(student, teacher_logits, config.cgt_temperature)
            loss_fgt = fgt_loss(gather_rows(weights, shard.sizes), matched, batch.mask, config.fgt_teacher_temperature)
            loss = config.in_weight * loss_in + config.alpha * loss_cgt + config.gamma * loss_fgt
            parts.update(cgt=float(loss_cgt.detach()), fgt=float(loss_fgt.detach()))
        return loss, parts
    return loss_fn
