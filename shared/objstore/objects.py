"""Buckets of objects as files: durable, atomic, conditionally written, listed in key order.

Layout under ``root``: one directory per bucket; a key's ``/``-separated segments become
nested directories named ``d<segment>`` and the object itself a file named ``o<segment>``
(each segment percent-encoded). The one-letter prefixes keep an object ``a`` and the keys
under ``a/`` apart, and make ``.``, ``..`` and empty segments ordinary names. Temporary files
start with ``t`` and are never listed.

Every write goes to a temporary file in the target directory, is fsynced, renamed over the
object (``os.replace``, atomic) and the directory is fsynced, so after a crash or SIGKILL an
object is either its old or its new content, and an acknowledged write survives. A
conditional write (``If-Match`` / ``If-None-Match: *``) checks and replaces under a lock held
for that key, so two racing writers can't both win. This process must be the only writer of
``root`` (the server holds a lock file for that), which is why ETags can be cached in memory.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

MAX_KEY_BYTES = 1024  # S3's limit
MAX_NAME_CHARS = 250  # an encoded segment must fit one file name (255 on most filesystems)
MAX_LIST_KEYS = 1000  # S3's page size limit
_LOCK_STRIPES = 64


class ObjectError(Exception):
    """An S3-level failure: ``code`` and ``status`` are what the server answers."""

    code = "InternalError"
    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)


class NoSuchKey(ObjectError):
    code, status = "NoSuchKey", 404


class NoSuchBucket(ObjectError):
    code, status = "NoSuchBucket", 404


class PreconditionFailed(ObjectError):
    code, status = "PreconditionFailed", 412


class InvalidKey(ObjectError):
    code, status = "KeyTooLongError", 400


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str  # quoted hex MD5 of the content, as S3 gives it for a single-part upload
    last_modified: float  # seconds since the epoch


@dataclass(frozen=True)
class ListPage:
    objects: list[ObjectInfo]
    prefixes: list[str]
    # The last key or common prefix of this page when more follow (a continuation point).
    next_marker: tuple[str, str] | None


def etag_of(data: bytes) -> str:
    return '"' + hashlib.md5(data, usedforsecurity=False).hexdigest() + '"'


def etag_matches(header: str, etag: str) -> bool:
    """An If-Match / If-None-Match value (a list, possibly ``*``, weak or unquoted) against ``etag``."""
    for candidate in header.split(","):
        candidate = candidate.strip()
        if candidate.startswith("W/"):
            candidate = candidate[2:]
        if candidate == "*" or candidate == etag or f'"{candidate}"' == etag:
            return True
    return False


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _encode(segment: str) -> str:
    return quote(segment, safe="")


class FileObjects:
    """The objects of ``buckets`` under ``root`` (created when missing)."""

    def __init__(self, root: str | os.PathLike, buckets: Iterable[str]) -> None:
        self.root = Path(root)
        self._buckets = set(buckets)
        self._locks = [threading.Lock() for _ in range(_LOCK_STRIPES)]
        self._etags: dict[tuple[str, str], str] = {}
        for bucket in self._buckets:
            self._ensure_dir(self.root / bucket)
        self._remove_temporaries()

    # -- paths ---------------------------------------------------------------
    def _bucket_dir(self, bucket: str) -> Path:
        if bucket not in self._buckets:
            raise NoSuchBucket(f"no bucket {bucket!r}")
        return self.root / bucket

    def _path(self, bucket: str, key: str) -> Path:
        if not key:
            raise InvalidKey("the object key is empty")
        if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
            raise InvalidKey(f"the object key is longer than {MAX_KEY_BYTES} bytes")
        *dirs, name = key.split("/")
        parts = [f"d{_encode(d)}" for d in dirs] + [f"o{_encode(name)}"]
        if any(len(p) > MAX_NAME_CHARS for p in parts):
            raise InvalidKey(f"a segment of the key is longer than this server stores ({MAX_NAME_CHARS} "
                             "characters once percent-encoded)")
        return self._bucket_dir(bucket).joinpath(*parts)

    def _lock(self, bucket: str, key: str) -> threading.Lock:
        return self._locks[hash((bucket, key)) % _LOCK_STRIPES]

    def _ensure_dir(self, path: Path) -> None:
        """Create ``path`` and its missing parents, fsyncing each new entry's parent, so a new
        object's directory entry is as durable as the object."""
        missing = []
        current = path
        while not current.exists():
            missing.append(current)
            current = current.parent
        for directory in reversed(missing):
            try:
                directory.mkdir(mode=0o700)
            except FileExistsError:
                continue
            _fsync_dir(directory.parent)

    def _remove_temporaries(self) -> None:
        # A write interrupted by a crash leaves its temporary file; the object itself is intact.
        for directory, _dirs, files in os.walk(self.root):
            for name in files:
                if name.startswith("t"):
                    Path(directory, name).unlink(missing_ok=True)

    # -- metadata --------------------------------------------------------------
    def _current_etag(self, bucket: str, key: str, path: Path) -> str | None:
        """The stored object's ETag (None when absent); call with the key's lock held."""
        cached = self._etags.get((bucket, key))
        if cached is not None:
            return cached
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        etag = self._etags[(bucket, key)] = etag_of(data)
        return etag

    def _info(self, bucket: str, key: str, path: Path, etag: str | None = None) -> ObjectInfo:
        stat = path.stat()
        if etag is None:
            with self._lock(bucket, key):
                etag = self._current_etag(bucket, key, path)
            if etag is None:
                raise NoSuchKey(f"no object {key!r}")
        return ObjectInfo(key, stat.st_size, etag, stat.st_mtime)

    def bucket_exists(self, bucket: str) -> bool:
        return bucket in self._buckets

    # -- objects -----------------------------------------------------------------
    def put(self, bucket: str, key: str, data: bytes, *, if_match: str | None = None,
            if_none_match: str | None = None) -> ObjectInfo:
        """Store ``data`` durably; with ``if_none_match='*'`` only when no object exists, with
        ``if_match`` only when the stored ETag matches (else :class:`PreconditionFailed`)."""
        path = self._path(bucket, key)
        etag = etag_of(data)
        with self._lock(bucket, key):
            if if_match is not None or if_none_match is not None:
                current = self._current_etag(bucket, key, path)
                if if_none_match is not None and current is not None and etag_matches(if_none_match, current):
                    raise PreconditionFailed(f"{key!r} exists (If-None-Match: {if_none_match})")
                if if_match is not None and (current is None or not etag_matches(if_match, current)):
                    raise PreconditionFailed(f"{key!r} is not at ETag {if_match}"
                                             + (" (it does not exist)" if current is None else ""))
            self._write(path, data)
            self._etags[(bucket, key)] = etag
            return self._info(bucket, key, path, etag)

    def _write(self, path: Path, data: bytes) -> None:
        for _attempt in range(5):
            self._ensure_dir(path.parent)
            try:
                fd, tmp = tempfile.mkstemp(prefix="t", suffix=".tmp", dir=path.parent)
            except FileNotFoundError:  # a delete pruned the empty directory in between
                continue
            break
        else:
            raise ObjectError(f"cannot create a file in {path.parent}")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)

    def get(self, bucket: str, key: str) -> tuple[ObjectInfo, bytes]:
        """The object and its content (read whole: a rename never shows a half-written file)."""
        path = self._path(bucket, key)
        try:
            with open(path, "rb") as handle:
                stat = os.fstat(handle.fileno())
                data = handle.read()
        except (FileNotFoundError, NotADirectoryError):
            raise NoSuchKey(f"no object {key!r}") from None
        return ObjectInfo(key, stat.st_size, etag_of(data), stat.st_mtime), data

    def head(self, bucket: str, key: str) -> ObjectInfo:
        path = self._path(bucket, key)
        try:
            return self._info(bucket, key, path)
        except (FileNotFoundError, NotADirectoryError):
            raise NoSuchKey(f"no object {key!r}") from None

    def delete(self, bucket: str, key: str) -> bool:
        """Remove the object (True) or do nothing when there is none (False), as S3 does."""
        path = self._path(bucket, key)
        with self._lock(bucket, key):
            self._etags.pop((bucket, key), None)
            try:
                path.unlink()
            except (FileNotFoundError, NotADirectoryError):
                return False
            _fsync_dir(path.parent)
        self._prune(path.parent, self._bucket_dir(bucket))
        return True

    def _prune(self, directory: Path, stop: Path) -> None:
        # Empty directories would otherwise show up as common prefixes of nothing.
        while directory != stop:
            try:
                directory.rmdir()
            except OSError:
                return
            _fsync_dir(directory.parent)
            directory = directory.parent

    # -- listing ---------------------------------------------------------------------
    def list(self, bucket: str, prefix: str = "", delimiter: str = "", after: str = "",
             after_prefix: str | None = None, max_keys: int = MAX_LIST_KEYS) -> ListPage:
        """ListObjectsV2: keys starting with ``prefix`` in UTF-8 order, after the key ``after``
        (and, resuming behind a common prefix ``after_prefix``, past every key under it);
        with ``delimiter``, keys that contain it past the prefix roll up into common prefixes."""
        max_keys = max(0, min(max_keys, MAX_LIST_KEYS))
        objects: list[ObjectInfo] = []
        prefixes: list[str] = []
        if after_prefix is not None:
            after = max(after, after_prefix)
        last: tuple[str, str] | None = None
        for kind, name, path in self._entries(bucket, prefix, delimiter, after):
            if kind == "key":
                if after_prefix is not None and name.startswith(after_prefix):
                    continue
                if delimiter and delimiter != "/":
                    cut = name.find(delimiter, len(prefix))
                    if cut >= 0:
                        kind, name = "prefix", name[:cut + len(delimiter)]
            if kind == "prefix" and (name == after_prefix or (prefixes and prefixes[-1] == name)):
                continue
            if len(objects) + len(prefixes) >= max_keys:
                return ListPage(objects, prefixes, last if max_keys else None)
            if kind == "prefix":
                prefixes.append(name)
            else:
                try:
                    objects.append(self._info(bucket, name, path))
                except (NoSuchKey, FileNotFoundError):  # deleted while listing
                    continue
            last = (kind, name)
        return ListPage(objects, prefixes, None)

    def _entries(self, bucket: str, prefix: str, delimiter: str, after: str) -> Iterator[tuple[str, str, Path]]:
        """("key", key, path) and, with delimiter "/", ("prefix", common prefix, dir), in key order."""
        *dirs, partial = prefix.split("/")
        base = self._bucket_dir(bucket).joinpath(*(f"d{_encode(d)}" for d in dirs))
        base_key = "".join(f"{d}/" for d in dirs)
        yield from self._walk(base, base_key, partial, after, roll_up=delimiter == "/")

    def _walk(self, directory: Path, key_prefix: str, name_prefix: str, after: str,
              roll_up: bool) -> Iterator[tuple[str, str, Path]]:
        try:
            entries = list(os.scandir(directory))
        except (FileNotFoundError, NotADirectoryError):
            return
        # A directory sorts as its key prefix "segment/": then a depth-first walk visits keys in
        # exactly their string order ("a-c" < "a/b" because "-" < "/").
        items = []
        for entry in entries:
            kind, encoded = entry.name[:1], entry.name[1:]
            if kind not in ("d", "o"):
                continue
            segment = unquote(encoded)
            if not segment.startswith(name_prefix):
                continue
            items.append((key_prefix + segment + ("/" if kind == "d" else ""), kind == "d", Path(entry.path)))
        items.sort()
        for sort_key, is_dir, path in items:
            if not is_dir:
                if sort_key > after:
                    yield "key", sort_key, path
            elif roll_up:
                if sort_key > after and self._has_object(path):
                    yield "prefix", sort_key, path
            elif sort_key > after or after.startswith(sort_key):
                # (else every key below sorts before ``after``: skip the whole subtree)
                yield from self._walk(path, sort_key, "", after, roll_up=False)

    def _has_object(self, directory: Path) -> bool:
        for _dir, _dirs, files in os.walk(directory):
            if any(name.startswith("o") for name in files):
                return True
        return False
