"""Video-text models: open_clip frame/text encoders, fast video heads, slow scorers.

``build_model(load_model_config("tiny"))`` is the one way to make a model; see
``config.py`` for the declarative configs and ``presets/`` for the named ones.
"""
from .config import (ClipConfig, HeadConfig, ModelConfig, ScorerConfig, config_hash, list_presets,
                     load_model_config)
from .factory import build_model
from .text import TextFeatures
from .video_text_model import VideoTextModel

__all__ = [
    "ClipConfig", "HeadConfig", "ModelConfig", "ScorerConfig", "TextFeatures", "VideoTextModel",
    "build_model", "config_hash", "list_presets", "load_model_config",
]
