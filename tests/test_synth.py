"""The synthetic benchmark: CLI end to end, real mp4 files, manifest, splits,
determinism, hard negatives, and that the pixels do what the captions say."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import av
import numpy as np
import pytest

from vidsearch.cli import main
from vidsearch.synth import (
    SPLITS, SynthError, assign_splits, generate_dataset, load_manifest, render_video, split_records,
)
from vidsearch.synth_scenes import COLOURS, FLIPS, MOVES, SIZES, clause, plan_dataset

N = 12
FRAMES = 24  # 8 fps x 3 s
SIZE = 64


def decode(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def colour_mask(frames: np.ndarray, colour: str) -> np.ndarray:
    # Lossy yuv420p blurs edges and shifts colours a little; 60 levels keeps the
    # palette colours apart from each other and from the grey background.
    distance = np.abs(frames.astype(np.int16) - np.array(COLOURS[colour], dtype=np.int16)).sum(axis=-1)
    return distance < 60


def centroids(mask: np.ndarray) -> np.ndarray:
    """[T, 2] (x, y) centroid of each frame's mask; every frame must have pixels."""
    ys, xs = np.mgrid[: mask.shape[1], : mask.shape[2]]
    area = mask.sum(axis=(1, 2))
    assert (area > 0).all(), "object missing from some frame"
    return np.stack([(mask * xs).sum(axis=(1, 2)) / area, (mask * ys).sum(axis=(1, 2)) / area], axis=1)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "data"
    assert main(["synth", "--out", str(out), "--n", str(N), "--seed", "0", "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def records(dataset):
    return load_manifest(dataset / "manifest.jsonl")


# ---------------------------------------------------------------- files and manifest

def test_cli_writes_one_decodable_mp4_per_record(dataset, records):
    assert len(records) == N
    assert sorted(p.name for p in (dataset / "videos").iterdir()) == sorted(f"{r.video_id}.mp4" for r in records)
    for record in records:
        frames = decode(record.path)
        assert frames.shape == (FRAMES, SIZE, SIZE, 3)
        with av.open(str(record.path)) as container:
            stream = container.streams.video[0]
            assert (stream.codec_context.name, stream.width, stream.height) == ("h264", SIZE, SIZE)


def test_manifest_stores_relative_paths_and_load_resolves_them(dataset, records):
    raw = [json.loads(line) for line in (dataset / "manifest.jsonl").read_text().splitlines()]
    assert [r["path"] for r in raw] == [f"videos/{r.video_id}.mp4" for r in records]
    assert all(r.path.is_absolute() and r.path.is_file() for r in records)
    assert records[0].uri.startswith("file:///")
    # a directory works as well as the manifest file
    assert [r.path for r in load_manifest(dataset)] == [r.path for r in records]


def test_manifest_records_are_complete(records):
    assert len({r.video_id for r in records}) == N
    for r in records:
        assert 3 <= len(r.captions) <= 5 and len(set(r.captions)) == len(r.captions)
        assert r.split in SPLITS
        meta = r.metadata
        assert meta["title"] and meta["category"] in ("2-events", "3-events")
        assert meta["duration"] == pytest.approx(3.0) and meta["num_frames"] == FRAMES
        assert {e["colour"] for e in r.events} <= set(meta["tags"])
        assert {e["shape"] for e in r.events} <= set(meta["tags"])
        assert 2 <= len(r.events) <= 3
        # events tile the video in order, each at least 3 frames long
        bounds = [(e["start_frame"], e["end_frame"]) for e in r.events]
        assert bounds[0][0] == 0 and bounds[-1][1] == FRAMES
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        assert all(end - start >= 3 for start, end in bounds)


def test_captions_state_the_event_order(records):
    order_words = ("then", "after", "before", "followed by", "next")
    for r in records:
        phrases = [e["phrase"] for e in r.events]
        canonical = f"First {phrases[0]}, then {phrases[1]}"
        if len(phrases) == 3:
            canonical += f", and finally {phrases[2]}"
        assert r.captions[0] == canonical
        assert all(any(w in c.lower() for w in order_words) for c in r.captions)


# ---------------------------------------------------------------- splits

def test_splits_cover_every_record_and_keep_families_together(records):
    parts = {s: split_records(records, s) for s in SPLITS}
    assert all(parts.values()), {s: len(p) for s, p in parts.items()}
    assert sorted(r.video_id for p in parts.values() for r in p) == sorted(r.video_id for r in records)
    for family in {r.family for r in records}:
        assert len({r.split for r in records if r.family == family}) == 1


def test_split_sizes_follow_the_fractions():
    specs = plan_dataset(400, 3, FRAMES)
    counts = Counter(assign_splits(specs, 3, 0.1, 0.2))
    # a family of up to 3 videos may overshoot its split's target
    assert 80 <= counts["test"] <= 82 and 40 <= counts["val"] <= 42
    assert counts["train"] == 400 - counts["test"] - counts["val"]
    assert Counter(assign_splits(specs, 3, 0.0, 0.0)) == {"train": 400}


def test_split_records_rejects_an_unknown_split(records):
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        split_records(records, "dev")


# ---------------------------------------------------------------- determinism

def test_same_seed_gives_identical_manifest_and_frames(dataset, records, tmp_path):
    # a second run, in 2 worker processes, must not change anything
    again = generate_dataset(tmp_path / "again", N, 0, workers=2)
    assert again.read_bytes() == (dataset / "manifest.jsonl").read_bytes()
    for first, second in zip(records, load_manifest(again)):
        expected = render_video(first.spec(), SIZE)
        assert np.array_equal(expected, render_video(second.spec(), SIZE))
        # each file holds those frames, up to lossy compression
        for path in (first.path, second.path):
            error = np.abs(decode(path).astype(np.int16) - expected)
            assert error.mean() < 2.0, path


def test_another_seed_gives_another_dataset(dataset, tmp_path):
    other = generate_dataset(tmp_path / "other", N, 1)
    assert load_manifest(other)[0].captions != load_manifest(dataset)[0].captions
    assert load_manifest(other)[0].video_id == "synth-s1-00000"


def test_no_two_videos_share_a_description():
    specs = plan_dataset(500, 0, FRAMES)
    assert len({s.key() for s in specs}) == 500
    assert len({s.captions[0] for s in specs}) == 500


# ---------------------------------------------------------------- hard negatives

def _event_content(event: dict) -> tuple:
    return tuple(event[k] for k in ("shape", "colour", "size", "action", "position", "start_xy", "end_xy")) + (
        event["end_frame"] - event["start_frame"],)


def test_reversed_twins_show_the_same_frames_in_the_opposite_order(records):
    by_id = {r.video_id: r for r in records}
    pairs = [(r, by_id[n["video_id"]]) for r in records if r.variant == "base"
             for n in r.hard_negatives if n["relation"] == "reversed"]
    assert pairs, "no reversed-order hard negative in the dataset"
    for base, twin in pairs:
        assert twin.variant == "reversed" and twin.split == base.split
        assert [_event_content(e) for e in twin.events] == [_event_content(e) for e in reversed(base.events)]
        # the same multiset of frames: mean pooling cannot separate them
        base_frames, twin_frames = render_video(base.spec(), SIZE), render_video(twin.spec(), SIZE)
        assert sorted(f.tobytes() for f in base_frames) == sorted(f.tobytes() for f in twin_frames)
        assert not np.array_equal(base_frames, twin_frames)
        assert not set(base.captions) & set(twin.captions)
        first, last = base.events[0]["phrase"], base.events[-1]["phrase"]
        assert base.captions[0].index(first) < base.captions[0].index(last)
        assert twin.captions[0].index(last) < twin.captions[0].index(first)


def test_swap_twins_differ_in_exactly_one_attribute():
    specs = plan_dataset(300, 5, FRAMES)
    bases = {s.family: s for s in specs if s.variant == "base"}
    swaps = [s for s in specs if s.variant.startswith("swap:")]
    assert {s.variant for s in swaps} == {"swap:colour", "swap:shape", "swap:size", "swap:action"}
    for twin in swaps:
        base = bases[twin.family]
        changed = [(a, b) for a, b in zip(base.events, twin.events) if a != b]
        assert len(changed) == 1
        old, new = changed[0]
        attribute = twin.variant.split(":")[1]
        if attribute == "action":
            assert new.action == FLIPS[old.action] and (new.start_xy, new.end_xy) == (old.end_xy, old.start_xy)
        else:
            assert getattr(old, attribute) != getattr(new, attribute)
            assert [f for f in ("shape", "colour", "size") if getattr(old, f) != getattr(new, f)] == [attribute]
        assert clause(old) != clause(new)


def test_hard_negative_links_are_symmetric(records):
    by_id = {r.video_id: r for r in records}
    for r in records:
        for link in r.hard_negatives:
            back = [n for n in by_id[link["video_id"]].hard_negatives if n["video_id"] == r.video_id]
            assert back and back[0]["relation"] == link["relation"]


# ---------------------------------------------------------------- pixels match the events

def _events_by_action(count: int = 60) -> dict:
    found: dict = {}
    for spec in plan_dataset(count, 7, FRAMES):
        for event in spec.events:
            found.setdefault(event.action, (spec, event))
    return found


@pytest.mark.parametrize("action", sorted(MOVES))
def test_rendered_move_goes_the_captioned_way(action):
    spec, event = _events_by_action()[action]
    frames = render_video(spec, SIZE)[event.start_frame:event.end_frame]
    xy = centroids(np.all(frames == COLOURS[event.colour], axis=-1))
    dx, dy = MOVES[action]
    axis, sign = (0, dx) if dx else (1, dy)
    steps = np.diff(xy[:, axis]) * sign
    assert (steps > 0).all(), xy  # strictly monotonic in the captioned direction
    assert np.ptp(xy[:, 1 - axis]) < 1.0  # and steady across it
    assert abs(xy[-1, axis] - xy[0, axis]) > SIZE / 4


@pytest.mark.parametrize("action", ["grow", "shrink", "stay", "appear", "disappear"])
def test_rendered_size_and_presence_follow_the_action(action):
    spec, event = _events_by_action()[action]
    frames = render_video(spec, SIZE)[event.start_frame:event.end_frame]
    area = np.all(frames == COLOURS[event.colour], axis=-1).sum(axis=(1, 2))
    if action == "grow":
        assert (np.diff(area) >= 0).all() and area[-1] > 2 * area[0]
    elif action == "shrink":
        assert (np.diff(area) <= 0).all() and area[0] > 2 * area[-1]
    elif action == "stay":
        assert (area == area[0]).all() and area[0] > 0
    else:
        visible = area > 0
        assert visible.any() and not visible.all()
        # one switch only: hidden then shown (appear) or shown then hidden (disappear)
        assert list(visible) == sorted(visible, reverse=(action == "disappear"))


def test_decoded_video_moves_as_its_caption_says(records):
    # the same check on a real decoded file, with a colour-distance mask
    hits = [(r, e) for r in records for e in r.events if e["action"] in MOVES]
    assert hits, "no moving object in the dataset"
    record, event = hits[0]
    frames = decode(record.path)[event["start_frame"]:event["end_frame"]]
    xy = centroids(colour_mask(frames, event["colour"]))
    dx, dy = MOVES[event["action"]]
    axis, sign = (0, dx) if dx else (1, dy)
    assert (xy[-1, axis] - xy[0, axis]) * sign > SIZE / 4
    assert (np.diff(xy[:, axis]) * sign > -1.0).all()  # no step back beyond coding noise


def test_object_sizes_are_distinct():
    # small and big must be visibly different or the size words would be noise
    assert SIZES["big"] / SIZES["small"] > 1.5


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("args, message", [
    (["--n", "0"], "--n must be at least 1"),
    (["--val-frac", "-0.1"], "--val-frac must be in [0, 1)"),
    (["--test-frac", "1.0"], "--test-frac must be in [0, 1)"),
    (["--val-frac", "0.5", "--test-frac", "0.5"], "must be below 1"),
    (["--reverse-rate", "1.5"], "--reverse-rate must be in [0, 1]"),
    (["--swap-rate", "-1"], "--swap-rate must be in [0, 1]"),
    (["--size", "63"], "--size must be an even number"),
    (["--size", "8"], "--size must be an even number"),
    (["--fps", "0"], "--fps and --seconds must be positive"),
    (["--seconds", "-3"], "--fps and --seconds must be positive"),
    (["--seconds", "1"], "must give 9 to 10000 frames"),
    (["--workers", "0"], "--workers must be at least 1"),
])
def test_bad_arguments_fail_with_one_line(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert main(["synth", "--out", str(out), *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("vidsearch synth: ") and message in err and err.count("\n") == 1
    assert not out.exists()  # nothing written for a rejected request


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["synth", "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "--out OUT" in out and "--overwrite" in out


def test_non_numeric_argument_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["synth", "--out", str(tmp_path), "--n", "many"])
    assert exit_info.value.code == 2 and "invalid int value" in capsys.readouterr().err


def test_non_empty_out_dir_needs_overwrite(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("keep me")
    assert main(["synth", "--out", str(tmp_path), "--n", "3"]) == 1
    err = capsys.readouterr().err
    assert "is not empty (pass --overwrite" in err and err.count("\n") == 1


def test_overwrite_replaces_an_old_dataset_and_keeps_other_files(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("keep me")
    assert main(["synth", "--out", str(tmp_path), "--n", "5", "--overwrite"]) == 0
    assert main(["synth", "--out", str(tmp_path), "--n", "3", "--overwrite"]) == 0
    assert len(load_manifest(tmp_path)) == 3
    assert len(list((tmp_path / "videos").iterdir())) == 3  # the two extra old videos are gone
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    assert "wrote 3 videos" in capsys.readouterr().out


def test_empty_existing_out_dir_is_fine_without_overwrite(tmp_path):
    assert main(["synth", "--out", str(tmp_path), "--n", "2", "--no-progress"]) == 0
    assert len(load_manifest(tmp_path)) == 2


def test_overwrite_that_cannot_remove_an_old_file_fails_with_one_line(tmp_path, capsys):
    # a directory where an old video should be: unlink fails, the user gets one line
    (tmp_path / "videos" / "synth-s0-00000.mp4").mkdir(parents=True)
    (tmp_path / "videos" / "synth-s0-00000.mp4" / "x").write_text("x")
    assert main(["synth", "--out", str(tmp_path), "--n", "2", "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert "cannot remove the old dataset file" in err and err.count("\n") == 1


def test_write_failure_fails_with_one_line(tmp_path, capsys):
    # OUT/videos still fits in PATH_MAX (4096) but OUT/videos/<id>.mp4 does not,
    # so the encoder's open fails the way a full or read-only disk would.
    target = 4096 - len("/videos/synth-s0-00000.mp4") + 2
    out = tmp_path
    while len(str(out)) < target - 200:
        out = out / ("d" * 200)
    out = out / ("e" * (target - len(str(out)) - 1))
    assert main(["synth", "--out", str(out), "--n", "2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("vidsearch synth: cannot write the dataset into") and err.count("\n") == 1
    assert not (out / "manifest.jsonl").exists()


@pytest.mark.parametrize("where", ["file", "under_file"])
def test_unusable_out_path_fails_with_one_line(tmp_path, capsys, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    out = blocker if where == "file" else blocker / "data"
    assert main(["synth", "--out", str(out), "--n", "3"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("vidsearch synth: ") and err.count("\n") == 1
    assert ("not a directory" in err) if where == "file" else ("cannot create" in err)


def test_progress_bar_shows_on_request(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "a"), "--n", "3", "--progress"]) == 0
    assert "3/3" in capsys.readouterr().err
    assert main(["synth", "--out", str(tmp_path / "b"), "--n", "3", "--no-progress"]) == 0
    assert "3/3" not in capsys.readouterr().err


def test_broken_manifest_line_is_reported(tmp_path):
    (tmp_path / "manifest.jsonl").write_text('{"video_id": "x"}\n')
    with pytest.raises(SynthError, match=r"manifest.jsonl:1: not a synth manifest record"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.jsonl").write_text("not json\n")
    with pytest.raises(SynthError, match=r":1: not a synth manifest record"):
        load_manifest(tmp_path)


@pytest.mark.parametrize("kwargs, message", [
    ({"num_frames": 8}, "cannot hold 3 events"),
    ({"num_frames": 24, "min_events": 1}, "2 <= min <= max <= 3"),
    ({"num_frames": 24, "min_events": 3, "max_events": 2}, "2 <= min <= max <= 3"),
])
def test_plan_dataset_rejects_impossible_requests(kwargs, message):
    with pytest.raises(ValueError, match=message):
        plan_dataset(4, 0, **kwargs)
