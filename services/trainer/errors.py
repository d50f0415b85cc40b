"""The trainer's user-facing failure type."""
from __future__ import annotations


class TrainingError(ValueError):
    """A bad input to training (manifest, split, preset, option); the message is one line."""
