"""Training-data sources: synth, MSR-VTT layout, JSONL and CSV load into the same
records, and every bad input fails with a one-line TrainingError before decoding."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from vidsearch.config import DecodeSettings
from vidsearch.services.trainer.datasets import (
    DatasetSource, TrainingVideo, data_hash, load_dataset, split_videos, trusting_dataset_root,
)
from vidsearch.services.trainer.errors import TrainingError
from vidsearch.synth import generate_dataset, load_manifest
from vidsearch.video_writer import write_video

TRAIN_IDS = [f"video{i}" for i in range(6)]
TEST_IDS = ["video7010", "video7011"]
VAL_FRAC = 0.5


def captions_of(video_id: str) -> list[str]:
    return [f"{video_id} caption one", f"{video_id} caption two"]


def jsfusion_caption(video_id: str) -> str:
    return f"the test sentence for {video_id}"


def tiny_video(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = np.random.default_rng(seed).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    return write_video(path, frames, fps=4.0)


@pytest.fixture(scope="module")
def msrvtt(tmp_path_factory) -> Path:
    """A tiny MSR-VTT in the CLIP4Clip layout: json + 9k train csv + JSFUSION test csv + videos/."""
    root = tmp_path_factory.mktemp("msrvtt")
    ids = TRAIN_IDS + TEST_IDS + ["video9999"]  # the last one is in no split: ignored
    for index, video_id in enumerate(ids[:-1]):
        tiny_video(root / "videos" / f"{video_id}.mp4", seed=index)
    # The json also holds sentences of the test videos; test captions must come from JSFUSION instead.
    sentences = [{"caption": c, "video_id": v, "sen_id": n}
                 for n, (v, c) in enumerate((v, c) for v in ids for c in captions_of(v))]
    (root / "MSRVTT_data.json").write_text(json.dumps(
        {"info": {}, "videos": [{"video_id": v, "category": 0} for v in ids], "sentences": sentences}))
    (root / "MSRVTT_train.9k.csv").write_text("video_id\n" + "".join(f"{v}\n" for v in TRAIN_IDS))
    with (root / "MSRVTT_JSFUSION_test.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["key", "vid_key", "video_id", "sentence"])
        for n, video_id in enumerate(TEST_IDS):
            writer.writerow([f"ret{n}", f"msr{7010 + n}", video_id, jsfusion_caption(video_id)])
    return root


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "data"
    generate_dataset(out, n=6, seed=0, size=32, seconds=1.5, progress=False)
    return out


def load(kind: str, path: Path, **options) -> list[TrainingVideo]:
    source = DatasetSource(kind, str(path), **options)
    return load_dataset(source, trusting_dataset_root(DecodeSettings(), source))


def summary(videos: list[TrainingVideo]) -> set[tuple[str, tuple[str, ...], str]]:
    return {(v.video_id, v.captions, v.split) for v in videos}


def expect_error(kind: str, path: Path, *fragments: str, **options) -> str:
    with pytest.raises(TrainingError) as info:
        load(kind, path, **options)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


# ---------------------------------------------------------------- msrvtt and the generic formats agree

def test_msrvtt_layout_loads_train_val_and_the_1k_test_set(msrvtt):
    videos = load("msrvtt", msrvtt, val_frac=VAL_FRAC)
    train, val, test = (split_videos(videos, s) for s in ("train", "val", "test"))
    # train + val = the 9k csv's videos with every json sentence; val is a stable slice of them.
    assert sorted(v.video_id for v in train + val) == sorted(TRAIN_IDS)
    assert 0 < len(val) < len(TRAIN_IDS)
    assert all(v.captions == tuple(captions_of(v.video_id)) for v in train + val)
    assert {(v.video_id, v.captions) for v in test} == {(t, (jsfusion_caption(t),)) for t in TEST_IDS}
    for v in videos:
        assert v.uri == (msrvtt / "videos" / f"{v.video_id}.mp4").resolve().as_uri()
        assert (v.events, v.hard_negatives, v.variant) == ((), (), "base")
    assert load("msrvtt", msrvtt, val_frac=VAL_FRAC) == videos  # deterministic
    assert not split_videos(load("msrvtt", msrvtt, val_frac=0.0), "val")


def test_generic_csv_and_jsonl_of_the_same_videos_load_the_same(msrvtt, tmp_path):
    expected = load("msrvtt", msrvtt, val_frac=VAL_FRAC)
    # Relative uris resolve against the data file's directory (the msrvtt root here).
    rows = [[f"videos/{v}.mp4", c, v, ""] for v in TRAIN_IDS for c in captions_of(v)]
    rows += [[f"videos/{v}.mp4", jsfusion_caption(v), v, "test"] for v in TEST_IDS]
    table = write_csv(msrvtt / "generic.csv", ["uri", "caption", "video_id", "split"], rows)
    from_csv = load("csv", table, val_frac=VAL_FRAC)
    assert summary(from_csv) == summary(expected)
    assert {v.uri for v in from_csv} == {v.uri for v in expected}
    assert data_hash(from_csv) == data_hash(expected)

    # JSONL with no video_id (derived from the file stem), "captions" lists and single "caption"s, absolute paths.
    lines = [{"uri": str(msrvtt / "videos" / f"{v}.mp4"), "captions": captions_of(v)[:1]} for v in TRAIN_IDS]
    lines += [{"uri": (msrvtt / "videos" / f"{v}.mp4").resolve().as_uri(), "caption": captions_of(v)[1]}
              for v in TRAIN_IDS]
    lines += [{"uri": str(msrvtt / "videos" / f"{v}.mp4"), "caption": jsfusion_caption(v), "split": "test"}
              for v in TEST_IDS]
    from_jsonl = load("jsonl", write_rows(msrvtt / "generic.jsonl", lines), val_frac=VAL_FRAC)
    assert summary(from_jsonl) == summary(expected)
    # The same file elsewhere: the videos are outside its root and the allowlist.
    expect_error("jsonl", write_rows(tmp_path / "data.jsonl", lines), "data.jsonl:1", "video video0",
                 "outside the allowed prefixes")


def test_msrvtt_accepts_msrvtt_videos_dir_extra_csv_columns_and_videos_dir(msrvtt, tmp_path):
    root = tmp_path / "MSRVTT"
    root.mkdir()
    for name in ("MSRVTT_data.json", "MSRVTT_JSFUSION_test.csv"):
        (root / name).write_bytes((msrvtt / name).read_bytes())
    write_csv(root / "MSRVTT_train.9k.csv", ["key", "video_id", "category"],
              [[str(n), v, "3"] for n, v in enumerate(TRAIN_IDS)])
    (root / "MSRVTT_Videos").symlink_to(msrvtt / "videos")
    expected = summary(load("msrvtt", msrvtt, val_frac=VAL_FRAC))
    assert summary(load("msrvtt", root, val_frac=VAL_FRAC)) == expected
    (root / "MSRVTT_Videos").rename(root / "elsewhere")
    assert summary(load("msrvtt", root, val_frac=VAL_FRAC, videos_dir="elsewhere")) == expected


# ---------------------------------------------------------------- synth

def test_synth_loads_events_hard_negatives_and_variants(synth_dir):
    records = {r.video_id: r for r in load_manifest(synth_dir)}
    videos = load("synth", synth_dir / "manifest.jsonl")
    assert load("synth", synth_dir) == videos  # the directory works too
    assert [v.video_id for v in videos] == list(records)
    for v in videos:
        record = records[v.video_id]
        assert (v.split, v.captions, v.variant, v.uri) == (record.split, tuple(record.captions), record.variant,
                                                           record.uri)
        assert v.events and all({"phrase", "start_s", "end_s"} <= set(e) for e in v.events)
        assert all(n["video_id"] in records and n["relation"] for n in v.hard_negatives)
        assert v.metadata["num_frames"] == record.metadata["num_frames"]
    relations = {n["relation"] for v in videos for n in v.hard_negatives}
    assert "reversed" in relations and any(r.startswith("swap:") for r in relations)
    assert {v.variant for v in videos} > {"base"}
    assert split_videos(videos, "train")
    assert len({v: v.split for v in videos}) == len(videos)  # hashable although events hold dicts


def test_data_hash_ignores_order_and_changes_with_the_data(synth_dir):
    videos = load("synth", synth_dir)
    digest = data_hash(videos)
    assert len(digest) == 64 and data_hash(list(reversed(videos))) == digest
    changed = [TrainingVideo(v.video_id, v.uri, v.captions + ("one more",), v.split) if i == 0 else v
               for i, v in enumerate(videos)]
    assert data_hash(changed) != digest


def test_trusting_dataset_root_adds_only_the_root(tmp_path):
    decode = DecodeSettings(allowed_schemes=["https"], allowed_prefixes=["https://cdn.example.com/v/"])
    source = DatasetSource("csv", str(tmp_path / "data.csv"))
    trusted = trusting_dataset_root(decode, source)
    assert trusted.allowed_schemes == ["https", "file"]
    assert trusted.allowed_prefixes == ["https://cdn.example.com/v/", str(tmp_path.resolve())]
    assert trusted.max_bytes == decode.max_bytes
    assert decode.allowed_schemes == ["https"] and len(decode.allowed_prefixes) == 1  # the original is untouched
    assert trusting_dataset_root(trusted, source) == trusted


def test_remote_uris_pass_when_allowlisted(tmp_path):
    write_rows(tmp_path / "data.jsonl", [{"uri": "https://cdn.example.com/v/a.mp4", "caption": "a cat"}])
    source = DatasetSource("jsonl", str(tmp_path / "data.jsonl"), val_frac=0.0)
    decode = DecodeSettings(allowed_schemes=["https"], allowed_prefixes=["https://cdn.example.com/v/"])
    [video] = load_dataset(source, trusting_dataset_root(decode, source))
    assert (video.video_id, video.uri, video.split) == ("a", "https://cdn.example.com/v/a.mp4", "train")


# ---------------------------------------------------------------- bad inputs

@pytest.fixture
def clip(tmp_path) -> Path:
    return tiny_video(tmp_path / "videos" / "clip.mp4")


def test_missing_files_and_directories(tmp_path, msrvtt):
    expect_error("jsonl", tmp_path / "nope.jsonl", "nope.jsonl", "not found")
    expect_error("csv", tmp_path / "nope.csv", "nope.csv", "not found")
    expect_error("synth", tmp_path / "nosynth", "nosynth", "not found")
    (tmp_path / "emptysynth").mkdir()
    expect_error("synth", tmp_path / "emptysynth", "emptysynth/manifest.jsonl", "not found")
    expect_error("msrvtt", tmp_path / "nomsrvtt", "nomsrvtt", "not found")
    root = tmp_path / "partial"
    root.mkdir()
    (root / "MSRVTT_data.json").write_bytes((msrvtt / "MSRVTT_data.json").read_bytes())
    expect_error("msrvtt", root, "MSRVTT_train.9k.csv", "not found")
    for name in ("MSRVTT_train.9k.csv", "MSRVTT_JSFUSION_test.csv"):
        (root / name).write_bytes((msrvtt / name).read_bytes())
    expect_error("msrvtt", root, "videos or MSRVTT_Videos")
    expect_error("msrvtt", root, "videos_dir", "not found", videos_dir="missing")


def test_malformed_json_and_csv_name_the_line(tmp_path, clip, msrvtt):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"uri": "videos/clip.mp4", "caption": "a"}) + "\n" + '{"uri": "x.mp4", \n')
    expect_error("jsonl", path, "data.jsonl:2", "malformed JSON")
    path.write_text('["videos/clip.mp4", "a"]\n')
    expect_error("jsonl", path, "data.jsonl:1", "expected a JSON object")
    table = tmp_path / "data.csv"
    table.write_text('uri,caption\nvideos/clip.mp4,a cat\nvideos/clip.mp4,"a dog" runs\n')
    expect_error("csv", table, "data.csv:3", "malformed CSV")
    table.write_text("uri,caption\nvideos/clip.mp4,a cat,extra\n")
    expect_error("csv", table, "data.csv:2", "3 field(s), the header has 2")
    table.write_text("url,text\nvideos/clip.mp4,a cat\n")
    expect_error("csv", table, "data.csv:1", "uri, caption")
    root = tmp_path / "msrvtt"
    root.mkdir()
    for name in ("MSRVTT_train.9k.csv", "MSRVTT_JSFUSION_test.csv"):
        (root / name).write_bytes((msrvtt / name).read_bytes())
    (root / "videos").symlink_to(msrvtt / "videos")
    (root / "MSRVTT_data.json").write_text('{"sentences": [\n{"caption": "a", "video_id": "video0"},\n]}')
    expect_error("msrvtt", root, "MSRVTT_data.json:3", "malformed JSON")
    (root / "MSRVTT_data.json").write_text('{"videos": []}')
    expect_error("msrvtt", root, "MSRVTT_data.json", '"sentences" list')


def test_captionless_videos(tmp_path, clip, msrvtt):
    path = tmp_path / "data.jsonl"
    write_rows(path, [{"uri": "videos/clip.mp4", "caption": "a"}, {"uri": "videos/clip.mp4", "caption": "  "}])
    expect_error("jsonl", path, "data.jsonl:2", "empty caption")
    write_rows(path, [{"uri": "videos/clip.mp4"}])
    expect_error("jsonl", path, "data.jsonl:1", "no caption")
    write_rows(path, [{"uri": "videos/clip.mp4", "captions": []}])
    expect_error("jsonl", path, "data.jsonl:1", "no caption")
    table = write_csv(tmp_path / "data.csv", ["uri", "caption"], [["videos/clip.mp4", ""]])
    expect_error("csv", table, "data.csv:2", "empty caption")
    # A train video without a sentence in the json.
    root = tmp_path / "msrvtt"
    root.mkdir()
    for name in ("MSRVTT_data.json", "MSRVTT_JSFUSION_test.csv"):
        (root / name).write_bytes((msrvtt / name).read_bytes())
    (root / "videos").symlink_to(msrvtt / "videos")
    (root / "MSRVTT_train.9k.csv").write_text("video_id\nvideo0\nvideo8\n")
    expect_error("msrvtt", root, "MSRVTT_train.9k.csv:3", "video video8", "no sentences")
    # An empty sentence of a train video fails; one of a video in no split is never read.
    (root / "MSRVTT_train.9k.csv").write_text("video_id\nvideo0\n")
    sentences = [{"caption": "a", "video_id": "video0"}, {"caption": " ", "video_id": "video0"},
                 {"caption": "", "video_id": "video9999"}]
    (root / "MSRVTT_data.json").write_text(json.dumps({"sentences": sentences}))
    expect_error("msrvtt", root, "MSRVTT_data.json: sentences[1]", "video video0", "empty caption")
    sentences[1]["caption"] = "b"
    (root / "MSRVTT_data.json").write_text(json.dumps({"sentences": sentences}))
    assert [v.captions for v in load("msrvtt", root, val_frac=0.0)][0] == ("a", "b")


def test_unknown_split_names_the_allowed_ones(tmp_path, clip):
    path = write_rows(tmp_path / "data.jsonl", [{"uri": "videos/clip.mp4", "caption": "a", "split": "dev"}])
    expect_error("jsonl", path, "data.jsonl:1", "'dev'", "train, val, test")
    table = write_csv(tmp_path / "data.csv", ["uri", "caption", "split"], [["videos/clip.mp4", "a", "validation"]])
    expect_error("csv", table, "data.csv:2", "'validation'", "train, val, test")
    with pytest.raises(TrainingError, match="train, val, test"):
        split_videos([], "dev")


def test_missing_video_file(tmp_path, clip):
    table = write_csv(tmp_path / "data.csv", ["uri", "caption", "video_id"],
                      [["videos/clip.mp4", "a", "ok"], ["videos/gone.mp4", "b", "gone"]])
    expect_error("csv", table, "data.csv:3", "video gone", "no video file", "gone.mp4")


def test_uris_outside_the_allowlist_fail(tmp_path, clip):
    outside = tiny_video(tmp_path.parent / f"{tmp_path.name}-outside" / "other.mp4")
    cases = {
        "/etc/hosts": "outside the allowed prefixes",
        "../videos/clip.mp4": "outside the allowed prefixes",  # exists, but outside the dataset root
        outside.as_uri(): "outside the allowed prefixes",
        "/no/such/dir/x.mp4": "outside the allowed prefixes",  # not "no video file": existence is never revealed
        "https://example.com/a.mp4": "scheme 'https' is not in allowed_schemes",
        "ftp://example.com/a.mp4": "unsupported scheme 'ftp'",
    }
    data = tmp_path / "data"
    data.mkdir()
    (data / "videos").symlink_to(clip.parent)  # a symlink out of the root is judged by its target
    cases["videos/clip.mp4"] = "outside the allowed prefixes"
    for uri, fragment in cases.items():
        table = write_csv(data / "data.csv", ["uri", "caption", "video_id"], [[uri, "a cat", "bad"]])
        expect_error("csv", table, "data.csv:2", "video bad", fragment)


def test_video_ids_must_be_unique(tmp_path):
    for sub in ("a", "b"):
        tiny_video(tmp_path / sub / "clip.mp4")
    path = write_rows(tmp_path / "data.jsonl", [{"uri": "a/clip.mp4", "caption": "x"},
                                                {"uri": "b/clip.mp4", "caption": "y"}])
    expect_error("jsonl", path, "data.jsonl:2", "derived from the file stem", "'clip'", "data.jsonl:1")
    path = write_rows(tmp_path / "data.jsonl", [{"uri": "a/clip.mp4", "caption": "x", "video_id": "v"},
                                                {"uri": "b/clip.mp4", "caption": "y", "video_id": "v"}])
    expect_error("jsonl", path, "data.jsonl:2", "video_id 'v'", "unique")
    path = write_rows(tmp_path / "data.jsonl", [{"uri": "a/clip.mp4", "caption": "x", "split": "train"},
                                                {"uri": "a/clip.mp4", "caption": "y", "split": "test"}])
    expect_error("jsonl", path, "data.jsonl:2", "'test'", "'train'")


def test_rows_of_one_video_merge(tmp_path, clip):
    table = write_csv(tmp_path / "data.csv", ["uri", "caption", "split"],
                      [["videos/clip.mp4", "a cat", ""], ["videos/clip.mp4", " a dog ", "train"]])
    [video] = load("csv", table)
    assert (video.video_id, video.captions, video.split) == ("clip", ("a cat", "a dog"), "train")
    assert video.uri == clip.resolve().as_uri()


def test_a_dataset_without_train_videos_fails(tmp_path, clip):
    path = write_rows(tmp_path / "data.jsonl", [{"uri": "videos/clip.mp4", "caption": "a", "split": "test"}])
    expect_error("jsonl", path, "data.jsonl", "no train videos")


def test_msrvtt_test_videos_must_not_be_train_videos(tmp_path, msrvtt):
    root = tmp_path / "msrvtt"
    root.mkdir()
    for name in ("MSRVTT_data.json", "MSRVTT_train.9k.csv"):
        (root / name).write_bytes((msrvtt / name).read_bytes())
    (root / "videos").symlink_to(msrvtt / "videos")
    write_csv(root / "MSRVTT_JSFUSION_test.csv", ["key", "vid_key", "video_id", "sentence"],
              [["ret0", "msr0", "video0", "a leak"]])
    expect_error("msrvtt", root, "MSRVTT_JSFUSION_test.csv:2", "video0", "both")


def test_bad_source_options():
    with pytest.raises(TrainingError, match="unknown dataset kind 'parquet'; expected one of synth, msrvtt"):
        DatasetSource("parquet", "x")
    with pytest.raises(TrainingError, match=r"val_frac must be in \[0, 1\)"):
        DatasetSource("msrvtt", "x", val_frac=1.0)
    with pytest.raises(TrainingError, match="videos_dir applies only to msrvtt"):
        DatasetSource("csv", "x.csv", videos_dir="v")
