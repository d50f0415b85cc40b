"""The data and the comparison models of ``quality.py``: its three evaluation sets (the
training renderer's test split, the perturbed development set, the independent
generalisation set), their frozen frame features, and the dual encoders it compares
(meanP, a seqTransf head trained here, the non-distilled student of the version).

Imported as ``quality_sets`` from ``benchmarks/*.py`` (their directory is first on
``sys.path``). Nothing here tunes on test or generalisation data: the only training
(the seqTransf head) uses the training split.
"""
from __future__ import annotations

import copy
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common import CACHE_DIR, REPO_ROOT

# Set keys, in report order, and their honest names.
SET_TITLES = {
    "test": "Test split (the training renderer's held-out split; twins included)",
    "development": "Development set (perturbed; used to design augmentations, so not held out): 96 px, 12 fps, "
                   "noise, other shades and backgrounds, held-out caption templates",
    "generalisation": "Generalisation set (an independent second renderer, benchmarks/generalisation; final report "
                      "only)",
}
PERTURBED_SEED = 9001
GENERALISATION_N = 300
# Fixed once for the final report; never changed to move a number.
GENERALISATION_SEED = 20261207


# --------------------------------------------------------------------------- the development set
def heldout_caption(events: list[dict], variant: int) -> str:
    """Captions in templates no training caption uses, from words the training captions do use."""
    phrases = [e["phrase"] for e in events]
    if len(phrases) == 2:
        a, b = phrases
        forms = (f"{a} and then {b}", f"before {b}, {a}", f"{a}, afterwards {b}", f"{b}, after {a}")
    else:
        a, b, c = phrases
        forms = (f"{a}, then {b}, then {c}", f"{a} and then {b}, and finally {c}",
                 f"first {a}; then {b}; finally {c}", f"{a}, afterwards {b}, then {c}")
    text = forms[variant % len(forms)]
    return text[0].upper() + text[1:]


PERTURBATIONS = ("size", "fps", "background", "shades", "noise", "captions")


def write_perturbed(out: Path, n: int, seed: int, factors: tuple[str, ...] = PERTURBATIONS) -> Path:
    """A test set unlike the training data: 96 px, 12 fps, brighter backgrounds, other
    shades, noise and new caption templates (``factors`` picks which of those apply;
    the random draws are the same whichever apply, so sets differ only in those)."""
    from vidsearch.synth import MANIFEST_NAME, VIDEOS_DIR, _records, render_video
    from vidsearch.synth_scenes import plan_dataset
    from vidsearch.video_writer import write_video

    unknown = set(factors) - set(PERTURBATIONS)
    if unknown:
        raise ValueError(f"unknown perturbations {sorted(unknown)}; known: {', '.join(PERTURBATIONS)}")
    manifest = out / MANIFEST_NAME
    if manifest.is_file():
        return manifest
    size = 96 if "size" in factors else 64
    fps, seconds = (12.0 if "fps" in factors else 8.0), 3.0
    specs = plan_dataset(n, seed, int(fps * seconds))
    records = _records(specs, seed, ["test"] * len(specs), fps, size)
    rng = np.random.default_rng(seed)
    (out / VIDEOS_DIR).mkdir(parents=True, exist_ok=True)
    for spec, record in zip(specs, records):
        frames = render_video(spec, size).astype(np.float32)
        background = frames == float(spec.background)
        lift = rng.uniform(20, 45)  # brighter backgrounds than training's 16..72 grey
        shades = rng.uniform(0.88, 1.12, size=(1, 1, 1, 3))  # shades of each colour
        noise = rng.normal(0, 6.0, size=frames.shape)  # sensor noise
        if "background" in factors:
            frames[background] += lift
        if "shades" in factors:
            frames *= shades
        if "noise" in factors:
            frames += noise
        write_video(out / record.path, frames.clip(0, 255).astype(np.uint8), fps=fps)
        if "captions" in factors:
            record.captions = [heldout_caption(record.events, v) for v in range(3)]
    with manifest.open("w") as handle:
        for record in records:
            handle.write(json.dumps(record.to_json()) + "\n")
    return manifest


# --------------------------------------------------------------------------- the other sets
def training_dataset(manifest_training: dict, quick: bool = False) -> Path:
    """The synthetic dataset the version was trained on: the run's own directory when it is
    still there and its data hash is the one recorded, else regenerated from the recorded
    generator arguments (deterministic) under .bench/."""
    from vidsearch.config import load_settings
    from vidsearch.services.trainer.datasets import DatasetSource, data_hash, load_dataset, trusting_dataset_root
    from vidsearch.services.trainer.errors import TrainingError
    from vidsearch.synth import generate_dataset

    recorded = ((manifest_training.get("run_config") or {}).get("data") or {}).get("path")
    if recorded and Path(recorded).is_dir() and manifest_training.get("data_hash"):
        source = DatasetSource(kind="synth", path=recorded)
        try:
            videos = load_dataset(source, trusting_dataset_root(load_settings().decode, source))
        except TrainingError:
            videos = []
        if videos and data_hash(videos) == manifest_training["data_hash"]:
            return Path(recorded)
    info = manifest_training.get("data_info") or {}
    if not info:
        sys.exit("quality: the version's manifest records no synthetic generator arguments (training.data_info)")
    domain = info.get("domain", "classic")  # synth.json before the randomised domain has no field
    root = CACHE_DIR / f"quality-train-{domain}-n{info['n']}-s{info['seed']}"
    if not (root / "manifest.jsonl").is_file():
        generate_dataset(root, info["n"], info["seed"], size=info["size"], fps=info["fps"], seconds=info["seconds"],
                         val_frac=info["val_frac"], test_frac=info["test_frac"], reverse_rate=info["reverse_rate"],
                         swap_rate=info["swap_rate"], workers=2, overwrite=True, progress=False, domain=domain,
                         direction_rate=info.get("direction_rate"))
    return root


def generalisation_set(n: int = GENERALISATION_N, seed: int = GENERALISATION_SEED) -> Path:
    """The independent renderer's set, written once under .bench/ (same seed, same bytes)."""
    root = CACHE_DIR / f"quality-generalisation-n{n}-s{seed}"
    if not (root / "manifest.jsonl").is_file():  # written last, so its presence means complete
        if str(REPO_ROOT) not in sys.path:
            sys.path.append(str(REPO_ROOT))  # the package lives in benchmarks/, run from its parent
        from benchmarks.generalisation import generate_set

        generate_set(root, n, seed, workers=2, overwrite=True, progress=False)
    return root


def manifest_videos(root: Path) -> list:
    """A synth-layout manifest as TrainingVideo records, all in split test: for the test-only
    sets, which the trainer's loader refuses (it wants a train split)."""
    from vidsearch.services.trainer.datasets import TrainingVideo
    from vidsearch.synth import load_manifest

    return [TrainingVideo(video_id=r.video_id, uri=r.uri, captions=tuple(r.captions), split="test",
                          events=tuple(r.events), hard_negatives=tuple(r.hard_negatives), variant=r.variant)
            for r in load_manifest(root)]


perturbed_videos = manifest_videos  # the name quality_perturbations.py and older scripts use


# --------------------------------------------------------------------------- features
def eval_set(model, videos, decode, cache_dir: Path, label: str):
    """Frozen frame features (and region tokens, for a spatial scorer) of ``videos``, their
    captions and their twins among them."""
    from vidsearch.services.trainer.evaluate import EvalSet
    from vidsearch.services.trainer.frames import build_cache
    from vidsearch.services.trainer.stages import CaptionBank, encode_cache

    size = model.image_size if isinstance(model.image_size, int) else min(model.image_size)
    cache = build_cache(videos, decode, frames=model.config.num_frames, size=size, cache_dir=cache_dir,
                        label=label, progress=False)
    encoded = encode_cache(model, cache, model.config.num_frames, None, 0, 0)
    index = {v.video_id: i for i, v in enumerate(videos)}
    twins = [[(index[n["video_id"]], n["relation"]) for n in v.hard_negatives if n["video_id"] in index]
             for v in videos]
    bank = CaptionBank(captions=[list(v.captions) for v in videos], events=[list(v.events) for v in videos])
    return EvalSet(video_ids=[v.video_id for v in videos], frames=encoded.frames, mask=encoded.mask, bank=bank,
                   twins=twins, times=encoded.times, regions=encoded.regions)


@dataclass
class Sets:
    """The evaluation sets (by key of SET_TITLES), the training split for the seqTransf head,
    and the videos and decode settings behind each (to encode them again with another tower)."""

    eval: dict[str, Any]
    train: Any
    videos: dict[str, tuple[list, Any]]


def build_sets(model, manifest, settings, perturbed_n: int, quick: bool) -> Sets:
    from vidsearch.services.trainer.datasets import DatasetSource, load_dataset, split_videos, trusting_dataset_root

    train_root = training_dataset(manifest.training, quick)
    source = DatasetSource(kind="synth", path=str(train_root))
    trained_on = load_dataset(source, trusting_dataset_root(settings.decode, source))
    perturbed = write_perturbed(CACHE_DIR / f"quality-perturbed-n{perturbed_n}", perturbed_n, PERTURBED_SEED).parent
    general = generalisation_set()
    sources = {"test": (split_videos(trained_on, "test"), train_root),
               "development": (manifest_videos(perturbed), perturbed),
               "generalisation": (manifest_videos(general), general),
               "train": (split_videos(trained_on, "train"), train_root)}
    cache_dir = CACHE_DIR / "quality-cache"
    built, videos = {}, {}
    for name, (rows, root) in sources.items():
        # A test-only set's own root is trusted the way a training dataset's is.
        decode = trusting_dataset_root(settings.decode, DatasetSource(kind="synth", path=str(root)))
        if quick:
            rows = rows[:300 if name == "train" else 60]  # a prefix keeps most twin families whole
        videos[name] = (rows, decode)
        built[name] = eval_set(model, rows, decode, cache_dir, f"{name}-{manifest.version}")
        print(f"quality: {name}: {len(rows)} videos, {sum(len(c) for c in built[name].bank.captions)} captions",
              flush=True)
    train = built.pop("train")
    return Sets(eval=built, train=train, videos=videos)


# --------------------------------------------------------------------------- the dual encoders compared
def with_head(model, head):
    """``model`` with another head (towers and scorer shared)."""
    clone = copy.copy(model)
    torch.nn.Module.__setattr__(clone, "_modules", dict(model._modules))
    clone._modules["head"] = head
    return clone


def baseline_student(registry, model_name: str, manifest, model) -> tuple[Any, str]:
    """The non-distilled student trained in the same run, and where it came from: the whole
    model (``baseline_model.safetensors``: head and text tower, which distillation also
    trains) when the version has it, else the version's towers with ``baseline_head``."""
    from safetensors.torch import load as st_load

    from vidsearch.services.trainer.gate import BASELINE_MODEL_FILE
    from vidsearch.services.trainer.worker import BASELINE_HEAD_FILE

    if BASELINE_MODEL_FILE in manifest.files:
        baseline = copy.deepcopy(model)
        baseline.load_state_dict(st_load(registry.read_file(model_name, manifest.version, BASELINE_MODEL_FILE)),
                                 strict=True)
        return baseline.eval(), BASELINE_MODEL_FILE
    head = copy.deepcopy(model.head)
    head.load_state_dict(st_load(registry.read_file(model_name, manifest.version, BASELINE_HEAD_FILE)))
    return with_head(model, head.eval()), f"{BASELINE_HEAD_FILE} on the version's towers"


def same_frame_tower(a, b) -> bool:
    """Whether two models make the same frame features (then they share one EvalSet)."""
    theirs = b.state_dict()
    return all(k in theirs and v.equal(theirs[k]) for k, v in a.state_dict().items()
               if k.startswith("clip.visual.") or k.startswith("_region_projection"))


def train_seqtransf_head(model, train_set, steps: int, seed: int):
    """A seqTransf head on frozen frame features, InfoNCE only: the non-AFA temporal baseline."""
    from vidsearch.models.config import HeadConfig
    from vidsearch.models.heads import build_head
    from vidsearch.services.trainer.loss import infonce_logits

    cfg = model.config.head
    torch.manual_seed(seed)
    head = build_head(HeadConfig(kind="seqTransf", layers=max(1, cfg.layers), heads=cfg.heads,
                                 max_frames=cfg.max_frames), model.embed_dim)
    optimizer = torch.optim.AdamW(head.parameters(), lr=5e-4, weight_decay=0.05)
    texts, owners = train_set.queries()
    with torch.no_grad():
        text = torch.cat([model.encode_text(texts[i:i + 256]) for i in range(0, len(texts), 256)])
    rng = np.random.default_rng(seed)
    scale = model.clip.logit_scale.exp().detach()
    for _ in range(steps):
        index = rng.choice(len(train_set.video_ids), size=min(64, len(train_set.video_ids)), replace=False)
        caption_rows = [rng.choice(np.flatnonzero(owners == i)) for i in index]
        video, _ = head(train_set.frames[index], train_set.mask[index])
        loss = infonce_logits(scale * (text[caption_rows] @ torch.nn.functional.normalize(video, dim=-1).T))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return head.eval()
