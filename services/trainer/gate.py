"""The numbers the publish gate needs besides the metrics: the identity of the val data,
per-query ranks and their bootstrap standard errors.

- :func:`val_data_hash` names the val data a run's metrics were computed on, so the
  gate compares against production's recorded numbers only when they were measured
  on the same queries.
- :func:`bootstrap_se` is the standard error of a metric under resampling the queries
  (captions) with replacement: the gate's margin is a multiple of it, so a win inside
  the val set's own noise is not a win.

Shared by the worker (which records the standard errors with the metrics) and
:mod:`publish` (which re-evaluates production on the new run's val data).
"""
from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Iterable, Mapping

import numpy as np

from vidsearch.retrieval_metrics import bootstrap_metric, ranks

from .evaluate import EvalSet, rerank_similarity, student_matrix, teacher_matrix

# The full state dict of the non-distilled student (final/ and, when published, the version).
BASELINE_MODEL_FILE = "baseline_model.safetensors"
BASELINE_PREFIX = "baseline_"
SE_SUFFIX = ".se"
BOOTSTRAP_SAMPLES = 1000
# Fixed, so the same run always records the same standard errors.
BOOTSTRAP_SEED = 0
DEFAULT_RERANK_DEPTH = 20

_METRIC = re.compile(r"^(?P<split>[^.]+)\.(?P<row>[^.]+)\.(?P<metric>R@\d+|MdR|MnR)$")


def val_data_hash(split: Mapping[str, Any]) -> str:
    """sha256 hex of the split's sorted (video_id, captions): the queries and the corpus the
    metrics rank over. Frames are left out on purpose: they depend on the model's input
    size and frame count, while the question "same data?" is about the videos and captions
    (a video id names one file of a dataset). Order-independent; any caption change counts."""
    rows = sorted((str(v), [str(c) for c in caps]) for v, caps in zip(split["video_ids"], split["captions"]))
    return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()


def split_metric(name: str) -> tuple[str, str, str] | None:
    """("val", "rerank@20", "R@1") for "val.rerank@20.R@1"; None for names without per-query
    ranks (twin accuracy, moment accuracy)."""
    match = _METRIC.match(name)
    return (match["split"], match["row"], match["metric"]) if match else None


def rerank_gate_metric(setting: str | None, rerank_k: Iterable[int]) -> str | None:
    """The re-ranked metric the gate checks: the setting, or for ``auto`` val rerank@20 R@1
    when that depth is evaluated; None when the check is off."""
    if setting != "auto":
        return setting
    return f"val.rerank@{DEFAULT_RERANK_DEPTH}.R@1" if DEFAULT_RERANK_DEPTH in set(rerank_k) else None


def query_ranks(model: Any, data: EvalSet, rows: Iterable[str], beta: float,
                slow: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per-query rank of the right video for each of ``rows`` ("student", "teacher",
    "rerank@K"), with the same matrices and fusion :func:`evaluate.evaluate_model` uses
    (``slow``: the model's teacher matrix when the caller has it)."""
    rows = set(rows)
    was_training = model.training
    model.eval()
    try:
        texts, owners = data.queries()
        student = student_matrix(model, data, texts)
        out = {"student": ranks(student, owners)} if "student" in rows else {}
        if rows - {"student"}:
            slow = teacher_matrix(model, data, texts) if slow is None else slow
            if "teacher" in rows:
                out["teacher"] = ranks(slow, owners)
            for row in rows:
                if row.startswith("rerank@"):
                    out[row] = ranks(rerank_similarity(student, slow, int(row.split("@", 1)[1]), beta), owners)
        return out
    finally:
        model.train(was_training)


def bootstrap_se(rank_values: np.ndarray, metric: str, samples: int = BOOTSTRAP_SAMPLES,
                 seed: int = BOOTSTRAP_SEED) -> float:
    """Standard error of ``metric`` (R@k in percent, MdR or MnR) over ``samples`` bootstrap
    resamples of the queries."""
    values = np.asarray(rank_values)
    if values.size < 2:
        return 0.0
    return float(bootstrap_metric(values, metric, samples=samples, seed=seed).std(ddof=1))


def se_metrics(split: str, row_ranks: Mapping[str, np.ndarray], prefix: str = "",
               metrics: Iterable[str] = ("R@1", "R@5", "R@10", "MdR", "MnR")) -> dict[str, float]:
    """{"val.student.R@1.se": ...} for every row and metric: the names flatten_metrics uses, plus ``.se``."""
    return {f"{split}.{prefix}{row}.{metric}{SE_SUFFIX}": bootstrap_se(values, metric)
            for row, values in row_ranks.items() for metric in metrics}


def published_metrics(metrics: Mapping[str, float], which: str) -> dict[str, float]:
    """The metrics under the names the published model answers to.

    For the distilled student, unchanged. For the baseline, its ``<split>.baseline_*`` values
    take the plain names (what the next gate reads as production's) and the distilled
    student's values move to ``<split>.distilled_*``, so both stay on record.
    """
    out = dict(metrics)
    if which != "baseline":
        return out
    for key, value in metrics.items():
        split, _, rest = key.partition(".")
        if rest.startswith(BASELINE_PREFIX):
            plain = f"{split}.{rest[len(BASELINE_PREFIX):]}"
            if plain in metrics:
                out[f"{split}.distilled_{plain.split('.', 1)[1]}"] = metrics[plain]
            out[plain] = value
    return out
