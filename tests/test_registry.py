"""Model registry against real storage: a local directory and fsspec's memory:// filesystem."""
from __future__ import annotations

import json
import multiprocessing
import struct
import threading
import uuid

import fsspec
import pytest
import torch

from vidsearch import registry as registry_module
from vidsearch.registry import (ChecksumMismatch, InvalidManifest, InvalidName, Manifest,
                                ModelRegistry, RegistryError, VersionNotFound)

FIELDS = {"frame_encoder": "open_clip:tiny:test", "architecture": {"head": "meanP", "dim": 8},
          "training": {"lr": 1e-4, "epochs": 1}, "metrics": {"R@1": 12.5}}


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"head.weight": torch.randn(4, 8, generator=gen),
            "head.bias": torch.zeros(4, dtype=torch.float16),
            "step": torch.tensor([seed], dtype=torch.int64)}


@pytest.fixture(params=["local", "memory"])
def root(request, tmp_path):
    if request.param == "local":
        yield str(tmp_path / "registry")
        return
    # memory:// is one process-wide store: give each test its own root and clean it up.
    url = f"memory://registry-{uuid.uuid4().hex}"
    yield url
    fs, path = fsspec.core.url_to_fs(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


@pytest.fixture
def reg(root) -> ModelRegistry:
    return ModelRegistry(root)


def _fs_path(reg: ModelRegistry, *parts: str):
    fs, path = fsspec.core.url_to_fs(reg.root)
    return fs, "/".join([path.rstrip("/"), *parts])


def _put(reg: ModelRegistry, data: bytes, *parts: str) -> None:
    """Write a file behind the registry's back (as a crashed publisher or an attacker would)."""
    fs, path = _fs_path(reg, *parts)
    fs.makedirs(path.rpartition("/")[0], exist_ok=True)
    fs.pipe_file(path, data)


# ---- publish / load -----------------------------------------------------------------------
def test_publish_load_round_trip(reg):
    tensors = _tensors(1)
    version = reg.publish("clip4clip", tensors, {**FIELDS, "parent": None},
                          extra_files={"tokenizer.json": b'{"vocab": 3}'})
    assert registry_module._VERSION_RE.match(version)
    loaded, manifest = reg.load("clip4clip", version)
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype
        assert torch.equal(loaded[name], tensor)
    assert manifest.version == version
    assert manifest.parent is None
    assert manifest.frame_encoder == FIELDS["frame_encoder"]
    assert manifest.architecture == FIELDS["architecture"]
    assert manifest.training == FIELDS["training"]
    assert manifest.metrics == FIELDS["metrics"]
    assert set(manifest.files) == {"weights.safetensors", "tokenizer.json"}
    assert manifest.created_at.endswith("+00:00")
    assert reg.read_file("clip4clip", version, "tokenizer.json") == b'{"vocab": 3}'
    assert reg.list_versions("clip4clip") == [version]
    assert reg.list_models() == ["clip4clip"]
    assert reg.get_manifest("clip4clip", version) == manifest


def test_manifest_defaults_and_dict_round_trip(reg):
    version = reg.publish("m", _tensors(), {"frame_encoder": "enc", "architecture": {"a": 1}})
    manifest = reg.get_manifest("m", version)
    assert (manifest.parent, manifest.training, manifest.metrics) == (None, {}, {})
    assert Manifest.from_dict(manifest.to_dict()) == manifest
    # The stored manifest.json is plain JSON with exactly the contract's fields.
    fs, path = _fs_path(reg, "m", version, "manifest.json")
    stored = json.loads(fs.cat_file(path))
    assert set(stored) == {"version", "parent", "frame_encoder", "architecture", "training",
                           "metrics", "files", "created_at"}


def test_parent_lineage_is_recorded(reg):
    first = reg.publish("m", _tensors(1), FIELDS)
    second = reg.publish("m", _tensors(2), {**FIELDS, "parent": first})
    assert reg.get_manifest("m", second).parent == first
    assert reg.list_versions("m") == sorted([first, second])


def test_tied_and_non_contiguous_tensors_are_stored(reg):
    # A state_dict with tied weights shares storage, and a transposed weight is not
    # contiguous; safetensors refuses both as they are, the registry stores both.
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    version = reg.publish("m", {"a": base, "tied": base, "t": base.t()}, FIELDS)
    loaded, _ = reg.load("m", version)
    assert torch.equal(loaded["a"], base) and torch.equal(loaded["tied"], base)
    assert torch.equal(loaded["t"], base.t())


def test_weights_file_is_safetensors(reg):
    version = reg.publish("m", _tensors(3), FIELDS)
    fs, path = _fs_path(reg, "m", version, "weights.safetensors")
    data = fs.cat_file(path)
    # safetensors: u64 little-endian header length, then a JSON header, then raw bytes.
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + header_len])
    assert header["head.weight"]["dtype"] == "F32" and header["head.weight"]["shape"] == [4, 8]
    assert header["head.bias"]["dtype"] == "F16"
    assert header["step"]["dtype"] == "I64"
    assert header["__metadata__"] == {"model_name": "m", "version": version}
    end = max(entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__")
    assert len(data) == 8 + header_len + end
    assert not data.startswith(b"\x80") and not data.startswith(b"PK")  # no pickle, no zip


# ---- integrity ------------------------------------------------------------------------------
def test_tampered_weights_are_refused(reg):
    version = reg.publish("m", _tensors(), FIELDS)
    fs, path = _fs_path(reg, "m", version, "weights.safetensors")
    data = bytearray(fs.cat_file(path))
    data[-1] ^= 0xFF  # one flipped byte inside the tensor data
    fs.pipe_file(path, bytes(data))
    with pytest.raises(ChecksumMismatch, match=r"m/.*/weights\.safetensors is corrupt") as err:
        reg.load("m", version)
    assert err.value.filename == "weights.safetensors"
    assert err.value.actual != err.value.expected


def test_tampered_extra_file_is_refused_on_load(reg):
    version = reg.publish("m", _tensors(), FIELDS, extra_files={"config.json": b"{}"})
    fs, path = _fs_path(reg, "m", version, "config.json")
    fs.pipe_file(path, b'{"evil": 1}')
    with pytest.raises(ChecksumMismatch, match="config.json"):
        reg.load("m", version)
    with pytest.raises(ChecksumMismatch, match="config.json"):
        reg.read_file("m", version, "config.json")


def test_missing_weights_file_is_refused(reg):
    version = reg.publish("m", _tensors(), FIELDS)
    fs, path = _fs_path(reg, "m", version, "weights.safetensors")
    fs.rm(path)
    with pytest.raises(ChecksumMismatch, match="listed in the manifest but missing") as err:
        reg.load("m", version)
    assert err.value.actual is None


def test_read_file_unknown_name(reg):
    version = reg.publish("m", _tensors(), FIELDS)
    with pytest.raises(RegistryError, match="has no file 'nope.bin'"):
        reg.read_file("m", version, "nope.bin")


def test_corrupt_manifest_is_reported(reg):
    version = reg.publish("m", _tensors(), FIELDS)
    fs, path = _fs_path(reg, "m", version, "manifest.json")
    fs.pipe_file(path, b"{not json")
    with pytest.raises(InvalidManifest, match="not valid JSON"):
        reg.load("m", version)


def test_manifest_version_must_match_its_directory(reg):
    version = reg.publish("m", _tensors(), FIELDS)
    fs, path = _fs_path(reg, "m", version, "manifest.json")
    stored = json.loads(fs.cat_file(path))
    stored["version"] = "20000101T000000-abcdef"
    fs.pipe_file(path, json.dumps(stored).encode())
    with pytest.raises(InvalidManifest, match="claims version"):
        reg.get_manifest("m", version)


def test_manifest_with_unsafe_file_name_is_refused(reg):
    # A manifest must not be able to make load() read outside its version directory.
    version = reg.publish("m", _tensors(), FIELDS)
    fs, path = _fs_path(reg, "m", version, "manifest.json")
    stored = json.loads(fs.cat_file(path))
    stored["files"]["../../aliases.json"] = "0" * 64
    fs.pipe_file(path, json.dumps(stored).encode())
    with pytest.raises(InvalidManifest, match="unsafe file name"):
        reg.load("m", version)


# ---- visibility -----------------------------------------------------------------------------
def test_half_published_version_is_invisible(reg):
    done = reg.publish("m", _tensors(), FIELDS)
    # What a publisher that crashed before its manifest leaves behind.
    half = "20300101T000000-abcdef"
    _put(reg, b"partial", "m", half, "weights.safetensors")
    assert reg.list_versions("m") == [done]
    with pytest.raises(VersionNotFound, match=f"has no version '{half}'"):
        reg.load("m", half)
    with pytest.raises(VersionNotFound):
        reg.set_alias("m", "production", half)


def test_model_without_manifest_is_not_listed(reg):
    reg.publish("real", _tensors(), FIELDS)
    _put(reg, b"partial", "ghost", "20300101T000000-abcdef", "weights.safetensors")
    assert reg.list_models() == ["real"]
    assert reg.list_versions("ghost") == []


def test_root_with_glob_characters(tmp_path):
    reg = ModelRegistry(str(tmp_path / "odd[1]*root"))
    version = reg.publish("m", _tensors(), FIELDS)
    assert reg.list_versions("m") == [version]
    assert reg.list_models() == ["m"]


def test_empty_registry(reg):
    assert reg.list_models() == []
    assert reg.list_versions("m") == []
    assert reg.get_alias("m", "production") is None
    with pytest.raises(VersionNotFound,
                       match=r"model 'm' has no alias 'production' \(known: none; aliases: none\)"):
        reg.load("m")


# ---- errors for refs ----------------------------------------------------------------------
def test_missing_version_lists_what_exists(reg):
    a = reg.publish("m", _tensors(1), FIELDS)
    b = reg.publish("m", _tensors(2), FIELDS)
    reg.set_alias("m", "production", a)
    with pytest.raises(VersionNotFound) as err:
        reg.load("m", "20000101T000000-000000")
    message = str(err.value)
    assert message.startswith("model 'm' has no version '20000101T000000-000000'")
    assert f"known: {', '.join(sorted([a, b]))}; aliases: production" in message


def test_missing_alias_is_clear(reg):
    reg.publish("m", _tensors(), FIELDS)
    with pytest.raises(VersionNotFound, match="model 'm' has no alias 'staging'"):
        reg.resolve("m", "staging")
    with pytest.raises(VersionNotFound, match="no alias 'production'"):
        reg.load("m")  # the default ref


def test_ref_that_is_neither_version_nor_alias(reg):
    reg.publish("m", _tensors(), FIELDS)
    for ref in ("../m", "Production", "", "2024", None):
        with pytest.raises(VersionNotFound, match="has no version or alias"):
            reg.resolve("m", ref)


def test_alias_pointing_at_vanished_version(reg):
    version = reg.publish("m", _tensors(), FIELDS)
    reg.set_alias("m", "production", version)
    fs, path = _fs_path(reg, "m", version, "manifest.json")
    fs.rm(path)
    with pytest.raises(VersionNotFound, match=f"no version '{version}' behind alias 'production'"):
        reg.load("m")


def test_long_version_lists_are_shortened():
    listed = registry_module._shorten([f"v{i:02d}" for i in range(13)])
    assert listed == "v03, v04, v05, v06, v07, v08, v09, v10, v11, v12 and 3 older"


# ---- aliases ----------------------------------------------------------------------------------
def test_aliases_set_get_move(reg):
    a = reg.publish("m", _tensors(1), FIELDS)
    b = reg.publish("m", _tensors(2), FIELDS)
    assert reg.get_alias("m", "production") is None
    reg.set_alias("m", "production", a)
    reg.set_alias("m", "staging", b)
    assert reg.get_alias("m", "production") == a
    assert reg.get_alias("m", "staging") == b
    assert reg.resolve("m", "production") == a
    tensors, manifest = reg.load("m")  # production by default
    assert manifest.version == a and torch.equal(tensors["step"], _tensors(1)["step"])
    # Promote staging: an alias given as the target is resolved to its version.
    reg.set_alias("m", "production", "staging")
    assert reg.get_alias("m", "production") == b
    assert reg.list_aliases("m") == {"production": b, "staging": b}
    # Roll back.
    reg.set_alias("m", "production", a)
    assert reg.load("m")[1].version == a
    fs, path = _fs_path(reg, "m", "aliases.json")
    assert json.loads(fs.cat_file(path)) == {"production": a, "staging": b}
    # No temporary files are left next to aliases.json.
    _, model_dir = _fs_path(reg, "m")
    assert not [p for p in fs.ls(model_dir, detail=False) if p.rsplit("/", 1)[-1].startswith(".")]


def test_set_alias_on_unknown_version_is_refused(reg):
    a = reg.publish("m", _tensors(), FIELDS)
    reg.set_alias("m", "production", a)
    with pytest.raises(VersionNotFound, match="has no version '20000101T000000-000000'"):
        reg.set_alias("m", "production", "20000101T000000-000000")
    with pytest.raises(VersionNotFound, match="has no alias 'staging'"):
        reg.set_alias("m", "production", "staging")
    assert reg.get_alias("m", "production") == a  # unchanged
    with pytest.raises(VersionNotFound):
        reg.set_alias("other", "production", a)  # versions belong to one model


@pytest.mark.parametrize("alias", ["", "Production", "1st", "a/b", "../x", "x" * 65, None])
def test_bad_alias_names_refused(reg, alias):
    version = reg.publish("m", _tensors(), FIELDS)
    with pytest.raises(InvalidName, match="invalid alias"):
        reg.set_alias("m", alias, version)
    with pytest.raises(InvalidName, match="invalid alias"):
        reg.get_alias("m", alias)


def test_corrupt_aliases_file_is_reported(reg):
    reg.publish("m", _tensors(), FIELDS)
    fs, path = _fs_path(reg, "m", "aliases.json")
    fs.pipe_file(path, b"[1, 2")
    with pytest.raises(RegistryError, match="aliases.json of model 'm' is not valid JSON"):
        reg.get_alias("m", "production")
    fs.pipe_file(path, b'["production"]')
    with pytest.raises(RegistryError, match="must map alias names to versions"):
        reg.get_alias("m", "production")


# ---- bad inputs to publish ----------------------------------------------------------------
@pytest.mark.parametrize("name", ["", "Upper", "../escape", "a/b", "-lead", ".hidden", "sp ace",
                                  "x" * 65, None, 7])
def test_bad_model_names_refused(reg, name):
    with pytest.raises(InvalidName, match="invalid model name"):
        reg.publish(name, _tensors(), FIELDS)
    with pytest.raises(InvalidName, match="invalid model name"):
        reg.list_versions(name)
    with pytest.raises(InvalidName, match="invalid model name"):
        reg.load(name)


@pytest.mark.parametrize("fields, message", [
    ({"architecture": {}}, "'frame_encoder' is required"),
    ({"frame_encoder": "enc"}, "'architecture' is required"),
    ({**FIELDS, "frame_encoder": ""}, "'frame_encoder' must be a non-empty string"),
    ({**FIELDS, "frame_encoder": 3}, "'frame_encoder' must be a non-empty string"),
    ({**FIELDS, "architecture": [1]}, "'architecture' must be a mapping"),
    ({**FIELDS, "training": {1: "x"}}, "'training' must be a mapping with string keys"),
    ({**FIELDS, "metrics": {"R@1": float("nan")}}, "'metrics' is not plain JSON"),
    ({**FIELDS, "metrics": {"t": torch.tensor(1.0)}}, "'metrics' is not plain JSON"),
    ({**FIELDS, "parent": 5}, "'parent' must be a version string or None"),
    ({**FIELDS, "version": "x"}, "version are set by the registry"),
    ({**FIELDS, "files": {}}, "files are set by the registry"),
    ({**FIELDS, "metric": {}}, "unknown manifest field"),
    ("not a mapping", "manifest_fields must be a mapping"),
])
def test_bad_manifest_fields_refused(reg, fields, message):
    with pytest.raises(InvalidManifest, match=message):
        reg.publish("m", _tensors(), fields)
    assert reg.list_versions("m") == []


@pytest.mark.parametrize("tensors, message", [
    ({}, "non-empty mapping"),
    ([torch.zeros(1)], "non-empty mapping"),
    ({"w": [1.0, 2.0]}, "'w' is a list, not a torch.Tensor"),
    ({"": torch.zeros(1)}, "tensor names must be non-empty strings"),
    ({3: torch.zeros(1)}, "tensor names must be non-empty strings"),
    ({"w": torch.zeros(2).to_sparse()}, "'w' must be a dense tensor"),
    ({"w": torch.empty(2, device="meta")}, "'w' must be a dense tensor"),
])
def test_bad_tensors_refused(reg, tensors, message):
    with pytest.raises(RegistryError, match=message):
        reg.publish("m", tensors, FIELDS)
    assert reg.list_versions("m") == []


@pytest.mark.parametrize("extra, error, message", [
    ({"manifest.json": b"{}"}, InvalidName, "reserved"),
    ({"weights.safetensors": b""}, InvalidName, "reserved"),
    ({"../up.txt": b""}, InvalidName, "invalid extra file name"),
    ({"sub/dir.txt": b""}, InvalidName, "invalid extra file name"),
    ({".hidden": b""}, InvalidName, "invalid extra file name"),
    ({"a.txt": "text"}, RegistryError, "must be bytes"),
    (["a.txt"], RegistryError, "must be a mapping"),
])
def test_bad_extra_files_refused(reg, extra, error, message):
    with pytest.raises(error, match=message):
        reg.publish("m", _tensors(), FIELDS, extra_files=extra)


@pytest.mark.parametrize("root", ["", "   ", None])
def test_bad_root_refused(root):
    with pytest.raises(RegistryError, match="registry root"):
        ModelRegistry(root)


def test_unknown_storage_protocol_refused():
    with pytest.raises(RegistryError, match="cannot open registry root 'nosuchproto://x'"):
        ModelRegistry("nosuchproto://x")


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("metrics"), "missing field"),
    (lambda d: d.update(extra=1), "unknown field"),
    (lambda d: d.update(version="v1"), "not a version id"),
    (lambda d: d.update(files={}), "must be a mapping that includes weights.safetensors"),
    (lambda d: d["files"].update({"weights.safetensors": "abc"}), "bad sha256"),
    (lambda d: d.update(created_at="yesterday"), "not an ISO 8601 UTC time"),
    (lambda d: d.update(created_at="2024-01-01T00:00:00"), "not an ISO 8601 UTC time"),
    (lambda d: d.update(created_at="2024-01-01T00:00:00+02:00"), "not an ISO 8601 UTC time"),
])
def test_manifest_from_dict_validation(change, message):
    good = {"version": "20240101T000000-abcdef", "parent": None, "frame_encoder": "enc",
            "architecture": {}, "training": {}, "metrics": {},
            "files": {"weights.safetensors": "0" * 64}, "created_at": "2024-01-01T00:00:00+00:00"}
    assert Manifest.from_dict(good).version == good["version"]
    change(good)
    with pytest.raises(InvalidManifest, match=message):
        Manifest.from_dict(good)
    with pytest.raises(InvalidManifest, match="must be a JSON object"):
        Manifest.from_dict([1])


def test_manifest_is_frozen_and_detached():
    fields = {"version": "20240101T000000-abcdef", "parent": None, "frame_encoder": "enc",
              "architecture": {"k": [1]}, "training": {}, "metrics": {},
              "files": {"weights.safetensors": "0" * 64}, "created_at": "2024-01-01T00:00:00+00:00"}
    manifest = Manifest.from_dict(fields)
    fields["architecture"]["k"].append(2)
    assert manifest.architecture == {"k": [1]}
    with pytest.raises(AttributeError):
        manifest.version = "other"  # type: ignore[misc]


# ---- concurrency --------------------------------------------------------------------------------
def test_concurrent_publishers_in_threads(reg):
    barrier = threading.Barrier(6)
    versions: list[str] = []
    errors: list[BaseException] = []

    def publish(seed: int) -> None:
        try:
            barrier.wait()
            versions.append(reg.publish("m", _tensors(seed), FIELDS))
        except BaseException as exc:  # surfaced below; a thread can't fail the test itself
            errors.append(exc)

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(set(versions)) == 6
    assert reg.list_versions("m") == sorted(versions)
    steps = sorted(int(reg.load("m", v)[0]["step"]) for v in versions)
    assert steps == list(range(6))


def _publish_in_child(root: str, seed: int, barrier, queue) -> None:
    barrier.wait(timeout=60)
    queue.put(ModelRegistry(root).publish("m", _tensors(seed), FIELDS))


def test_concurrent_publishers_in_processes(tmp_path):
    root = str(tmp_path / "registry")
    # spawn: a forked child of a process that has used torch's thread pools can hang.
    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_publish_in_child, args=(root, seed, barrier, queue)) for seed in (1, 2)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout=120)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    versions = {queue.get(timeout=10), queue.get(timeout=10)}
    assert len(versions) == 2
    reg = ModelRegistry(root)
    assert reg.list_versions("m") == sorted(versions)
    assert sorted(int(reg.load("m", v)[0]["step"]) for v in versions) == [1, 2]


def test_version_id_collision_draws_a_new_id(reg, monkeypatch):
    # Force the id generator to repeat itself: the second publish must notice the taken
    # directory and move on to the next id, not overwrite the first version.
    ids = iter(["20240101T000000-aaaaaa", "20240101T000000-aaaaaa", "20240101T000000-bbbbbb"])
    monkeypatch.setattr(registry_module, "_new_version_id", lambda now: next(ids))
    first = reg.publish("m", _tensors(1), FIELDS)
    second = reg.publish("m", _tensors(2), FIELDS)
    assert (first, second) == ("20240101T000000-aaaaaa", "20240101T000000-bbbbbb")
    assert int(reg.load("m", first)[0]["step"]) == 1


def test_version_id_exhaustion_is_an_error(reg, monkeypatch):
    reg.publish("m", _tensors(), FIELDS)
    taken = reg.list_versions("m")[0]
    monkeypatch.setattr(registry_module, "_new_version_id", lambda now: taken)
    with pytest.raises(RegistryError, match="could not allocate a unique version id"):
        reg.publish("m", _tensors(), FIELDS)


def test_version_ids_sort_by_time():
    from datetime import datetime, timezone
    early = registry_module._new_version_id(datetime(2024, 1, 1, 9, 0, 0, tzinfo=timezone.utc))
    late = registry_module._new_version_id(datetime(2024, 1, 1, 10, 0, 0, tzinfo=timezone.utc))
    assert early.startswith("20240101T090000-") and early < late
