"""Token-level text features from an open_clip text tower, for the slow scorers.

open_clip's ``encode_text`` returns only the pooled (EOT) feature. The scorers also
need one feature per token, projected into the joint space like the pooled one. This
module replays the text tower's forward (embeddings, transformer, final norm,
projection) and keeps every position up to the pooled token.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .masking import zero_padding


@dataclass
class TextFeatures:
    """tokens[B,L,D] and sentence[B,D] are L2-normalised; mask[B,L] marks real tokens (SOT..EOT).

    ``words``[B,L,Wt], when present: the tower's word embeddings of the same tokens, before its
    transformer (a scorer with ``word_tokens`` reads them: the trained transformer maps "moves
    left" and "moves right" to near-identical tokens, the embedding table does not). Only a
    model's own encoding carries them; ``rows``/``from_rows`` (the hand-off between services)
    do not, so a scorer that reads them encodes its text itself (``scorer.own_text``).
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    sentence: torch.Tensor
    words: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.sentence.shape[0]

    def select(self, index: torch.Tensor) -> "TextFeatures":
        return TextFeatures(self.tokens[index], self.mask[index], self.sentence[index],
                            None if self.words is None else self.words[index])

    def rows(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per text, (tokens[L_i,D], sentence[D]) as float32 arrays: its real tokens only,
        the form in which one service hands its encoded query to another."""
        tokens, sentence = self.tokens.float().cpu().numpy(), self.sentence.float().cpu().numpy()
        lengths = self.mask.sum(dim=1).tolist()
        return [(tokens[i, :n].copy(), sentence[i].copy()) for i, n in enumerate(lengths)]

    @staticmethod
    def from_rows(rows: Sequence[tuple[np.ndarray, np.ndarray]], device: torch.device | str = "cpu") -> "TextFeatures":
        """The inverse of ``rows``: pads the tokens to the longest text and marks them."""
        if not rows:
            raise ValueError("text features: need at least one text")
        width = rows[0][1].shape[-1]
        longest = max(t.shape[0] for t, _ in rows)
        tokens = torch.zeros((len(rows), longest, width), dtype=torch.float32)
        mask = torch.zeros((len(rows), longest), dtype=torch.bool)
        for i, (t, _) in enumerate(rows):
            tokens[i, :t.shape[0]] = torch.from_numpy(np.asarray(t, dtype=np.float32))
            mask[i, :t.shape[0]] = True
        sentence = torch.from_numpy(np.stack([np.asarray(s, dtype=np.float32) for _, s in rows]))
        return TextFeatures(tokens.to(device), mask.to(device), sentence.to(device))


def _tower(clip: nn.Module) -> nn.Module:
    # open_clip's CLIP keeps the text modules on the model itself; CustomTextCLIP has `.text`.
    return clip.text if hasattr(clip, "text") else clip


def check_text_tower(clip: nn.Module) -> None:
    """Raise ValueError at build time if token features cannot be taken from this tower."""
    tower = _tower(clip)
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")
    missing = [n for n in needed if not hasattr(tower, n)]
    if missing:
        raise ValueError(f"clip.model_cfg: text tower {type(tower).__name__} is not supported "
                         f"(token features need {', '.join(missing)})")
    if getattr(tower, "cls_emb", None) is not None or getattr(tower, "use_pad_mask", False):
        raise ValueError("clip.model_cfg: text towers with a class token or a padding mask are not supported")
    if _pool_type(clip) not in ("argmax", "eos"):
        raise ValueError(f"clip.model_cfg: text pool_type {_pool_type(clip)!r} is not supported (argmax or eos)")


def _pool_type(clip: nn.Module) -> str:
    return getattr(clip, "text_pool_type", None) or getattr(_tower(clip), "pool_type", "argmax")


def _pool_index(clip: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    if _pool_type(clip) == "argmax":
        return ids.argmax(dim=-1)  # the EOT token has the largest id in CLIP's vocabulary
    eos = getattr(clip, "text_eos_id", None)
    eos = getattr(_tower(clip), "eos_id", None) if eos is None else eos
    return (ids == eos).int().argmax(dim=-1)


def _project(tower: nn.Module, x: torch.Tensor) -> torch.Tensor:
    proj = tower.text_projection
    if proj is None:
        return x
    return proj(x) if isinstance(proj, nn.Linear) else x @ proj


def text_token_features(clip: nn.Module, ids: torch.Tensor) -> TextFeatures:
    """ids[B, context_length] -> TextFeatures with L = longest sequence in the batch."""
    tower = _tower(clip)
    pool = _pool_index(clip, ids)
    attn_mask = getattr(tower, "attn_mask", None)
    # With a causal mask, positions up to EOT never see what follows, so the batch can
    # be cut after its longest sentence: cheaper for the scorers, and exact.
    length = int(pool.max()) + 1 if attn_mask is not None else ids.shape[1]
    ids = ids[:, :length]
    cast_dtype = tower.transformer.get_cast_dtype()
    words = tower.token_embedding(ids)
    x = words.to(cast_dtype) + tower.positional_embedding[:length].to(cast_dtype)
    if attn_mask is not None:
        attn_mask = attn_mask[:length, :length]
    x = tower.ln_final(tower.transformer(x, attn_mask=attn_mask))
    tokens = F.normalize(_project(tower, x), dim=-1)
    mask = torch.arange(length, device=ids.device)[None, :] <= pool[:, None]
    sentence = tokens[torch.arange(ids.shape[0], device=ids.device), pool]
    return TextFeatures(tokens=zero_padding(tokens, mask), mask=mask, sentence=sentence,
                        words=zero_padding(words, mask))


class ScorerTextTower(nn.Module):
    """A frozen copy of the text tower for the slow scorer (``scorer.own_text``).

    Distillation trains the student's text tower; the scorer was trained on the token
    features of the tower as it was, so it keeps that copy and reads its own features.
    It has the attributes ``text_token_features`` reads, so it is a tower in its own right.
    """

    _COPIED = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")
    _PLAIN = ("text_pool_type", "pool_type", "text_eos_id", "eos_id")

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        tower = _tower(clip)
        for name in self._COPIED:
            value = getattr(tower, name)
            setattr(self, name, copy.deepcopy(value) if isinstance(value, nn.Module) or value is None
                    else nn.Parameter(value.detach().clone(), requires_grad=value.requires_grad))
        for name in self._PLAIN:
            value = getattr(tower, name, None) if name in ("pool_type", "eos_id") else getattr(clip, name, None)
            if value is not None:
                setattr(self, name, value)
        mask = getattr(tower, "attn_mask", None)
        self.register_buffer("attn_mask", None if mask is None else mask.detach().clone(), persistent=False)

    @torch.no_grad()
    def copy_from(self, clip: nn.Module) -> None:
        """Take the current weights of ``clip``'s text tower (before distillation moves it)."""
        tower = _tower(clip)
        own = self.state_dict()
        own.update({k: v for k, v in tower.state_dict().items() if k in own})
        self.load_state_dict(own, strict=True)
