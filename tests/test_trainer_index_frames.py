"""Training from the live index's stored frames (data.frames=index), then publish and re-index.

Videos are ingested through Kafka by a real worker into the embedded store, then their
files are deleted: training reads the stored `frames` multivectors (no video can be
decoded), publishes a new head for the same frame encoder, and `publish.reindex: always`
rebuilds the index from stored frames and flips the alias to the new version.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from ingest_support import make_settings
from reindex_support import PRESET, WorkerThread, produce, publish_first, registry_of, upsert, wait_for
from vidsearch.models.persist import PRODUCTION_ALIAS
from vidsearch.services.trainer.config import parse_run_config
from vidsearch.services.trainer.errors import TrainingError
from vidsearch.services.trainer.job import run_training
from vidsearch.services.trainer.publish import publish_run
from vidsearch.store import collection_name, open_store
from vidsearch.synth import generate_dataset, load_manifest


@pytest.fixture(scope="module")
def indexed(ray_local, broker, tmp_path_factory):
    root = tmp_path_factory.mktemp("index-frames")
    generate_dataset(root / "synth", 24, seed=5, progress=False)
    settings = make_settings(bootstrap=broker.bootstrap, store_path=root / "store", video_root=root / "synth",
                             registry=root / "registry")
    first = _publish_noisy_head(settings)
    records = load_manifest(root / "synth")
    worker = WorkerThread(settings)
    try:
        produce(settings, [upsert(r.video_id, r.path) for r in records])
        store = open_store(settings)
        wait_for(lambda: (store.resolve_alias(settings.store.alias) is not None
                          and store.count(collection_name(first, settings.store.alias)) == len(records)),
                 180, "all videos ingested")
    finally:
        worker.stop()
    for record in records:  # from here on nothing can be decoded
        Path(record.path).unlink()
    return settings, first, root


def _publish_noisy_head(settings) -> str:
    """The first version, production, with a broken head (not frame tower) that maps every video
    to the same vector. The run starts from the same seeded base model (so the same frame
    encoder, whose frames the index holds) with a working head, and beats it on val: the gate
    lets it through by construction, whatever a few steps on five val videos do."""
    from vidsearch.models.persist import load_model_version, save_model_version

    first = publish_first(settings)
    registry = registry_of(settings)
    model, _ = load_model_version(registry, settings.model.model_name, first, device="cpu")
    with torch.no_grad():  # every video gets one and the same embedding: student R@1 is 0 (ties rank last)
        model.head.temporal.out.weight.zero_()
        model.head.temporal.out.bias.fill_(2.0 ** 30)
    version = save_model_version(registry, settings.model.model_name, model, training={"note": "noisy head"})
    registry.set_alias(settings.model.model_name, PRODUCTION_ALIAS, version)
    return version


def _config(root: Path, **publish: object) -> dict:
    return {"name": "index", "seed": 0, "run_dir": str(root / "run"), "log_every": 5, "checkpoint_every": 50,
            "eval_every": 50, "model": {"preset": PRESET},
            "data": {"kind": "synth", "path": str(root / "synth"), "frames": "index"},
            # What is under test is reading the index's frames and re-indexing from them: the
            # student stage is InfoNCE on the head alone (a 6-step teacher has
            # nothing to teach), and the gate asks only for a better student, not a margin.
            "stages": {"backbone": {"enabled": False}, "teacher": {"steps": 6, "batch_size": 8},
                       "distill": {"steps": 30, "batch_size": 8, "lr": 0.005, "baseline": False, "train_text": False,
                                   "in_weight": 1.0, "alpha": 0.0, "gamma": 0.0}},
            "scaling": {"num_workers": 1, "cpus_per_worker": 1},
            "publish": {"registry": str(root / "registry"), "gate_se_k": 0.0, "gate_rerank_metric": None,
                        **publish}}


def test_training_reads_stored_frames_and_reindexes_without_decoding(indexed):
    settings, first, root = indexed
    cfg = parse_run_config(_config(root, reindex="always"))
    result = run_training(cfg, settings, progress=False)
    assert result.frame_encoder == registry_of(settings).get_manifest(settings.model.model_name, first).frame_encoder
    assert not (Path(cfg.run_dir) / "cache" / "train").exists()
    assert any(p.name.startswith("train-index-") for p in (Path(cfg.run_dir) / "cache").iterdir())
    outcome = publish_run(result, settings, progress=False)
    assert outcome.reindexed and outcome.parent == first
    store = open_store(settings)
    assert store.resolve_alias(settings.store.alias) == collection_name(outcome.version, settings.store.alias)
    assert store.count(collection_name(outcome.version, settings.store.alias)) == 24
    assert registry_of(settings).get_alias(settings.model.model_name, PRODUCTION_ALIAS) == outcome.version


def test_index_frames_need_a_frozen_frame_tower_and_known_videos(indexed, tmp_path):
    settings, _, root = indexed
    data = _config(root)
    data["stages"]["backbone"] = {"enabled": True}
    with pytest.raises(TrainingError, match="data.frames: 'index' needs a frozen frame tower"):
        parse_run_config(data)
    # A dataset whose videos were never ingested: one line naming the first missing video.
    generate_dataset(tmp_path / "other", 6, seed=77, progress=False)
    other = _config(root)
    other["run_dir"] = str(tmp_path / "run")
    other["data"]["path"] = str(tmp_path / "other")
    with pytest.raises(TrainingError, match=r"video\(s\) are not in .* \(first: synth-s77-"):
        run_training(parse_run_config(other), settings, progress=False)
    assert yaml.safe_load((tmp_path / "run" / "run.yaml").read_text())["data"]["frames"] == "index"
