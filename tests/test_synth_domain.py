"""`vidsearch synth --domain randomized`: the randomised training renderer, through the CLI
and as real PyAV files; and that the classic domain's output is what it was."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import av
import numpy as np
import pytest

from vidsearch import synth, synth_cli, synth_domain
from vidsearch.cli import main
from vidsearch.synth import generate_dataset, iter_frames, load_manifest, render_video
from vidsearch.synth_domain import RADIUS_RANGES, sample_background, sample_shade
from vidsearch.synth_domain_render import event_track
from vidsearch.synth_grammar import OUT_OF_ORDER, parse_caption
from vidsearch.synth_long import generate_long_dataset
from vidsearch.synth_scenes import COLOURS, FLIPS, MOVES, Event, counterfactual_caption, events_key

N = 24


def decode(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def frames_sha(path: Path) -> str:
    digest = hashlib.sha256()
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            digest.update(frame.to_ndarray(format="rgb24").tobytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth-rand") / "data"
    # Every family gets a direction twin, so the twin tests have several to look at.
    assert main(["synth", "--out", str(out), "--n", str(N), "--seed", "3", "--domain", "randomized",
                 "--direction-rate", "1", "--val-frac", "0.2", "--test-frac", "0.2", "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def records(dataset):
    return load_manifest(dataset)


# ---------------------------------------------------------------- classic stays as it was

# Recorded with the code at commit 1a98a78 (before the randomised domain existed):
# sha256 of manifest.jsonl, synth.json and every video's decoded RGB frames.
CLASSIC_SHORT = {  # generate_dataset(out, 8, 5)
    "manifest": "b5cde20ae536798d8e10ac4b12cb3e1adf42e00d5f2b3aa512d640f232b63fea",
    "info": "61277c19d438788cad2603e2c9f2f60a6e34eef1a0dbb60cc587ad509b3a4a35",
    "frames": ["6d08868ca6051c5a80fa3a9efe55634c8946b58f4b4bc13e9c2ec359bd714f9a",
               "1629ce61272d9527e9af8ea8a9dd421df8388883b659d4dd5d96e34ee8c67c1f",
               "8329def64836da4e9c86a91723c962a255dce0723c81dc4f54601d675afc157e",
               "09a930b1dc2aa65b02c57117de5ba8ae9163949d7e26144965cf10bc861631a9",
               "dd9bd4ed6952c6868b0d1e2421e5fbce6e85ec502c43406ad25409b0880acb50",
               "8460ef15f0aaac4425fb18b3692265987534b703814c60a0279436f7e6e347f6",
               "3eeacb8802ac077cd1e02632325e6de7d316882e7c74e83494dd2f9f48372a22",
               "76b91c9bd3f5c8f6fd8827136ac1c88d45f9b068225fb39e5274ec0d228758ae"],
}
CLASSIC_LONG = {  # generate_long_dataset(out, 1, 4, seconds=60, fps=2)
    "manifest": "0e4ec5c85e1a35f483c159f7c95e5a5c07f5c6613d914209191624cc2038f2fa",
    "info": "2f0467de4be38fe4095c0019daeffdefe715c76cc6d75846399b21b447a20134",
    "frames": ["7d269e13040164c884fc609a6e2cee630da787bb8716204407c3a8f70676d26e"],
}
# counterfactual_caption(default_rng(s), events) for s in 0..3 over CLASSIC_SHORT's records.
CLASSIC_COUNTERFACTUALS = "792e264e2a4d9b1364cf3a378dd20ac3b3a0640d2ab0386ad744aa322411886a"


def _digest(out: Path) -> dict:
    return {"manifest": hashlib.sha256((out / "manifest.jsonl").read_bytes()).hexdigest(),
            "info": hashlib.sha256((out / "synth.json").read_bytes()).hexdigest(),
            "frames": [frames_sha(p) for p in sorted((out / "videos").glob("*.mp4"))]}


def test_classic_output_is_byte_for_byte_what_it_was(tmp_path):
    generate_dataset(tmp_path / "short", 8, 5, progress=False)
    generate_dataset(tmp_path / "explicit", 8, 5, progress=False, domain="classic")
    generate_long_dataset(tmp_path / "long", 1, 4, seconds=60.0, fps=2.0, progress=False)
    assert _digest(tmp_path / "short") == CLASSIC_SHORT
    assert _digest(tmp_path / "explicit") == CLASSIC_SHORT
    assert _digest(tmp_path / "long") == CLASSIC_LONG
    records = load_manifest(tmp_path / "short")
    made = [counterfactual_caption(np.random.default_rng(s), r.events) for s in range(4) for r in records]
    assert hashlib.sha256(json.dumps(made).encode()).hexdigest() == CLASSIC_COUNTERFACTUALS


def test_domain_names_agree_across_modules():
    assert synth.DOMAINS == synth_domain.DOMAINS == synth_cli.DOMAINS == ("classic", "randomized")


# ---------------------------------------------------------------- the randomised set

def test_manifest_and_info_record_the_domain(dataset, records):
    info = json.loads((dataset / "synth.json").read_text())
    assert info["domain"] == "randomized" and info["direction_rate"] == 1.0
    assert len(records) == N
    for record in records:
        assert record.metadata["domain"] == "randomized" and "look" in record.metadata
        assert all("style" in e for e in record.events)


def test_videos_vary_in_frame_size_fps_duration_and_background(records):
    sizes = {(r.metadata["width"], r.metadata["height"]) for r in records}
    assert len(sizes) >= 3 and any(w != h for w, h in sizes)
    assert len({r.metadata["fps"] for r in records}) >= 2
    assert len({r.metadata["duration"] for r in records}) >= 3
    levels = [r.metadata["background"] for r in records]
    assert max(levels) - min(levels) > 80
    # Some background is brighter than an object on it (never so in the classic domain).
    assert any(r.metadata["background"] > min(sum(e["style"]["rgb"]) / 3 for e in r.events) for r in records)


def test_decoded_files_have_the_recorded_size_and_frames(records):
    for record in records[:8]:
        frames = decode(record.path)
        meta = record.metadata
        assert frames.shape == (meta["num_frames"], meta["height"], meta["width"], 3)
        with av.open(str(record.path)) as container:
            assert float(container.streams.video[0].average_rate) == pytest.approx(meta["fps"], rel=0.01)


def test_family_members_share_their_look(records):
    by_family: dict[int, list] = {}
    for record in records:
        by_family.setdefault(record.family, []).append(record)
    for members in by_family.values():
        assert len({json.dumps(m.metadata["look"], sort_keys=True) for m in members}) == 1


def test_same_seed_gives_identical_randomised_dataset(dataset, tmp_path):
    again = tmp_path / "again"
    generate_dataset(again, N, 3, domain="randomized", direction_rate=1.0, val_frac=0.2, test_frac=0.2,
                     progress=False)
    assert (again / "manifest.jsonl").read_bytes() == (dataset / "manifest.jsonl").read_bytes()
    first = sorted((dataset / "videos").glob("*.mp4"))[0]
    assert frames_sha(first) == frames_sha(again / "videos" / first.name)


def test_chunked_render_equals_whole_render(records):
    spec = records[0].spec()
    whole = render_video(spec, 64)
    assert np.array_equal(whole, np.stack(list(iter_frames(spec, 64, chunk_frames=7))))


def test_objects_linger_across_events(records):
    lingering = 0
    for record in records:
        spec = record.spec()
        for event in spec.events:
            xs = event_track(event, spec.num_frames)[0]
            lingering += len(xs) > event.num_frames
    assert lingering > 0


def test_shades_sizes_and_backgrounds_stay_nameable():
    rng = np.random.default_rng(0)
    palette = {k: np.array(v, float) for k, v in COLOURS.items()}
    for name in COLOURS:
        for _ in range(200):
            shade = np.array(sample_shade(rng, name), float)
            assert min(palette, key=lambda k: np.linalg.norm(palette[k] - shade)) == name
    assert RADIUS_RANGES["small"][1] < RADIUS_RANGES["big"][0]
    for _ in range(50):
        shades = [sample_shade(rng, c) for c in rng.choice(list(COLOURS), size=3)]
        background = sample_background(rng, shades)
        for shade in shades:
            for corner in (background["c0"], background["c1"]):
                assert np.linalg.norm(np.subtract(shade, corner)) >= synth_domain.MIN_CONTRAST


# ---------------------------------------------------------------- direction twins

def _direction_pairs(records):
    by_id = {r.video_id: r for r in records}
    for record in records:
        if record.variant != "base":
            continue
        for negative in record.hard_negatives:
            if negative["relation"] == "direction":
                yield record, by_id[negative["video_id"]]


def test_direction_twins_are_recorded_as_hard_negatives(records):
    pairs = list(_direction_pairs(records))
    assert len(pairs) >= 4
    for base, twin in pairs:
        assert twin.variant == "direction"
        assert {"video_id": base.video_id, "relation": "direction"} in twin.hard_negatives
        changed = [(a, b) for a, b in zip(base.events, twin.events) if a["action"] != b["action"]]
        assert len(changed) == 1 and FLIPS[changed[0][0]["action"]] == changed[0][1]["action"]
    relations = {n["relation"] for r in records for n in r.hard_negatives}
    assert {"reversed", "direction", "reversed+direction"} <= relations


def test_direction_twin_track_is_the_original_played_backwards(records):
    for base, twin in _direction_pairs(records):
        for a, b in zip(base.spec().events, twin.spec().events):
            if a.action != b.action:
                ta = event_track(a, a.end_frame)  # linger cut: the segment only
                tb = event_track(b, b.end_frame)
                for x, y in zip(ta, tb):
                    np.testing.assert_allclose(x, y[::-1], atol=1e-9)


def _centroid(frame: np.ndarray, rgb: list[int]) -> np.ndarray:
    """(x, y) centroid of one decoded frame's pixels near the object's shade."""
    distance = np.linalg.norm(frame.astype(np.float32) - np.array(rgb, np.float32), axis=-1)
    mask = distance < 45
    ys, xs = np.nonzero(mask)
    assert len(xs) > 3, "object not found in the decoded frame"
    return np.array([xs.mean(), ys.mean()])


def test_direction_twin_moves_the_opposite_way_in_decoded_frames(records):
    checked = 0
    for base, twin in _direction_pairs(records):
        for index, (a, b) in enumerate(zip(base.events, twin.events)):
            colours = [e["colour"] for e in base.events]
            if a["action"] == b["action"] or a["action"] not in MOVES or colours.count(a["colour"]) > 1:
                continue
            axis = 0 if a["action"] in ("left", "right") else 1
            sign = (MOVES[a["action"]][axis])
            moves = []
            for record in (base, twin):
                frames = decode(record.path)
                event = record.events[index]
                first = _centroid(frames[event["start_frame"]], event["style"]["rgb"])
                last = _centroid(frames[event["end_frame"] - 1], event["style"]["rgb"])
                moves.append((last - first)[axis])
            assert moves[0] * sign > 1.5 and moves[1] * sign < -1.5, moves
            checked += 1
    assert checked >= 1


# ---------------------------------------------------------------- captions

def test_every_caption_parses_back_to_the_events_in_temporal_order(records):
    for record in records:
        key = events_key(record.events)
        partial = set(record.metadata["partial_captions"])
        for index, caption in enumerate(record.captions):
            parsed = parse_caption(caption)
            assert parsed is not None, caption
            keys, kind = parsed
            if index in partial:
                assert kind != "full" and record.split == "train"
                want = {"first": key[:1], "last": key[-1:], "ends": (key[0], key[-1])}[kind]
                assert keys == want, caption
            else:
                assert kind == "full" and keys == key, caption


def test_captions_name_events_out_of_order_behind_a_marker(records):
    patterns = [re.compile(re.sub(r"\\\{g?\d\\\}", ".+", re.escape(t)), re.IGNORECASE)
                for ts in OUT_OF_ORDER.values() for t in ts]
    markers = ("after", "before", "once", "later", "at the end", "last")
    for record in records:
        out_of_order = [c for c in record.captions if any(p.fullmatch(c) for p in patterns)]
        assert out_of_order, record.captions
        assert all(any(m in c.lower() for m in markers) for c in out_of_order)


def test_partial_captions_are_train_only_and_identify_their_video(records):
    partial = [(r, r.captions[i]) for r in records for i in r.metadata["partial_captions"]]
    assert partial, "no partial caption in the set"
    keys = [events_key(r.events) for r in records]
    for record, caption in partial:
        assert record.split == "train"
        named, kind = parse_caption(caption)
        matches = [k for k in keys if (kind == "first" and k[0] == named[0]) or (kind == "last" and k[-1] == named[0])
                   or (kind == "ends" and (k[0], k[-1]) == named)]
        assert matches == [events_key(record.events)]


def test_direction_counterfactual_is_valid_and_describes_the_twin(records):
    base, twin = next(_direction_pairs(records))
    twin_key = events_key(twin.events)
    found = False
    for seed in range(60):
        caption, key = counterfactual_caption(np.random.default_rng(seed), base.events, direction_rate=1.0)
        assert key != events_key(base.events)
        assert parse_caption(caption) == (key, "full")  # the text says what its key says
        found |= key == twin_key
    assert found


def test_trainer_does_not_count_a_caption_of_a_batch_video_as_its_negative(records):
    stages = pytest.importorskip("vidsearch.services.trainer.stages")
    base, twin = next(_direction_pairs(records))
    other = next(r for r in records if r.family != base.family)
    bank = stages.CaptionBank(captions=[r.captions for r in (base, twin, other)],
                              events=[r.events for r in (base, twin, other)])
    keys = [events_key(r.events) for r in (base, twin, other)]
    described = 0
    for seed in range(20):
        made = stages.caption_negatives(bank, np.array([0, 1, 2]), 4, np.random.default_rng(seed))
        for column, text in enumerate(made.texts):
            key, _ = parse_caption(text)
            for row in range(3):
                assert bool(made.valid[row, column]) == (key != keys[row])
                described += key == keys[row]
    assert described > 0  # some direction counterfactual of the base was the twin's caption


# ---------------------------------------------------------------- long videos and the CLI

def test_long_videos_work_in_the_randomised_domain(tmp_path):
    assert main(["synth", "--long", "--domain", "randomized", "--out", str(tmp_path), "--n", "1", "--seconds", "60",
                 "--fps", "2", "--no-progress"]) == 0
    record = load_manifest(tmp_path)[0]
    assert record.metadata["domain"] == "randomized" and json.loads((tmp_path / "synth.json").read_text())["domain"]
    assert [e["caption"] for e in record.events] == record.captions
    frames = decode(record.path)
    assert frames.shape[1:3] == (record.metadata["height"], record.metadata["width"])
    spec = record.spec()
    assert np.array_equal(render_video(spec, 64), np.stack(list(iter_frames(spec, 64, chunk_frames=25))))
    assert all(Event.from_dict(e).style["linger"] <= e["end_frame"] - e["start_frame"] for e in record.events)


@pytest.mark.parametrize("args, message", [
    (["--domain", "photoreal"], "--domain must be one of classic, randomized (got 'photoreal')"),
    (["--domain", ""], "--domain must be one of classic, randomized"),
    (["--long", "--domain", "nope"], "--domain must be one of classic, randomized"),
    (["--direction-rate", "0.5"], "--direction-rate applies only with --domain randomized"),
    (["--domain", "randomized", "--direction-rate", "2"], "--direction-rate must be in [0, 1]"),
    (["--long", "--domain", "randomized", "--direction-rate", "0.5"], "--direction-rate does not apply with --long"),
])
def test_bad_domain_arguments_fail_with_one_line(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert main(["synth", "--out", str(out), *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("vidsearch synth: ") and message in err and err.count("\n") == 1
    assert not out.exists()


def test_help_lists_the_domains(capsys):
    with pytest.raises(SystemExit):
        main(["synth", "--help"])
    out = capsys.readouterr().out
    assert "--domain {classic,randomized}" in out and "--direction-rate" in out
