"""Versioned model registry on a local path or any fsspec URL (s3://, gs://, memory://).

Layout (see ARCHITECTURE.md, "Model registry")::

    <root>/<model_name>/<version>/manifest.json
    <root>/<model_name>/<version>/weights.safetensors   (+ optional extra files)
    <root>/<model_name>/aliases.json                    {"production": "<version>", ...}

Guarantees, without any lock:

* **Unique versions.** A version id is ``YYYYmmddTHHMMSS-<6 hex>`` (UTC, sortable to the
  second). On filesystems with an atomic ``mkdir`` (local, memory) the version directory is
  claimed with an exclusive mkdir, and a collision draws a new id; on object stores the
  24 random bits make a clash within one second vanishingly unlikely.
* **Atomic publish.** Every file is written first and ``manifest.json`` last; a version
  without a manifest is invisible to every read. On local disks the manifest and
  ``aliases.json`` are written to a temporary name and renamed into place, so a reader never
  sees half a file; on object stores a single put is already atomic.
* **Integrity.** The manifest records the sha256 of every file; ``load`` verifies them all
  before deserialising anything. Weights are safetensors only, never pickle.

Known limit: ``set_alias`` is a read-modify-write of ``aliases.json``. Two writers moving
*different* aliases of the same model at the same instant can lose one update (the file is
never corrupt). The trainer is the only alias writer, so this is accepted.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import secrets
from datetime import datetime, timezone
from typing import Any, Mapping

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

__all__ = [
    "ModelRegistry", "Manifest", "RegistryError", "VersionNotFound", "ChecksumMismatch",
    "InvalidManifest", "InvalidName", "WEIGHTS_FILE", "MANIFEST_FILE", "ALIASES_FILE",
]

WEIGHTS_FILE = "weights.safetensors"
MANIFEST_FILE = "manifest.json"
ALIASES_FILE = "aliases.json"

# Lowercase only: "Foo" and "foo" would be the same directory on case-insensitive disks.
_MODEL_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
# Aliases start with a letter and versions with a digit, so a ref is never ambiguous.
_ALIAS_RE = re.compile(r"^[a-z][a-z0-9_-]{0,63}$")
_VERSION_RE = re.compile(r"^\d{8}T\d{6}-[0-9a-f]{6}$")
# Plain file names only: a manifest must never be able to point outside its version directory.
_FILE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_RESERVED_FILES = frozenset({MANIFEST_FILE, WEIGHTS_FILE, ALIASES_FILE})
# Fields the registry fills in itself; a caller passing them is a bug worth reporting.
_REGISTRY_FIELDS = frozenset({"version", "files", "created_at"})
_CALLER_FIELDS = {"parent": None, "frame_encoder": ..., "architecture": ...,
                  "training": dict, "metrics": dict}  # ... = required, else the default
_MAX_ID_ATTEMPTS = 8
_MAX_LISTED = 10


class RegistryError(Exception):
    """Base class of every registry failure."""


class VersionNotFound(RegistryError, LookupError):
    """A version or alias does not exist; the message lists what does."""


class ChecksumMismatch(RegistryError):
    """A stored file is missing or its sha256 differs from the manifest."""

    def __init__(self, message: str, *, filename: str, expected: str, actual: str | None) -> None:
        super().__init__(message)
        self.filename = filename
        self.expected = expected
        self.actual = actual  # None when the file is missing


class InvalidManifest(RegistryError, ValueError):
    """Manifest fields are missing, of the wrong type, or not valid JSON."""


class InvalidName(RegistryError, ValueError):
    """A model name, alias or file name is not a safe slug."""


@dataclasses.dataclass(frozen=True)
class Manifest:
    """The metadata of one published version (``manifest.json``)."""

    version: str
    parent: str | None
    frame_encoder: str
    architecture: dict[str, Any]
    training: dict[str, Any]
    metrics: dict[str, Any]
    files: dict[str, str]  # file name -> sha256 hex
    created_at: str  # ISO 8601, UTC

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Manifest":
        """Validate and build; raises InvalidManifest naming the first bad field."""
        if not isinstance(data, Mapping):
            raise InvalidManifest(f"manifest must be a JSON object, got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in data]
        if missing:
            raise InvalidManifest(f"manifest is missing field(s): {', '.join(missing)}")
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise InvalidManifest(f"manifest has unknown field(s): {', '.join(unknown)}")
        version = data["version"]
        if not isinstance(version, str) or not _VERSION_RE.match(version):
            raise InvalidManifest(f"manifest field 'version' is not a version id: {version!r}")
        _check_caller_fields(data)
        files = data["files"]
        if not isinstance(files, Mapping) or WEIGHTS_FILE not in files:
            raise InvalidManifest(f"manifest field 'files' must be a mapping that includes {WEIGHTS_FILE}")
        for name, digest in files.items():
            if not isinstance(name, str) or not _FILE_NAME_RE.match(name):
                raise InvalidManifest(f"manifest field 'files' has an unsafe file name: {name!r}")
            if not isinstance(digest, str) or not _SHA256_RE.match(digest):
                raise InvalidManifest(f"manifest field 'files' has a bad sha256 for {name!r}: {digest!r}")
        created_at = data["created_at"]
        try:
            parsed = datetime.fromisoformat(created_at) if isinstance(created_at, str) else None
        except ValueError:
            parsed = None
        if parsed is None or parsed.utcoffset() != timezone.utc.utcoffset(None):
            raise InvalidManifest(f"manifest field 'created_at' is not an ISO 8601 UTC time: {created_at!r}")
        # Deep copies through JSON: the frozen manifest must not share dicts with the caller.
        return cls(**json.loads(json.dumps({n: data[n] for n in names})))


def _check_caller_fields(data: Mapping[str, Any]) -> None:
    parent = data["parent"]
    if parent is not None and (not isinstance(parent, str) or not parent):
        raise InvalidManifest(f"manifest field 'parent' must be a version string or None, got {parent!r}")
    encoder = data["frame_encoder"]
    if not isinstance(encoder, str) or not encoder.strip():
        raise InvalidManifest(f"manifest field 'frame_encoder' must be a non-empty string, got {encoder!r}")
    for key in ("architecture", "training", "metrics"):
        value = data[key]
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise InvalidManifest(f"manifest field '{key}' must be a mapping with string keys")
        try:
            # allow_nan=False: NaN/Infinity are not JSON, and other readers would choke on them.
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InvalidManifest(f"manifest field '{key}' is not plain JSON: {exc}") from None


def _new_version_id(now: datetime) -> str:
    return f"{now:%Y%m%dT%H%M%S}-{secrets.token_hex(3)}"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_model_name(model_name: str) -> None:
    if not isinstance(model_name, str) or not _MODEL_NAME_RE.match(model_name):
        raise InvalidName(
            f"invalid model name {model_name!r}: use 1-64 characters of a-z, 0-9, '.', '_', '-', "
            "starting with a letter or digit")


def _check_alias(alias: str) -> None:
    if not isinstance(alias, str) or not _ALIAS_RE.match(alias):
        raise InvalidName(
            f"invalid alias {alias!r}: use 1-64 characters of a-z, 0-9, '_', '-', starting with a letter")


def _prepare_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, and no two tensors sharing storage (safetensors refuses shared memory;
    tied weights in a state_dict are common, so the duplicate is cloned rather than refused)."""
    if not isinstance(tensors, Mapping) or not tensors:
        raise RegistryError("tensors must be a non-empty mapping of name -> torch.Tensor")
    prepared: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not name:
            raise RegistryError(f"tensor names must be non-empty strings, got {name!r}")
        if not isinstance(tensor, torch.Tensor):
            raise RegistryError(f"tensor {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
        if tensor.layout != torch.strided or tensor.is_meta:
            # safetensors stores dense data only; checked here so nothing is claimed on disk.
            raise RegistryError(f"tensor {name!r} must be a dense tensor with data "
                                f"(got layout {tensor.layout}, device {tensor.device})")
        tensor = tensor.detach().cpu().contiguous()
        storage = tensor.untyped_storage()
        if storage.nbytes():
            ptr = storage.data_ptr()
            if ptr in seen_storages:
                tensor = tensor.clone()
            else:
                seen_storages.add(ptr)
        prepared[name] = tensor
    return prepared


def _shorten(items: list[str]) -> str:
    if not items:
        return "none"
    if len(items) <= _MAX_LISTED:
        return ", ".join(items)
    # Newest last: show the tail, which is what an operator is usually looking for.
    return f"{', '.join(items[-_MAX_LISTED:])} and {len(items) - _MAX_LISTED} older"


class ModelRegistry:
    """Publish, list, load and alias model versions under one root (path or fsspec URL)."""

    def __init__(self, root: str, *, storage_options: Mapping[str, Any] | None = None) -> None:
        if not isinstance(root, str) or not root.strip():
            raise RegistryError(f"registry root must be a non-empty path or URL, got {root!r}")
        self.root = root
        try:
            self._fs, path = fsspec.core.url_to_fs(root, **dict(storage_options or {}))
        except (ImportError, ValueError) as exc:
            # e.g. s3:// without s3fs installed, or a misspelt protocol
            raise RegistryError(f"cannot open registry root {root!r}: {exc}") from None
        self._root_path = path.rstrip("/") or "/"
        # Only a local disk has rename-over as an atomic primitive worth using.
        self._local = isinstance(self._fs, LocalFileSystem)

    def __repr__(self) -> str:
        return f"ModelRegistry({self.root!r})"

    # ---- paths -------------------------------------------------------------------------
    def _model_dir(self, model_name: str) -> str:
        _check_model_name(model_name)
        return f"{self._root_path}/{model_name}"

    def _write_atomic(self, path: str, data: bytes) -> None:
        if self._local:
            directory, _, name = path.rpartition("/")
            tmp = f"{directory}/.{name}.{secrets.token_hex(4)}.tmp"
            self._fs.pipe_file(tmp, data)
            self._fs.mv(tmp, path)  # os.rename underneath: replaces atomically
        else:
            self._fs.pipe_file(path, data)

    def _claim_version(self, model_dir: str) -> tuple[str, str, datetime]:
        self._fs.makedirs(model_dir, exist_ok=True)
        for _ in range(_MAX_ID_ATTEMPTS):
            now = datetime.now(timezone.utc)
            version = _new_version_id(now)
            version_dir = f"{model_dir}/{version}"
            try:
                # Exclusive on local and memory filesystems; a no-op on object stores.
                self._fs.mkdir(version_dir, create_parents=False)
            except FileExistsError:
                continue
            return version, version_dir, now
        raise RegistryError(f"could not allocate a unique version id under {model_dir} "
                            f"after {_MAX_ID_ATTEMPTS} attempts")

    # ---- writing -----------------------------------------------------------------------
    def publish(self, model_name: str, tensors: dict[str, torch.Tensor], manifest_fields: dict,
                *, extra_files: dict[str, bytes] | None = None) -> str:
        """Store a new version and return its id. ``manifest_fields`` gives ``frame_encoder`` and
        ``architecture`` (required), and ``parent`` (default None), ``training`` and ``metrics``
        (default {}); ``version``, ``files`` and ``created_at`` are set here. No alias changes."""
        model_dir = self._model_dir(model_name)
        fields = self._caller_fields(manifest_fields)
        extras = self._check_extra_files(extra_files)
        prepared = _prepare_tensors(tensors)

        version, version_dir, now = self._claim_version(model_dir)
        weights = _st_save(prepared, metadata={"model_name": model_name, "version": version})
        payloads = {WEIGHTS_FILE: weights, **extras}
        for name, data in payloads.items():
            self._fs.pipe_file(f"{version_dir}/{name}", data)
        manifest = Manifest.from_dict({
            **fields,
            "version": version,
            "files": {name: _sha256(data) for name, data in payloads.items()},
            "created_at": now.isoformat(timespec="microseconds"),
        })
        # Last write: from here on the version exists.
        self._write_atomic(f"{version_dir}/{MANIFEST_FILE}",
                           json.dumps(manifest.to_dict(), indent=2, sort_keys=True).encode())
        return version

    @staticmethod
    def _caller_fields(manifest_fields: Mapping[str, Any]) -> dict[str, Any]:
        if not isinstance(manifest_fields, Mapping):
            raise InvalidManifest("manifest_fields must be a mapping")
        reserved = sorted(_REGISTRY_FIELDS & set(manifest_fields))
        if reserved:
            raise InvalidManifest(f"manifest field(s) {', '.join(reserved)} are set by the registry")
        unknown = sorted(set(manifest_fields) - set(_CALLER_FIELDS))
        if unknown:
            raise InvalidManifest(f"unknown manifest field(s): {', '.join(unknown)} "
                                  f"(allowed: {', '.join(_CALLER_FIELDS)})")
        fields: dict[str, Any] = {}
        for key, default in _CALLER_FIELDS.items():
            if key in manifest_fields:
                fields[key] = manifest_fields[key]
            elif default is ...:
                raise InvalidManifest(f"manifest field '{key}' is required")
            else:
                fields[key] = default() if callable(default) else default
        _check_caller_fields(fields)
        return fields

    @staticmethod
    def _check_extra_files(extra_files: Mapping[str, bytes] | None) -> dict[str, bytes]:
        if extra_files is None:
            return {}
        if not isinstance(extra_files, Mapping):
            raise RegistryError("extra_files must be a mapping of file name -> bytes")
        checked: dict[str, bytes] = {}
        for name, data in extra_files.items():
            if not isinstance(name, str) or not _FILE_NAME_RE.match(name):
                raise InvalidName(f"invalid extra file name {name!r}: a plain file name "
                                  "of letters, digits, '.', '_', '-' is required")
            if name in _RESERVED_FILES:
                raise InvalidName(f"extra file name {name!r} is reserved by the registry")
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise RegistryError(f"extra file {name!r} must be bytes, got {type(data).__name__}")
            checked[name] = bytes(data)
        return checked

    def set_alias(self, model_name: str, alias: str, version: str) -> None:
        """Point ``alias`` at an existing version (an alias as ``version`` is resolved first)."""
        _check_alias(alias)
        target = self.resolve(model_name, version)
        aliases = self._read_aliases(model_name)
        aliases[alias] = target
        self._write_atomic(f"{self._model_dir(model_name)}/{ALIASES_FILE}",
                           json.dumps(aliases, indent=2, sort_keys=True).encode())

    # ---- reading -----------------------------------------------------------------------
    def list_models(self) -> list[str]:
        """Models with at least one published (manifest-bearing) version, sorted."""
        names = {model for model, version in self._manifest_paths(self._root_path, depth=3)
                 if _MODEL_NAME_RE.match(model) and _VERSION_RE.match(version)}
        return sorted(names)

    def list_versions(self, model_name: str) -> list[str]:
        """Published versions, oldest first. Directories without a manifest are not versions."""
        found = self._manifest_paths(self._model_dir(model_name), depth=2)
        return sorted(version for (version,) in found if _VERSION_RE.match(version))

    def _manifest_paths(self, base: str, depth: int) -> set[tuple[str, ...]]:
        """The directory parts leading to every manifest exactly ``depth`` levels below base.
        find() rather than glob(): a root containing '[' or '*' must not act as a pattern."""
        self._fs.invalidate_cache(base)
        prefix = base.rstrip("/") + "/"
        found = set()
        for path in self._fs.find(base, maxdepth=depth):
            parts = path[len(prefix):].split("/") if path.startswith(prefix) else []
            if len(parts) == depth and parts[-1] == MANIFEST_FILE:
                found.add(tuple(parts[:-1]))
        return found

    def _read_aliases(self, model_name: str) -> dict[str, str]:
        path = f"{self._model_dir(model_name)}/{ALIASES_FILE}"
        try:
            raw = self._fs.cat_file(path)
        except FileNotFoundError:
            return {}
        try:
            aliases = json.loads(raw)
        except ValueError as exc:
            raise RegistryError(f"{ALIASES_FILE} of model {model_name!r} is not valid JSON: {exc}") from None
        if not isinstance(aliases, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()):
            raise RegistryError(f"{ALIASES_FILE} of model {model_name!r} must map alias names to versions")
        return aliases

    def get_alias(self, model_name: str, alias: str) -> str | None:
        """The version an alias points at, or None when the alias is not set."""
        _check_alias(alias)
        return self._read_aliases(model_name).get(alias)

    def list_aliases(self, model_name: str) -> dict[str, str]:
        """All aliases of a model: {alias: version}."""
        return dict(sorted(self._read_aliases(model_name).items()))

    def _not_found(self, model_name: str, what: str, ref: str) -> VersionNotFound:
        known = _shorten(self.list_versions(model_name))
        aliases = ", ".join(sorted(self._read_aliases(model_name))) or "none"
        return VersionNotFound(f"model {model_name!r} has no {what} {ref!r} "
                               f"(known: {known}; aliases: {aliases})")

    def _has_manifest(self, model_name: str, version: str) -> bool:
        path = f"{self._model_dir(model_name)}/{version}/{MANIFEST_FILE}"
        self._fs.invalidate_cache(path.rpartition("/")[0])
        return self._fs.exists(path)

    def resolve(self, model_name: str, ref: str) -> str:
        """A version id for ``ref`` (a version id or an alias); VersionNotFound otherwise."""
        self._model_dir(model_name)  # validates the name before anything is read
        if isinstance(ref, str) and _VERSION_RE.match(ref):
            if self._has_manifest(model_name, ref):
                return ref
            raise self._not_found(model_name, "version", ref)
        if isinstance(ref, str) and _ALIAS_RE.match(ref):
            target = self._read_aliases(model_name).get(ref)
            if target is None:
                raise self._not_found(model_name, "alias", ref)
            if not _VERSION_RE.match(target) or not self._has_manifest(model_name, target):
                raise self._not_found(model_name, f"version {target!r} behind alias", ref)
            return target
        raise self._not_found(model_name, "version or alias", ref)

    def get_manifest(self, model_name: str, ref: str = "production") -> Manifest:
        """The manifest of a version or alias."""
        version = self.resolve(model_name, ref)
        path = f"{self._model_dir(model_name)}/{version}/{MANIFEST_FILE}"
        try:
            data = json.loads(self._fs.cat_file(path))
        except ValueError as exc:
            raise InvalidManifest(f"{model_name}/{version}/{MANIFEST_FILE} is not valid JSON: {exc}") from None
        manifest = Manifest.from_dict(data)
        if manifest.version != version:
            raise InvalidManifest(f"{model_name}/{version}/{MANIFEST_FILE} claims version "
                                  f"{manifest.version!r}; was the directory copied or renamed?")
        return manifest

    def _read_verified(self, model_name: str, manifest: Manifest, name: str) -> bytes:
        expected = manifest.files[name]
        where = f"{model_name}/{manifest.version}/{name}"
        try:
            data = self._fs.cat_file(f"{self._model_dir(model_name)}/{manifest.version}/{name}")
        except FileNotFoundError:
            raise ChecksumMismatch(f"{where} is listed in the manifest but missing",
                                   filename=name, expected=expected, actual=None) from None
        actual = _sha256(data)
        if actual != expected:
            raise ChecksumMismatch(f"{where} is corrupt or was modified: sha256 {actual} "
                                   f"does not match the manifest's {expected}",
                                   filename=name, expected=expected, actual=actual)
        return data

    def load(self, model_name: str, ref: str = "production") -> tuple[dict[str, torch.Tensor], Manifest]:
        """The tensors (on CPU) and manifest of a version or alias. Every file listed in the
        manifest is checked against its sha256 before the weights are deserialised."""
        manifest = self.get_manifest(model_name, ref)
        blobs = {name: self._read_verified(model_name, manifest, name) for name in manifest.files}
        return _st_load(blobs[WEIGHTS_FILE]), manifest

    def read_file(self, model_name: str, ref: str, filename: str) -> bytes:
        """One verified file of a version (e.g. an extra file given to ``publish``)."""
        manifest = self.get_manifest(model_name, ref)
        if filename not in manifest.files:
            raise RegistryError(f"{model_name}/{manifest.version} has no file {filename!r} "
                                f"(files: {', '.join(sorted(manifest.files))})")
        return self._read_verified(model_name, manifest, filename)

    def import_version(self, source: "ModelRegistry", model_name: str, ref: str = "production") -> str:
        """Copy one version from ``source`` byte for byte (same version id), checksums verified
        first and the manifest written last, as in ``publish``. Returns the version id; a
        version already here is left as it is. No alias changes."""
        manifest = source.get_manifest(model_name, ref)
        if self._has_manifest(model_name, manifest.version):
            return manifest.version
        blobs = {name: source._read_verified(model_name, manifest, name) for name in manifest.files}
        version_dir = f"{self._model_dir(model_name)}/{manifest.version}"
        self._fs.makedirs(version_dir, exist_ok=True)
        for name, data in blobs.items():
            self._fs.pipe_file(f"{version_dir}/{name}", data)
        self._write_atomic(f"{version_dir}/{MANIFEST_FILE}",
                           json.dumps(manifest.to_dict(), indent=2, sort_keys=True).encode())
        return manifest.version

