"""`vidsearch synth --long`: long videos of many events with known times, through the CLI,
as real mp4 files; and that the short set's output is what it was."""
from __future__ import annotations

import json
import re
from pathlib import Path

import av
import numpy as np
import pytest

from vidsearch.cli import main
from vidsearch.synth import iter_frames, load_manifest, render_video
from vidsearch.synth_scenes import COLOURS, caption_key, clause, plan_dataset

N, SECONDS, FPS, SIZE = 3, 60.0, 2.0, 64

# A log record as vidsearch's handler formats it, level padded to 7 (not a line the CLI prints itself).
LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) +\S+: ")



@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth-long") / "data"
    assert main(["synth", "--long", "--out", str(out), "--n", str(N), "--seconds", str(SECONDS), "--fps", str(FPS),
                 "--size", str(SIZE), "--seed", "3", "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def records(dataset):
    return load_manifest(dataset)


def decode(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with av.open(str(path)) as container:
        frames = list(container.decode(video=0))
        return (np.stack([f.to_ndarray(format="rgb24") for f in frames]),
                np.array([float(f.time) for f in frames]))


def test_each_video_lasts_the_asked_length_and_its_events_are_ordered_and_apart(dataset, records):
    assert len(records) == N
    info = json.loads((dataset / "synth.json").read_text())
    assert info["mode"] == "long" and info["events"] == sum(len(r.events) for r in records)
    for record in records:
        frames, times = decode(record.path)
        assert frames.shape == (int(SECONDS * FPS), SIZE, SIZE, 3)
        assert record.metadata["duration"] == SECONDS and record.split == "test" and record.variant == "long"
        spans = [(e["start_s"], e["end_s"]) for e in record.events]
        assert len(spans) >= 4  # 60 s of 5-12 s events
        for (start, end), (next_start, _) in zip(spans, spans[1:] + [(SECONDS, SECONDS)]):
            assert 5.0 <= end - start <= 12.0 and end <= next_start
        for event in record.events:  # times are the frames': start_s = start_frame / fps
            assert event["start_s"] == pytest.approx(event["start_frame"] / FPS)
            assert event["end_s"] == pytest.approx(event["end_frame"] / FPS)
            assert times[event["start_frame"]] == pytest.approx(event["start_s"], abs=1e-3)


def test_an_event_shows_its_colour_only_inside_its_span(records):
    for record in records:
        frames, _ = decode(record.path)
        for event in record.events:
            distance = np.abs(frames.astype(np.int16) - np.array(COLOURS[event["colour"]], np.int16)).sum(-1)
            seen = (distance < 60).sum(axis=(1, 2)) > 2
            others = [e for e in record.events if e["colour"] == event["colour"] and e is not event]
            start, end = event["start_frame"], event["end_frame"]
            assert seen[start:end].mean() >= 0.5  # appear/disappear hide it for 40% of the span
            outside = np.ones(len(seen), bool)
            for e in [event, *others]:
                outside[e["start_frame"]:e["end_frame"]] = False
            assert not seen[outside].any()


def test_every_caption_names_one_event_in_the_whole_dataset(records):
    captions = [e["caption"] for r in records for e in r.events]
    assert len(captions) == len(set(captions))
    for record in records:
        assert record.captions == [e["caption"] for e in record.events]
        pairs = [(e["colour"], e["action"]) for e in record.events]
        assert len(pairs) == len(set(pairs))  # fewer than 54 events: (colour, action) differs too
        for event, spec_event in zip(record.events, record.spec().events):
            assert event["caption"] == clause(spec_event, 0) == event["phrase"]
    keys = [caption_key([e]) for r in records for e in r.spec().events]
    assert len(keys) == len(set(keys))


def test_the_manifest_rerenders_the_same_frames_and_a_seed_repeats(dataset, records, tmp_path):
    record = records[0]
    frames, _ = decode(record.path)
    rendered = render_video(record.spec(), SIZE)
    assert np.abs(frames.astype(int) - rendered.astype(int)).mean() < 4  # only H.264's loss
    again = tmp_path / "again"
    assert main(["synth", "--long", "--out", str(again), "--n", str(N), "--seconds", str(SECONDS), "--fps",
                 str(FPS), "--size", str(SIZE), "--seed", "3", "--no-progress"]) == 0
    assert (again / "manifest.jsonl").read_text() == (dataset / "manifest.jsonl").read_text()


def test_chunked_rendering_gives_render_videos_frames():
    spec = plan_dataset(1, 0, 24)[0]
    assert np.array_equal(np.stack(list(iter_frames(spec, 32, chunk_frames=5))), render_video(spec, 32))


def test_the_short_set_is_unchanged_by_the_long_mode(tmp_path):
    out = tmp_path / "short"
    assert main(["synth", "--out", str(out), "--n", "4", "--no-progress"]) == 0
    records = load_manifest(out)
    assert [r.metadata["num_frames"] for r in records] == [24] * 4  # 3 s at 8 fps, as before
    assert all(r.variant != "long" and r.video_id.startswith("synth-s0-0") for r in records)
    assert "mode" not in json.loads((out / "synth.json").read_text())


@pytest.mark.parametrize("args, message", [
    (["--seconds", "20"], "--seconds must be from 60 to 3600 with --long (got 20)"),
    (["--min-event-s", "9", "--max-event-s", "6"], "--min-event-s must be above 0 and at most --max-event-s"),
    (["--max-event-s", "50"], "--max-event-s must be at most a quarter of --seconds"),
    (["--min-event-s", "0.5", "--fps", "2"], "--min-event-s x --fps must give at least 3 frames per event"),
    (["--max-gap-s", "-1"], "--max-gap-s must be at least 0 (got -1)"),
    (["--n", "0"], "--n must be at least 1 (got 0)"),
    (["--n", "40", "--seconds", "600"], "ran out of distinct captions"),
])
def test_bad_long_arguments_fail_with_one_line(tmp_path, capsys, args, message):
    assert main(["synth", "--long", "--out", str(tmp_path / "x"), "--fps", "2", "--size", "16", *args]) != 0
    # Only the CLI's own lines: a Kafka client left running by an earlier test in this
    # process may log a warning into the same captured stderr.
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not LOG_LINE.match(line)]
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0], err


def test_long_only_options_are_refused_without_long(tmp_path, capsys):
    assert main(["synth", "--out", str(tmp_path / "x"), "--n", "2", "--max-gap-s", "1"]) != 0
    err = capsys.readouterr().err.strip()
    assert err.endswith("--max-gap-s applies only with --long") and "\n" not in err
