"""The one factory: every VideoTextModel is built from a ModelConfig here."""
from __future__ import annotations

import uuid
from pathlib import Path

import open_clip
import torch

from .clip_loader import clip_label, load_clip
from .config import ModelConfig, load_model_config
from .heads import build_head
from .runtime import resolve_device
from .scorers import build_scorer
from .text import check_text_tower
from .video_text_model import VideoTextModel


def _frame_encoder_id(config: ModelConfig, weights_id: str, seed: int | None) -> str:
    label = clip_label(config.clip)
    if weights_id:
        return f"open_clip:{label}:{weights_id}"
    if seed is not None:
        return f"open_clip:{label}:seed:{seed}"
    # Unseeded random weights are unique to this build: never let two of them share an id.
    return f"open_clip:{label}:random:{uuid.uuid4().hex[:12]}"


def _build(config: ModelConfig, seed: int | None, load_weights: bool) -> VideoTextModel:
    loaded = load_clip(config.clip, load_weights=load_weights)
    check_text_tower(loaded.model)
    embed_dim = int(open_clip.get_model_config(loaded.open_clip_name)["embed_dim"])
    max_text = int(getattr(loaded.tokenizer, "context_length", 77))
    head = build_head(config.head, embed_dim)
    word_width = loaded.model.token_embedding.embedding_dim if hasattr(loaded.model, "token_embedding") \
        else loaded.model.text.token_embedding.embedding_dim
    scorer = build_scorer(config.scorer, embed_dim, max_text, word_width)
    return VideoTextModel(config, loaded.model, loaded.tokenizer, head, scorer, embed_dim,
                          _frame_encoder_id(config, loaded.weights_id, seed))


def build_model(config: ModelConfig | str | Path, device: str | torch.device | None = None,
                seed: int | None = None, *, load_weights: bool = True) -> VideoTextModel:
    """Build a model from a config, a preset name or a JSON config path.

    ``seed`` makes every randomly initialised weight reproducible (the global RNG is
    left untouched). ``load_weights=False`` skips ``clip.pretrained`` (the registry
    loader replaces all weights anyway). ``device`` None means ``auto``. The model is
    returned in eval mode.
    """
    if not isinstance(config, ModelConfig):
        config = load_model_config(config)
    target = resolve_device("auto" if device is None else device)
    if seed is None:
        model = _build(config, None, load_weights)
    else:
        # Build on the CPU inside a forked RNG, so the same seed gives the same
        # weights on every machine and device.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _build(config, seed, load_weights)
    return model.to(target).eval()
