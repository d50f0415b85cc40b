"""VideoTextModel: the open_clip backbone + a fast video head + a slow scorer.

Every entry point moves its inputs to the model's device and runs under
``runtime.autocast`` (bf16 on CUDA, fp32 on the CPU); outputs are fp32 and, where
they are embeddings, L2-normalised after the cast so their norm is 1 to fp32
precision. Gradient mode is the caller's: wrap serving calls in
``torch.inference_mode()``, leave it off for training.
"""
from __future__ import annotations

import copy
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .masking import check_mask
from .preprocess import preprocess_frames
from .regions import frames_and_maps, pool_regions, region_projection
from .runtime import autocast
from .text import ScorerTextTower, TextFeatures, text_token_features

TextInput = Sequence[str] | TextFeatures


class VideoTextModel(nn.Module):
    def __init__(self, config: ModelConfig, clip: nn.Module, tokenizer: object, head: nn.Module,
                 scorer: nn.Module, embed_dim: int, frame_encoder_id: str) -> None:
        super().__init__()
        self.config = config
        self.clip = clip
        self.head = head
        self.scorer = scorer
        self.tokenizer = tokenizer
        self.embed_dim = embed_dim
        self.frame_encoder_id = frame_encoder_id
        pp = getattr(clip.visual, "preprocess_cfg", {}) or {}
        size = getattr(clip.visual, "image_size", pp.get("size", 224))
        size = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
        # A square input (every CLIP ViT) is reported as one int, the common convention.
        self.image_size: int | tuple[int, int] = size[0] if size[0] == size[1] else size
        self._mean = tuple(pp.get("mean", (0.48145466, 0.4578275, 0.40821073)))
        self._std = tuple(pp.get("std", (0.26862954, 0.26130258, 0.27577711)))
        self._interpolation = pp.get("interpolation", "bicubic")
        self._region_projection = (region_projection(embed_dim, self.region_width)
                                   if config.scorer.uses_regions else None)
        # The slow scorer's own (frozen) text tower, when distillation trains the student's.
        self.scorer_text = ScorerTextTower(clip) if config.scorer.own_text else None
        # The spatial scorer reads the student's view of a video through its own frozen copy of
        # the head (taken when the teacher is trained), so distilling the student never moves
        # the teacher's inputs.
        self.scorer_head = copy.deepcopy(head) if config.scorer.kind == "spatial" else None

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ---- frames -------------------------------------------------------------------
    def preprocess(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8[T,H,W,3] RGB frames -> float32[T,3,S,S] CLIP input on the model's device."""
        return preprocess_frames(frames, self.image_size, self._mean, self._std,
                                 device=self.device, interpolation=self._interpolation)

    def encode_frames(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels[N,3,S,S] (from ``preprocess``) -> L2-normalised frame embeddings [N,D]."""
        if pixels.dim() != 4 or pixels.shape[1] != 3:
            raise ValueError(f"pixels: expected [N,3,S,S], got shape {tuple(pixels.shape)}")
        with autocast(self.device):
            features = self.clip.encode_image(pixels.to(self.device, torch.float32))
        return F.normalize(features.float(), dim=-1)

    # ---- regions (the spatial scorer's own view) -----------------------------------
    @property
    def uses_regions(self) -> bool:
        """True when the slow scorer reads region tokens, which ingest must then store."""
        return self.config.scorer.uses_regions

    @torch.no_grad()
    def freeze_teacher_view(self, text: bool = True, head: bool = True) -> None:
        """Give the slow scorer its own copies of the student's text tower and/or head as they
        are now (before the teacher is trained on them): later training of the student leaves
        the teacher's inputs as they were."""
        if text and self.scorer_text is not None:
            self.scorer_text.copy_from(self.clip)
        if head and self.scorer_head is not None:
            self.scorer_head.load_state_dict(self.head.state_dict())

    @property
    def region_cells(self) -> int:
        return self.config.scorer.grid ** 2 if self.uses_regions else 0

    @property
    def region_width(self) -> int:
        return (self.config.scorer.region_width or self.embed_dim) if self.uses_regions else 0

    @property
    def region_encoder_id(self) -> str | None:
        """What fixes the stored region tokens: the frame tower, the grid and the width.
        Points whose payload names another id must be decoded again for this version."""
        if not self.uses_regions:
            return None
        return f"{self.frame_encoder_id}:regions:{self.config.scorer.grid}x{self.config.scorer.grid}:{self.region_width}"

    def encode_frames_and_regions(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """pixels[N,3,S,S] -> (frame embeddings [N,D], region tokens [N,G,W] or None when the
        scorer reads none), from one pass of the frame tower; both L2-normalised, fp32."""
        if not self.uses_regions:
            return self.encode_frames(pixels), None
        if pixels.dim() != 4 or pixels.shape[1] != 3:
            raise ValueError(f"pixels: expected [N,3,S,S], got shape {tuple(pixels.shape)}")
        with autocast(self.device):
            pooled, maps = frames_and_maps(self.clip.visual, pixels.to(self.device, torch.float32))
        regions = pool_regions(maps.float(), self.config.scorer.grid, self._region_projection)
        return F.normalize(pooled.float(), dim=-1), regions

    def _regions(self, regions: torch.Tensor | np.ndarray | None, frames: torch.Tensor) -> dict:
        if not self.uses_regions:
            return {}
        if regions is None:
            raise ValueError("this model's scorer reads region tokens and none were given "
                             "(an index built without them needs re-indexing with this version)")
        regions = torch.as_tensor(regions, device=self.device).float()
        want = (frames.shape[0], frames.shape[1], self.region_cells, self.region_width)
        if tuple(regions.shape) != want:
            raise ValueError(f"regions: expected shape {want}, got {tuple(regions.shape)}")
        return {"regions": regions}

    def _frames(self, frames: torch.Tensor | np.ndarray, mask: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        frames = torch.as_tensor(frames, device=self.device).float()
        mask = torch.as_tensor(mask, device=self.device)
        if frames.dim() == 3 and frames.shape[-1] != self.embed_dim:
            raise ValueError(f"frames: embedding width {frames.shape[-1]} != model embed_dim {self.embed_dim}")
        return frames, check_mask(frames, mask)

    def aggregate_with_weights(self, frames: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """frames[B,T,D], mask[B,T] bool -> (video[B,D] L2-normalised, weights[B,T]).

        weights are AFA's learned per-frame attention, or uniform over valid frames for
        the pooling heads; they are 0 on padding and sum to 1 per row.
        """
        frames, mask = self._frames(frames, mask)
        with autocast(self.device):
            video, weights = self.head(frames, mask)
        return F.normalize(video.float(), dim=-1), weights.float()

    def aggregate(self, frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.aggregate_with_weights(frames, mask)[0]

    # ---- text ---------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        if isinstance(texts, str) or not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("texts: expected a non-empty list of strings")
        return self.tokenizer(list(texts)).to(self.device)

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """list of B strings -> L2-normalised sentence embeddings [B,D]."""
        ids = self.tokenize(texts)
        with autocast(self.device):
            # The token pass cuts the batch after its longest sentence (exact under the
            # causal mask): short queries and event phrases skip the padded context.
            features = text_token_features(self.clip, ids).sentence
        return F.normalize(features.float(), dim=-1)

    def _token_features(self, tower: nn.Module, texts: Sequence[str]) -> TextFeatures:
        ids = self.tokenize(texts)
        with autocast(self.device):
            feats = text_token_features(tower, ids)
        return TextFeatures(tokens=F.normalize(feats.tokens.float(), dim=-1) * feats.mask[..., None],
                            mask=feats.mask, sentence=F.normalize(feats.sentence.float(), dim=-1),
                            words=None if feats.words is None else feats.words.float())

    def encode_text_features(self, texts: Sequence[str]) -> TextFeatures:
        """Token-level features of the student's text tower: tokens[B,L,D], mask[B,L], sentence[B,D]."""
        return self._token_features(self.clip, texts)

    def encode_scorer_text(self, texts: Sequence[str]) -> TextFeatures:
        """Token features for the slow scorer: from its own text tower when it has one
        (``scorer.own_text``), else the same as :meth:`encode_text_features`."""
        return self._token_features(self.clip if self.scorer_text is None else self.scorer_text, texts)

    def text_features_of(self, texts: Sequence[str],
                         encoded: Sequence[tuple[np.ndarray, np.ndarray] | None]) -> TextFeatures:
        """The scorer's token features for ``texts``, taking ``encoded[i]`` (``TextFeatures.rows()``
        form of :meth:`encode_text_features`, from this version) where given and encoding only the
        others. A scorer with its own text tower ignores ``encoded`` (it comes from the student's)."""
        if len(encoded) != len(texts):
            raise ValueError(f"text features: {len(encoded)} encodings for {len(texts)} texts")
        missing = [i for i, row in enumerate(encoded) if row is None]
        if len(missing) == len(texts) or self.scorer_text is not None:
            return self.encode_scorer_text(texts)
        rows = list(encoded)
        for i, row in zip(missing, self.encode_text_features([texts[i] for i in missing]).rows() if missing else []):
            rows[i] = row
        widths = {w for tokens, sentence in rows for w in (tokens.shape[-1], sentence.shape[-1])}
        if widths != {self.embed_dim}:
            raise ValueError(f"text features: widths {sorted(widths)} != model embed_dim {self.embed_dim}")
        return TextFeatures.from_rows(rows, self.device)

    def _text(self, texts: TextInput) -> TextFeatures:
        return texts if isinstance(texts, TextFeatures) else self.encode_scorer_text(texts)

    # ---- slow scoring -------------------------------------------------------------
    def score_pairs(self, texts: TextInput, frames: torch.Tensor, mask: torch.Tensor,
                    video: torch.Tensor | np.ndarray | None = None,
                    regions: torch.Tensor | np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Aligned pairs: text b with video b -> (scores[B], frame_relevance[B,T]).

        ``video``[B,D]: the head's embeddings of these videos when the caller has them
        (the index stores them), so a scorer built on them does not recompute them; they
        must come from this version's head. ``regions``[B,T,G,W]: the stored region tokens,
        required when the scorer is spatial.
        """
        text = self._text(texts)
        frames, mask = self._frames(frames, mask)
        if len(text) != frames.shape[0]:
            raise ValueError(f"score_pairs: {len(text)} texts for {frames.shape[0]} videos")
        video = self._base_video(frames, mask, video)
        extra = {**({} if video is None else {"video": video}), **self._regions(regions, frames)}
        with autocast(self.device):
            scores, relevance = self.scorer(text, frames, mask, **extra)
        return scores.float(), relevance.float()

    def _base_video(self, frames: torch.Tensor, mask: torch.Tensor,
                    stored: torch.Tensor | np.ndarray | None = None) -> torch.Tensor | None:
        """The student's video embeddings when the scorer reads them: for the spatial scorer from
        its own frozen head; for scorer.base=head the head's, ``stored`` when given, else
        computed from the frames."""
        scorer = self.config.scorer
        if self.scorer_head is not None:
            # The teacher's own head, not the (distilled) student's whose vectors the index stores.
            with autocast(self.device):
                video, _ = self.scorer_head(frames, mask)
            return F.normalize(video.float(), dim=-1)
        if not (scorer.kind == "cross" and scorer.base == "head"):
            return None
        if stored is None:
            return self.aggregate(frames, mask)
        stored = torch.as_tensor(stored, device=self.device).float()
        if stored.shape != (frames.shape[0], self.embed_dim):
            raise ValueError(f"video: expected shape {(frames.shape[0], self.embed_dim)}, got {tuple(stored.shape)}")
        return F.normalize(stored, dim=-1)

    def score_query(self, text: str, frames: torch.Tensor, mask: torch.Tensor,
                    regions: torch.Tensor | np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One query against K candidate videos -> (scores[K], frame_relevance[K,T])."""
        if not isinstance(text, str):
            raise ValueError("text: expected a string")
        features = self.encode_scorer_text([text])
        count = int(torch.as_tensor(frames).shape[0])
        index = torch.zeros(count, dtype=torch.long, device=self.device)
        return self.score_pairs(features.select(index), frames, mask, regions=regions)

    def score_matrix(self, texts: TextInput, frames: torch.Tensor, mask: torch.Tensor,
                     pair_chunk: int = 1024,
                     regions: torch.Tensor | np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """All text x video pairs (the distillation teacher) ->
        (scores[Nt,Nv], frame_relevance[Nt,Nv,T]); pairs are scored ``pair_chunk`` at a time."""
        text = self._text(texts)
        frames, mask = self._frames(frames, mask)
        n_text, n_video, n_frames = len(text), frames.shape[0], frames.shape[1]
        text_index = torch.arange(n_text, device=self.device).repeat_interleave(n_video)
        video_index = torch.arange(n_video, device=self.device).repeat(n_text)
        scores, relevance = [], []
        video = self._base_video(frames, mask)
        region_arg = self._regions(regions, frames).get("regions")
        with autocast(self.device):
            for start in range(0, n_text * n_video, pair_chunk):
                ti, vi = text_index[start:start + pair_chunk], video_index[start:start + pair_chunk]
                extra = {} if video is None else {"video": video[vi]}
                if region_arg is not None:
                    extra["regions"] = region_arg[vi]
                s, r = self.scorer(text.select(ti), frames[vi], mask[vi], **extra)
                scores.append(s.float())
                relevance.append(r.float())
        return (torch.cat(scores).view(n_text, n_video),
                torch.cat(relevance).view(n_text, n_video, n_frames))
