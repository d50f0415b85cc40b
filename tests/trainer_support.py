"""Helpers shared by the trainer tests: a synthetic dataset, run configs, a TrainResult
built from real pieces, and the untrained model's recall on a run's eval split."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import logging

import pytest
import yaml

from vidsearch.synth import generate_dataset

PRESET = "tiny-afa"


@pytest.fixture(autouse=True)
def keep_logging():
    """`vidsearch.cli.main` points the root logger at the stderr of the moment (capsys's, in a
    test); put the previous handlers back so later log lines don't hit a closed capture."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def write_synth(out: Path, n: int = 60, seed: int = 1) -> Path:
    """A synthetic dataset with val and test splits large enough to measure recall on."""
    generate_dataset(out, n=n, seed=seed, val_frac=0.2, test_frac=0.2, progress=False)
    return out


def base_config(run_dir: Path, data_path: Path, registry: Path | None = None, **sections: Any) -> dict[str, Any]:
    """A small run config (tiny model, few steps, one CPU worker); ``sections`` are deep-merged."""
    config: dict[str, Any] = {
        "name": "test", "seed": 0, "run_dir": str(run_dir),
        "log_every": 5, "checkpoint_every": 10, "eval_every": 1000,
        "model": {"preset": PRESET},
        "data": {"kind": "synth", "path": str(data_path)},
        "augment": {"views": 2},
        "stages": {"backbone": {"steps": 12, "batch_size": 16},
                   "teacher": {"steps": 8, "batch_size": 8},
                   "distill": {"steps": 8, "batch_size": 8}},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1},
        "evaluate": {"rerank_k": [10]},
        "publish": {"enabled": False} if registry is None else
                   {"enabled": True, "registry": str(registry), "model_name": "vidsearch", "reindex": "never"},
    }
    return merge(config, sections)


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def untrained_recall(run_dir: Path, split: str, seed: int = 0) -> dict[str, dict[str, float]]:
    """evaluate_model rows of the untrained preset model on a finished run's eval split
    (the same frames, captions and twins the run was evaluated on)."""
    from vidsearch.models import build_model, load_model_config
    from vidsearch.services.trainer.evaluate import evaluate_model
    from vidsearch.services.trainer.worker import _eval_set

    data = read_json(Path(run_dir) / "data.json")
    model = build_model(load_model_config(PRESET), device="cpu", seed=seed)
    return evaluate_model(model, _eval_set(model, data[split], seed), rerank_k=(), beta=0.0)
