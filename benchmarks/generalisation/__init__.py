"""An independent generalisation set for the final report: a second renderer of the
synthetic benchmark's vocabulary, written apart from the training renderer.

    python -m benchmarks.generalisation --out DIR --n N --seed S

Rule: this set is used **only for the final report**. Never train on it, select
models, tune or gate with it; the trainer's loader refuses it (every video is in
split ``test``). Nothing under shared/ or services/ may import this package
(tests/test_generalisation_set.py checks). See README.md here for what differs
from the training renderer.
"""
from __future__ import annotations

from .plan import plan_set
from .writer import GeneralisationError, generate_set

__all__ = ["GeneralisationError", "generate_set", "plan_set"]
