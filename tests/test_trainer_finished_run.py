"""A finished run is published without training or evaluating again, and only when its config
(publish settings aside) is the one it was trained with."""
from __future__ import annotations

import logging

from vidsearch.config import load_settings
from vidsearch.services.trainer.config import parse_run_config
from vidsearch.services.trainer.job import run_training

from trainer_support import base_config, keep_logging, merge, write_synth  # noqa: F401

STAGES = {"backbone": {"steps": 6, "batch_size": 16}, "teacher": {"steps": 4, "batch_size": 8},
          "distill": {"steps": 4, "batch_size": 8}}


def test_a_finished_run_goes_straight_to_its_results_until_its_training_config_changes(tmp_path, caplog):
    synth = write_synth(tmp_path / "synth", n=40, seed=3)
    config = base_config(tmp_path / "run", synth, name="finished", stages=STAGES)
    first = run_training(parse_run_config(config), load_settings(None), progress=False)
    metrics_file = first.run_dir / "final" / "metrics.json"
    written = metrics_file.stat().st_mtime_ns

    # Other publish settings: the same run, nothing trained or evaluated again.
    caplog.set_level(logging.INFO, logger="vidsearch.services.trainer.job")
    again = run_training(parse_run_config(merge(config, {"publish": {"gate_se_k": 2.0}})), load_settings(None),
                         progress=False)
    assert "run already finished" in caplog.text
    assert again.metrics == first.metrics and metrics_file.stat().st_mtime_ns == written
    assert again.config.publish.gate_se_k == 2.0

    # Another evaluation setting: the run resumes its (finished) checkpoints and evaluates again.
    caplog.clear()
    more = run_training(parse_run_config(merge(config, {"evaluate": {"rerank_k": [5]}})), load_settings(None),
                        progress=False)
    assert "run already finished" not in caplog.text
    assert metrics_file.stat().st_mtime_ns > written
    assert "val.rerank@5.R@1" in more.metrics and "val.rerank@5.R@1" not in first.metrics
