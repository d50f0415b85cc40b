"""Check where a video may be read from, and open it for reading.

``resolve_uri`` is the single gate between an untrusted uri (from a Kafka message
or an API call) and the filesystem or network. It refuses anything that is not
an allowed scheme under an allowed prefix, and it follows ``..`` and symlinks
before judging a local path, so neither can escape an allowed root.

The :class:`VideoError` family lives here (and is re-exported by
``vidsearch.video``) because the uri checks are the first place they are raised.
"""
from __future__ import annotations

import errno
import io
import os
import re
import stat
from dataclasses import dataclass
from typing import Any, BinaryIO
from urllib.parse import unquote, urlsplit

from vidsearch.config import DecodeSettings
from vidsearch.redact import redact, redact_uri

# Schemes this module knows how to read; settings.decode.allowed_schemes picks from these.
KNOWN_SCHEMES = ("file", "http", "https", "s3")
_REMOTE_SCHEMES = ("http", "https", "s3")
# "scheme:" at the start of a uri (RFC 3986). One letter is a Windows drive, not a scheme.
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")


class VideoError(Exception):
    """A video that can't be used; ``error_class`` is stable, ``reason`` is for humans
    (and never holds a credential: it is redacted here, where every reason is built)."""

    error_class = "video_error"

    def __init__(self, reason: str) -> None:
        reason = redact(reason)
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.error_class}: {self.reason}"


class UnsupportedURI(VideoError):
    error_class = "unsupported_uri"


class NotAllowed(VideoError):
    error_class = "not_allowed"


class VideoNotFound(VideoError):
    error_class = "not_found"


class TooLarge(VideoError):
    error_class = "too_large"


class Undecodable(VideoError):
    error_class = "undecodable"


class NoVideoStream(VideoError):
    error_class = "no_video_stream"


@dataclass(frozen=True)
class ResolvedURI:
    """A uri that passed the allowlist. ``location`` is the real absolute path for
    ``file`` and the normalised url otherwise."""

    uri: str
    scheme: str
    location: str

    @property
    def is_local(self) -> bool:
        return self.scheme == "file"

    @property
    def display(self) -> str:
        """The uri as error messages and logs may show it (see redact_uri)."""
        return redact_uri(self.uri)

    def open(self, max_bytes: int) -> "GuardedReader":
        """Open for reading, refusing objects over ``max_bytes`` before any byte is read.

        Raises VideoNotFound, NotAllowed (permissions, a symlink swapped in after
        the check), TooLarge or UnsupportedURI (no fsspec driver for the scheme).
        Other storage errors (network trouble) raise OSError: they are worth retrying.
        """
        if self.is_local:
            raw, size = _open_local(self)
        else:
            raw, size = _open_remote(self)
        if size is not None and size > max_bytes:
            raw.close()
            raise TooLarge(f"{self.display!r} is {size} bytes, over the limit max_bytes={max_bytes}")
        # fsspec serves random access only when it knows the size; without one it
        # streams, whatever the file object's seekable() claims.
        return GuardedReader(raw, size, max_bytes, self.display, seekable=self.is_local or size is not None)


class GuardedReader(io.RawIOBase):
    """The file object handed to PyAV.

    PyAV calls ``read`` and ``seek`` from inside FFmpeg and stashes any exception
    raised there; a stashed exception is re-raised by whichever PyAV call checks
    next, or printed and dropped. So these methods never raise: they record the
    problem in ``failure``, report end-of-file (or a failed seek) and leave the
    caller to raise ``failure`` once PyAV returns. ``max_bytes`` is enforced here
    too, for remote objects whose size was not known up front.
    """

    def __init__(self, raw: Any, size: int | None, max_bytes: int, uri: str, *, seekable: bool) -> None:
        super().__init__()
        self._raw = raw
        self._seekable = seekable
        self.size = size
        self._max_bytes = max_bytes
        self._uri = uri
        self.failure: BaseException | None = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self._seekable

    def read(self, size: int = -1) -> bytes:
        if self.failure is not None:
            return b""
        try:
            room = self._max_bytes + 1 - self._raw.tell()
            if room <= 0:
                self.failure = TooLarge(
                    f"{self._uri!r} is over the limit max_bytes={self._max_bytes} (size was not known up front)")
                return b""
            return self._raw.read(room if size is None or size < 0 else min(size, room))
        except Exception as exc:  # noqa: BLE001 - must not escape into FFmpeg, see class doc
            self.failure = as_storage_error(exc, self._uri)
            return b""

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        try:
            return self._raw.seek(offset, whence)
        except Exception as exc:  # noqa: BLE001 - see class doc
            self.failure = self.failure or as_storage_error(exc, self._uri)
            return -1

    def tell(self) -> int:
        return self._raw.tell()

    def close(self) -> None:
        try:
            self._raw.close()
        finally:
            super().close()


def as_storage_error(exc: BaseException, display: str) -> BaseException:
    """Storage-layer failures as OSError, the type callers treat as worth a retry.

    fsspec's http driver raises aiohttp errors, some of which (a body cut short)
    are not OSErrors; VideoErrors and OSErrors pass through unchanged.
    """
    if isinstance(exc, (VideoError, OSError)):
        return exc
    error = OSError(redact(f"reading {display!r} failed: {type(exc).__name__}: {exc}"))
    error.__cause__ = exc
    return error


def public_uri(uri: str) -> str:
    """``uri`` as a client may see it: a url without user:password, query or fragment
    (where presigned urls and tokens live). Plain paths are returned unchanged."""
    text = str(uri)
    if not _SCHEME_RE.match(text):
        return text
    parts = urlsplit(text)
    host = parts.netloc.rpartition("@")[2]
    return f"{parts.scheme}://{host}{parts.path}" if "://" in text else f"{parts.scheme}:{parts.path}"


def resolve_uri(uri: str, settings: DecodeSettings) -> ResolvedURI:
    """Validate ``uri`` against ``settings.allowed_schemes`` and ``allowed_prefixes``.

    A plain path counts as scheme ``file``. Raises UnsupportedURI for malformed uris
    or schemes this module can't read, NotAllowed for anything outside the allowlist.
    Existence is not checked here (that happens on open), so the answer doesn't
    reveal which files exist outside the allowed roots.
    """
    if not isinstance(uri, str) or not uri.strip():
        raise UnsupportedURI(f"uri must be a non-empty string, got {uri!r}")
    if "\x00" in uri:
        raise UnsupportedURI(f"uri contains a NUL byte: {redact_uri(uri)!r}")
    match = _SCHEME_RE.match(uri)
    scheme = match.group(1).lower() if match else "file"
    if scheme not in KNOWN_SCHEMES:
        raise UnsupportedURI(f"unsupported scheme '{scheme}' in {redact_uri(uri)!r}; known: {', '.join(KNOWN_SCHEMES)}")
    if scheme not in settings.allowed_schemes:
        raise NotAllowed(f"scheme '{scheme}' is not in allowed_schemes {list(settings.allowed_schemes)}: {redact_uri(uri)!r}")
    if scheme == "file":
        return _resolve_local(uri, _file_uri_to_path(uri) if match else uri, settings)
    return _resolve_remote(uri, scheme, settings)


def _file_uri_to_path(uri: str) -> str:
    parts = urlsplit(uri)
    if "@" in parts.netloc:
        raise UnsupportedURI(f"file uri must not carry user-info (user:password@): {redact_uri(uri)!r}")
    if parts.netloc not in ("", "localhost"):
        raise UnsupportedURI(f"file uri must have no host (file:///path), got host '{parts.netloc}' in {redact_uri(uri)!r}")
    if not parts.path.startswith("/"):
        raise UnsupportedURI(f"file uri must hold an absolute path (file:///path): {redact_uri(uri)!r}")
    path = unquote(parts.path)
    if "\x00" in path:
        raise UnsupportedURI(f"uri contains a NUL byte: {redact_uri(uri)!r}")
    return path


def _local_roots(settings: DecodeSettings) -> list[str]:
    roots = []
    for prefix in settings.allowed_prefixes:
        match = _SCHEME_RE.match(prefix)
        if match and match.group(1).lower() != "file":
            continue  # a url prefix; it only applies to remote uris
        path = _file_uri_to_path(prefix) if match else prefix
        roots.append(os.path.realpath(os.path.expanduser(path)))
    return roots


def _resolve_local(uri: str, path: str, settings: DecodeSettings) -> ResolvedURI:
    # realpath follows every symlink and collapses "..", so the containment test
    # below judges the file that would actually be opened.
    real = os.path.realpath(os.path.expanduser(path))
    for root in _local_roots(settings):
        if os.path.commonpath([root, real]) == root:
            return ResolvedURI(uri=uri, scheme="file", location=real)
    raise NotAllowed(f"{redact_uri(uri)!r} resolves outside the allowed prefixes")


def _split_remote(url: str) -> tuple[str, str, str]:
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower(), parts.path


def _resolve_remote(uri: str, scheme: str, settings: DecodeSettings) -> ResolvedURI:
    _, netloc, path = _split_remote(uri)
    if not netloc:
        raise UnsupportedURI(f"{scheme} uri needs a host or bucket: {redact_uri(uri)!r}")
    # Servers and object stores may collapse "..", so a url with one could reach
    # outside a prefix that the string comparison below thinks it is inside.
    segments = unquote(path).split("/")
    if any(segment in (".", "..") for segment in segments):
        raise NotAllowed(f"'.' or '..' path segments are not allowed: {redact_uri(uri)!r}")
    for prefix in settings.allowed_prefixes:
        p_scheme, p_netloc, p_path = _split_remote(prefix)
        if p_scheme != scheme or p_netloc != netloc:
            continue
        # Match whole path segments: prefix /videos must not admit /videos-private.
        boundary = p_path if p_path.endswith("/") else p_path + "/"
        if path == p_path or path.startswith(boundary) or p_path == "":
            # fsspec picks its driver by the scheme's exact spelling, so lower-case it.
            return ResolvedURI(uri=uri, scheme=scheme, location=scheme + uri[len(scheme):])
    # The host part compared includes any user-info, so a uri with one matches no plain prefix.
    hint = "; user-info (user:password@) in a uri matches no prefix without it" if "@" in netloc else ""
    raise NotAllowed(f"{redact_uri(uri)!r} is not under any allowed prefix{hint}")


def _open_local(resolved: ResolvedURI) -> tuple[BinaryIO, int]:
    path = resolved.location
    try:
        # stat before open: opening a FIFO or device for reading could block forever.
        if not stat.S_ISREG(os.stat(path).st_mode):
            raise VideoNotFound(f"{resolved.display!r} is not a regular file")
        # O_NOFOLLOW: if the final component became a symlink after the check, refuse it.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise VideoNotFound(f"no file at {resolved.display!r}") from None
    except PermissionError:
        raise NotAllowed(f"permission denied reading {resolved.display!r}") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotAllowed(f"{resolved.display!r} became a symlink after it was checked") from None
        if exc.errno in (errno.ENOTDIR, errno.ENAMETOOLONG):
            raise VideoNotFound(f"no file at {resolved.display!r} ({exc.strerror})") from None
        raise
    raw = os.fdopen(fd, "rb", buffering=0)
    # The size comes from the descriptor we will read, not from the earlier stat.
    return raw, os.fstat(fd).st_size


def _open_remote(resolved: ResolvedURI) -> tuple[Any, int | None]:
    import fsspec  # imported here: local-only deployments never pay for it

    try:
        fs, path = fsspec.core.url_to_fs(resolved.location)
    except ImportError as exc:
        raise UnsupportedURI(f"no fsspec driver for '{resolved.scheme}' ({exc})") from None
    try:
        info = fs.info(path)
        if info.get("type") == "directory":
            raise VideoNotFound(f"{resolved.display!r} is a directory, not a file")
        size = info.get("size")
        return fs.open(path, "rb"), (int(size) if size is not None else None)
    except FileNotFoundError as exc:
        if _outage_behind(exc):
            cause = exc.__cause__ or exc.__context__
            raise OSError(redact(f"{resolved.display!r} is unavailable: {type(cause).__name__}: {cause}")) from exc
        raise VideoNotFound(f"no object at {resolved.display!r}") from None
    except PermissionError:
        raise NotAllowed(f"permission denied reading {resolved.display!r}") from None
    except VideoError:
        raise
    except Exception as exc:  # noqa: BLE001 - e.g. an HTTP 500: transient, see as_storage_error
        raise as_storage_error(exc, resolved.display) from exc


def _outage_behind(exc: BaseException) -> bool:
    """fsspec's http driver reports any failed lookup (an HTTP 503, a refused
    connection) as FileNotFoundError; the chained cause tells an outage, worth a
    retry, from an object that really is missing."""
    link = exc.__cause__ or exc.__context__
    while link is not None:
        status = getattr(link, "status", None)
        if isinstance(status, int) and (status >= 500 or status == 429):
            return True
        if isinstance(link, OSError) and not isinstance(link, FileNotFoundError):
            return True  # connection refused / reset, timeouts, DNS failures
        link = link.__cause__ or link.__context__
    return False


__all__ = [
    "KNOWN_SCHEMES", "GuardedReader", "NoVideoStream", "NotAllowed", "ResolvedURI", "TooLarge",
    "Undecodable", "UnsupportedURI", "VideoError", "VideoNotFound", "as_storage_error", "public_uri", "redact_uri",
    "resolve_uri",
]
