"""benchmarks/generalisation: the second, independent renderer of the final report.

A dozen videos are written once through the CLI, then decoded with the project's
decoder and read with the project's loaders; twins are checked against what they
claim from the decoded pixels (a direction twin's object really moves the other
way). Product code must never import the set, and the set must never use the
training renderer.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.generalisation import generate_set  # noqa: E402
from benchmarks.generalisation.vocab import BACKWARDS, MOVES  # noqa: E402
from vidsearch.config import DecodeSettings  # noqa: E402
from vidsearch.synth import load_manifest  # noqa: E402
from vidsearch.video import decode_video  # noqa: E402

N, SEED = 12, 3


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.generalisation", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def genset(tmp_path_factory):
    out = tmp_path_factory.mktemp("genset")
    done = cli("--out", str(out), "--n", str(N), "--seed", str(SEED), "--no-progress")
    assert done.returncode == 0, done.stderr[-2000:]
    records = load_manifest(out)
    return out, records, {r.video_id: r for r in records}


def all_frames(out: Path, record) -> np.ndarray:
    """Every frame of a video, through the project's decoder."""
    count = int(record.metadata["num_frames"])
    settings = DecodeSettings(allowed_prefixes=[str(out)], seek_mode="exact", num_frames=count, max_frames=count)
    decoded = decode_video(record.uri, settings, num_frames=count)
    assert decoded.num_frames == count
    return decoded.frames.astype(np.float32)


def colour_mask(frames: np.ndarray, rgb) -> np.ndarray:
    return np.linalg.norm(frames - np.asarray(rgb, dtype=np.float32), axis=-1) < 50.0


def pairs(records, by_id, relation: str):
    """(base, twin) records for every base whose hard negative has this relation (prefix)."""
    return [(r, by_id[n["video_id"]]) for r in records if r.variant == "base"
            for n in r.hard_negatives if n["relation"].startswith(relation)]


def event_window(event: dict) -> tuple[int, int]:
    return int(event["start_frame"]), int(event["end_frame"])


# ---------------------------------------------------------------- the files

def test_cli_refuses_a_non_empty_out_in_one_line(genset):
    out, records, _ = genset
    before = (out / "manifest.jsonl").read_bytes()
    done = cli("--out", str(out), "--n", "2")
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "--overwrite" in done.stderr
    assert (out / "manifest.jsonl").read_bytes() == before


def test_decoded_videos_vary_in_size_rate_and_length(genset):
    out, records, _ = genset
    shapes, rates = set(), set()
    for record in records:
        settings = DecodeSettings(allowed_prefixes=[str(out)], seek_mode="exact", num_frames=3)
        decoded = decode_video(record.uri, settings, num_frames=3)
        meta = record.metadata
        assert (decoded.width, decoded.height) == (meta["width"], meta["height"])
        assert decoded.frames.shape[1:] == (meta["height"], meta["width"], 3)
        assert abs(decoded.fps - meta["fps"]) < 0.05
        assert 2.4 <= meta["duration"] <= 5.1
        shapes.add((decoded.width, decoded.height))
        rates.add(meta["fps"])
    assert len(shapes) >= 3 and len(rates) >= 3
    assert len({w / h for w, h in shapes}) >= 2  # aspect ratios too, not only scale


def test_the_project_loaders_read_it_and_the_trainer_refuses_it(genset):
    out, records, by_id = genset
    from vidsearch.services.trainer.datasets import DatasetSource, TrainingVideo, load_dataset, trusting_dataset_root
    from vidsearch.services.trainer.errors import TrainingError

    assert len(records) == N and {r.split for r in records} == {"test"}
    source = DatasetSource(kind="synth", path=str(out))
    # The loader parses and validates every line (ids, captions, uris, files) before
    # it looks for train videos; reaching that last check means all of it passed.
    with pytest.raises(TrainingError, match=rf"no train videos \({N} video\(s\) in total\)"):
        load_dataset(source, trusting_dataset_root(DecodeSettings(), source))
    # How benchmarks/quality.py turns a test-only synth set into evaluation input.
    videos = [TrainingVideo(video_id=r.video_id, uri=r.uri, captions=tuple(r.captions), split="test",
                            events=tuple(r.events), hard_negatives=tuple(r.hard_negatives), variant=r.variant)
              for r in records]
    index = {v.video_id: i for i, v in enumerate(videos)}
    twins = [[(index[n["video_id"]], n["relation"]) for n in v.hard_negatives] for v in videos]
    assert sum(len(t) for t in twins) > 0
    for record in records:
        assert 3 <= len(record.captions) <= 4 and len(set(record.captions)) == len(record.captions)
        for event in record.events:
            assert event["phrase"].startswith("a ") and 0 <= event["start_s"] < event["end_s"]
            assert event["end_s"] <= record.metadata["duration"] + 1e-6
        for negative in record.hard_negatives:  # symmetric, same family
            twin = by_id[negative["video_id"]]
            assert twin.family == record.family
            assert {"video_id": record.video_id, "relation": negative["relation"]} in twin.hard_negatives


def test_every_relation_is_there_and_differs_as_named(genset):
    _, records, by_id = genset
    for relation in ("reversed", "direction", "swap:"):
        assert pairs(records, by_id, relation), relation
    for base, twin in pairs(records, by_id, ""):
        assert set(base.captions).isdisjoint(twin.captions)
        keys = [[(e["shape"], e["colour"], e["size"], e["action"]) for e in r.events] for r in (base, twin)]
        if twin.variant == "reversed":
            assert keys[1] == keys[0][::-1]
            duration = base.metadata["num_frames"]
            assert [event_window(e) for e in twin.events] == [
                (duration - e["end_frame"], duration - e["start_frame"]) for e in base.events[::-1]]
        elif twin.variant == "direction":
            changed = [i for i, (a, b) in enumerate(zip(*keys)) if a != b]
            assert len(changed) == 1
            a, b = base.events[changed[0]], twin.events[changed[0]]
            assert BACKWARDS[a["action"]] == b["action"] and (a["shape"], a["colour"]) == (b["shape"], b["colour"])
            assert a["start_xy"] == b["end_xy"] and a["end_xy"] == b["start_xy"]
        else:
            attribute = twin.variant.split(":", 1)[1]
            field = {"colour": 1, "shape": 0, "size": 2}[attribute]
            diffs = [(i, j) for i, (a, b) in enumerate(zip(*keys)) for j in range(4) if a[j] != b[j]]
            assert [j for _, j in diffs] == [field]


# ---------------------------------------------------------------- the pixels

def _measure(frames: np.ndarray, event: dict) -> float:
    """The signed change an action makes, from pixels of the event's colour: the centroid's
    travel along the move axis (pixels), or the late/early area ratio as a log."""
    start, stop = event_window(event)
    mask = colour_mask(frames[start:stop], event["rgb"])
    span = max(2, (stop - start) // 5)
    early, late = mask[:span], mask[-span:]
    if event["action"] in MOVES:
        dx, dy = MOVES[event["action"]]
        axis = 2 if dx else 1
        def centre(part):
            return float(np.nonzero(part)[axis].mean())
        return centre(late) - centre(early)
    return float(np.log((late.sum() + 1.0) / (early.sum() + 1.0)))


EXPECTED_SIGN = {"left": -1, "up": -1, "right": 1, "down": 1, "shrink": -1, "disappear": -1, "grow": 1, "appear": 1}


def test_direction_twins_really_play_the_event_backwards(genset):
    out, records, by_id = genset
    checked = 0
    for base, twin in pairs(records, by_id, "direction"):
        index = twin.metadata["change"]["event"]
        before, after = base.events[index], twin.events[index]
        forward, backward = _measure(all_frames(out, base), before), _measure(all_frames(out, twin), after)
        # Both travel clearly, in opposite directions, each the way its action says.
        assert np.sign(forward) == EXPECTED_SIGN[before["action"]] and abs(forward) > 0.3, (before, forward)
        assert np.sign(backward) == EXPECTED_SIGN[after["action"]] and abs(backward) > 0.3, (after, backward)
        checked += 1
    assert checked >= 2


def test_reversed_twins_show_the_events_in_the_other_order(genset):
    out, records, by_id = genset
    for base, twin in pairs(records, by_id, "reversed"):
        order = []
        for record in (base, twin):
            frames = all_frames(out, record)
            # When each event's object is on screen, on average (frame index).
            times = []
            for event in record.events:
                counts = colour_mask(frames, event["rgb"]).sum(axis=(1, 2))
                times.append(float((np.arange(len(counts)) * counts).sum() / max(counts.sum(), 1)))
            order.append([record.events[i]["colour"] for i in np.argsort(times)])
        assert order[1] == order[0][::-1]


def test_swap_twins_differ_only_in_the_changed_event(genset):
    out, records, by_id = genset
    for base, twin in pairs(records, by_id, "swap:"):
        change = twin.metadata["change"]
        start, stop = event_window(base.events[change["event"]])
        a, b = all_frames(out, base), all_frames(out, twin)
        # Pixels that differ clearly, per frame: the codec shifts noise a little, not by 40.
        changed = (np.abs(a - b).max(axis=-1) > 40).sum(axis=(1, 2))
        assert np.percentile(changed[start:stop], 75) >= 10, (twin.variant, changed.tolist())
        if base.events[change["event"]]["hold"] == "none":
            # Same backdrop, same noise frame for frame: where the twins show the same, they match.
            # (The codec may code a frame after the change a little differently: a few pixels.)
            limit = max(6.0, 0.1 * float(np.median(changed[start:stop])))
            assert np.r_[changed[:start], changed[stop:], 0].max() <= limit, (twin.variant, changed.tolist())
        old, new = base.events[change["event"]], twin.events[change["event"]]
        if change["attribute"] == "colour":
            assert colour_mask(b[start:stop], new["rgb"]).sum() > 20
            assert colour_mask(a[start:stop], new["rgb"]).sum() < 5
        if change["attribute"] == "size":
            area = [colour_mask(f[start:stop], e["rgb"]).sum() for f, e in ((a, old), (b, new))]
            assert (area[1] > 1.8 * area[0]) == (new["size"] == "big"), area


# ---------------------------------------------------------------- determinism and separation

def test_same_seed_same_set_and_a_smaller_set_is_a_prefix(genset, tmp_path):
    out, _, _ = genset
    manifest = generate_set(tmp_path / "again", 4, SEED, progress=False)  # the first family, whole
    first = (out / "manifest.jsonl").read_text().splitlines()[:4]
    assert manifest.read_text().splitlines() == first
    for line in first:
        path = json.loads(line)["path"]
        assert (tmp_path / "again" / path).read_bytes() == (out / path).read_bytes()


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_product_code_never_imports_the_set_and_the_set_never_uses_the_training_renderer():
    for folder in ("shared", "services"):
        for path in sorted((REPO / folder).rglob("*.py")):
            bad = [n for n in _imports(path) if n.split(".")[0] in ("benchmarks", "generalisation")]
            assert not bad, f"{path.relative_to(REPO)} imports {bad}"
    training = ("vidsearch.synth", "vidsearch.synth_scenes", "vidsearch.synth_long")
    for path in sorted((REPO / "benchmarks" / "generalisation").rglob("*.py")):
        bad = [n for n in _imports(path) if n in training or n.startswith(tuple(t + "." for t in training))]
        assert not bad, f"{path.relative_to(REPO)} imports {bad}"
