"""Region tokens in the store: the codecs' error bounds, and a collection with a
``regions`` multivector in real Qdrant local mode (in-process, and through the embedded
Ray actor) written and read back through every read path."""
from __future__ import annotations

import math
import uuid

import numpy as np
import pytest

from vidsearch.config import Settings, StoreSettings
from vidsearch.services.query.payloads import public_payload
from vidsearch.store import StoreError, VectorStore, VideoPoint, collection_name, open_store, shutdown_embedded_store
from vidsearch.store_schema import (REGION_CODEC_FIELD, REGION_ENCODER_FIELD, REGION_UINT8_RANGE, decode_regions,
                                    encode_regions)

from test_store import DIM, FILTER_FIELDS, FRAME_DIM, T, _point, _unit

CELLS, WIDTH = 4, 16


def step(width: int) -> float:
    """One uint8 code step for ``width``-d tokens."""
    return 2 * REGION_UINT8_RANGE / math.sqrt(width) / 255


def regions_of(rng: np.random.Generator, frames: int = T) -> np.ndarray:
    return _unit(rng, frames, CELLS, WIDTH)


# ---- codecs --------------------------------------------------------------------------
@pytest.mark.parametrize("width", [16, 64, 512])
def test_uint8_codes_are_within_half_a_step_inside_their_range(width):
    rng = np.random.default_rng(width)
    tokens = _unit(rng, 6, 4, width)
    rows = encode_regions(tokens, "uint8")
    assert rows.shape == (24, width) and rows.min() >= 0 and rows.max() <= 255
    assert np.array_equal(rows, np.rint(rows))  # integer codes: a server stores them as uint8
    back = decode_regions(rows, 6, "uint8")
    assert back.shape == tokens.shape and back.dtype == np.float32
    span = REGION_UINT8_RANGE / math.sqrt(width)
    inside = np.abs(tokens) <= span
    assert inside.mean() > 0.999
    assert np.abs(back - tokens)[inside].max() <= step(width) / 2 + 1e-6
    # Outside the range a component is clipped to its edge, never wrapped.
    spiky = np.zeros((1, 1, width), np.float32)
    spiky[0, 0, 0] = 1.0
    clipped = decode_regions(encode_regions(spiky, "uint8"), 1, "uint8")
    assert clipped[0, 0, 0] == pytest.approx(min(1.0, span), abs=step(width) / 2 + 1e-6)
    # Cosines between decoded tokens stay close to the originals'.
    cos = (tokens[:, 0] * tokens[:, 1]).sum(-1)
    back_unit = back / np.linalg.norm(back, axis=-1, keepdims=True)
    assert np.abs((back_unit[:, 0] * back_unit[:, 1]).sum(-1) - cos).max() < 0.05


def test_float16_and_float32_codecs():
    tokens = _unit(np.random.default_rng(1), 5, CELLS, WIDTH)
    half = decode_regions(encode_regions(tokens, "float16"), 5, "float16")
    assert np.abs(half - tokens).max() <= 2 ** -11  # float16 keeps 11 significant bits on [-1, 1]
    assert not np.array_equal(half, tokens)
    exact = decode_regions(encode_regions(tokens, "float32"), 5, "float32")
    assert np.array_equal(exact, tokens)


def test_codec_errors():
    tokens = _unit(np.random.default_rng(2), 3, CELLS, WIDTH)
    with pytest.raises(ValueError, match="region codec 'int4'"):
        encode_regions(tokens, "int4")
    with pytest.raises(ValueError, match="do not split into 5 frames"):
        decode_regions(encode_regions(tokens, "float32"), 5, "float32")
    with pytest.raises(ValueError, match="unknown codec 'bf16'"):
        decode_regions(encode_regions(tokens, "float32"), 3, "bf16")
    with pytest.raises(ValueError, match="frames of regions"):
        VideoPoint("v", np.ones(DIM), np.ones((T, FRAME_DIM)), regions=np.ones((T + 1, CELLS, WIDTH)))


# ---- a real store --------------------------------------------------------------------
def _settings(path, region_dtype: str) -> Settings:
    return Settings(store=StoreSettings(path=str(path), upsert_batch=3, filter_fields=FILTER_FIELDS,
                                        region_dtype=region_dtype))


@pytest.fixture(scope="module")
def stores(tmp_path_factory, ray_local):
    """One in-process store per codec, and the embedded actor (uint8, the default)."""
    from qdrant_client import QdrantClient

    made: dict[str, VectorStore] = {}
    for codec in ("uint8", "float16", "float32"):
        settings = _settings(tmp_path_factory.mktemp(f"regions-{codec}"), codec)
        made[codec] = VectorStore.in_process(QdrantClient(path=settings.store.path), settings.store)
    embedded = _settings(tmp_path_factory.mktemp("regions-embedded"), "uint8")
    made["embedded"] = open_store(embedded)
    yield made
    for store in made.values():
        store.close()
    shutdown_embedded_store(embedded)


def _points_with_regions(n: int, seed: int) -> list[VideoPoint]:
    rng = np.random.default_rng(seed)
    points = []
    for i in range(n):
        base = _point(i, rng)
        payload = {**base.payload, REGION_ENCODER_FIELD: "enc-1:regions:2x2:16"}
        points.append(VideoPoint(base.video_id, base.video_vector, base.frames, payload, regions=regions_of(rng)))
    return points


TOLERANCE = {"uint8": step(WIDTH) / 2 + 1e-6, "float16": 2 ** -11, "float32": 1e-7, "embedded": step(WIDTH) / 2 + 1e-6}


@pytest.mark.parametrize("which", ["uint8", "float16", "float32", "embedded"])
def test_regions_round_trip_through_every_read(stores, which):
    store = stores[which]
    codec = "uint8" if which == "embedded" else which
    name = collection_name(f"r{uuid.uuid4().hex[:8]}")
    assert store.ensure_collection(name, DIM, FRAME_DIM, region_dim=WIDTH) is True
    assert store.ensure_collection(name, DIM, FRAME_DIM, region_dim=WIDTH) is False
    points = _points_with_regions(6, seed=3)
    by_id = {p.video_id: p for p in points}
    tol = TOLERANCE[which]
    try:
        assert store.upsert(name, points) == 6

        def check(video_id: str, regions: np.ndarray | None, payload: dict) -> None:
            assert regions is not None, video_id
            assert regions.shape == (T, CELLS, WIDTH) and regions.dtype == np.float32
            np.testing.assert_allclose(regions, by_id[video_id].regions, atol=tol, rtol=0)
            assert payload[REGION_CODEC_FIELD] == codec
            assert payload[REGION_ENCODER_FIELD] == "enc-1:regions:2x2:16"
            public = public_payload(payload)
            assert REGION_CODEC_FIELD not in public and public[REGION_ENCODER_FIELD] == "enc-1:regions:2x2:16"

        got = store.get(name, ["vid-4", "vid-1"], with_vectors=True)
        assert [g.video_id for g in got] == ["vid-4", "vid-1"]
        for video in got:
            check(video.video_id, video.regions, video.payload)
            np.testing.assert_allclose(video.frames, by_id[video.video_id].frames, atol=1e-5)
        assert store.get(name, ["vid-4"])[0].regions is None  # no vectors asked, none decoded

        hits = store.query(name, points[2].video_vector, limit=6, with_frames=True)
        assert hits[0].video_id == "vid-2" and len(hits) == 6
        for hit in hits:
            check(hit.video_id, hit.regions, hit.payload)
        assert store.query(name, points[2].video_vector, limit=2)[0].regions is None

        groups = store.query_groups(name, points[3].video_vector, limit=4, group_size=1, with_frames=True)
        assert groups[0][0].video_id == "vid-3" and len(groups) == 4
        for group in groups:
            check(group[0].video_id, group[0].regions, group[0].payload)

        scrolled = [v for page in store.scroll(name, batch_size=4, with_vectors=True) for v in page]
        assert sorted(v.video_id for v in scrolled) == sorted(by_id)
        for video in scrolled:
            check(video.video_id, video.regions, video.payload)
    finally:
        store.delete_collection(name, force=True)


def test_a_collection_without_regions_is_refused_for_a_region_model_and_still_serves_others(stores):
    store = stores["embedded"]
    name = collection_name(f"p{uuid.uuid4().hex[:8]}")
    assert store.ensure_collection(name, DIM, FRAME_DIM) is True
    try:
        with pytest.raises(StoreError, match=r"no 16-d region tokens.*re-index"):
            store.ensure_collection(name, DIM, FRAME_DIM, region_dim=WIDTH)
        # Points without regions in a collection without regions: as before.
        rng = np.random.default_rng(4)
        plain = [_point(i, rng) for i in range(3)]
        assert store.ensure_collection(name, DIM, FRAME_DIM) is False
        assert store.upsert(name, plain) == 3
        (video,) = store.get(name, ["vid-1"], with_vectors=True)
        assert video.regions is None and REGION_CODEC_FIELD not in video.payload
        assert video.payload == plain[1].payload
        np.testing.assert_allclose(video.frames, plain[1].frames, atol=1e-5)
        hit = store.query(name, plain[0].video_vector, limit=1, with_frames=True)[0]
        assert hit.video_id == "vid-0" and hit.regions is None and hit.frames.shape == (T, FRAME_DIM)
        [[group_hit]] = store.query_groups(name, plain[0].video_vector, limit=1, with_frames=True)
        assert group_hit.regions is None and group_hit.video is not None
    finally:
        store.delete_collection(name, force=True)

    # A region collection of another width is refused too (another grid or width is a re-decode).
    other = collection_name(f"w{uuid.uuid4().hex[:8]}")
    store.ensure_collection(other, DIM, FRAME_DIM, region_dim=WIDTH)
    try:
        with pytest.raises(StoreError, match="no 8-d region tokens"):
            store.ensure_collection(other, DIM, FRAME_DIM, region_dim=8)
        with pytest.raises(ValueError, match="region_dim"):
            store.ensure_collection(other, DIM, FRAME_DIM, region_dim=0)
    finally:
        store.delete_collection(other, force=True)
