"""The S3-compatible HTTP front of :class:`~vidsearch.objstore.objects.FileObjects`.

What Tansu's ``s3://`` storage engine (the Rust ``object_store`` crate, path-style requests)
sends, and nothing more: PutObject (plain, ``If-None-Match: *``, ``If-Match: <etag>``),
GetObject and HeadObject (``Range``, ``If-Match``, ``If-None-Match``), DeleteObject,
DeleteObjects (batch), ListObjectsV2 (prefix, delimiter, continuation, start-after) and
HeadBucket. Everything else (multipart uploads, copies, ACLs, tagging, bucket management,
presigned or chunked-streaming requests) is answered with a clear S3 ``NotImplemented`` error
and logged; Tansu 0.6.0's storage engine never calls them for the broker's own data.

Every request must carry a valid SigV4 signature by the data directory's credentials
(:mod:`vidsearch.objstore.sigv4`), and a signed body hash must match the body. Nothing
secret is logged: neither the Authorization header nor request bodies.
"""
from __future__ import annotations

import base64
import email.utils
import hashlib
import logging
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit
from xml.sax.saxutils import escape

from .objects import MAX_LIST_KEYS, FileObjects, ListPage, ObjectError, ObjectInfo, etag_matches
from .sigv4 import UNSIGNED_PAYLOAD, Credentials, SignatureError, parse_query, verify

log = logging.getLogger("vidsearch.objstore")

MAX_BODY_BYTES = 64 * 1024 * 1024  # Tansu writes one record batch per object (about 1 MiB at most)
MAX_DELETE_KEYS = 1000  # S3's limit per DeleteObjects request
_XML_HEADER = '<?xml version="1.0" encoding="UTF-8"?>\n'
_NS = "http://s3.amazonaws.com/doc/2006-03-01/"


class S3Error(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


def not_implemented(what: str) -> S3Error:
    return S3Error(501, "NotImplemented", f"{what} is not implemented by the vidsearch object server")


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts * 1000) % 1000:03d}Z"


def _token(kind: str, name: str) -> str:
    return base64.urlsafe_b64encode(f"{kind}:{name}".encode("utf-8")).decode("ascii")


def _untoken(token: str) -> tuple[str, str]:
    try:
        kind, _, name = base64.urlsafe_b64decode(token.encode("ascii")).decode("utf-8").partition(":")
    except (ValueError, UnicodeError):
        raise S3Error(400, "InvalidArgument", "the continuation token is not one this server gave") from None
    if kind not in ("key", "prefix"):
        raise S3Error(400, "InvalidArgument", "the continuation token is not one this server gave")
    return kind, name


class ObjectServer(ThreadingHTTPServer):
    """One listening socket; a thread per connection (Tansu keeps a small pool open)."""

    daemon_threads = True  # idle keep-alive connections must not hold up shutdown
    request_queue_size = 128  # socketserver's 5 resets bursts of new connections

    def __init__(self, address: tuple[str, int], objects: FileObjects, credentials: Credentials) -> None:
        super().__init__(address, S3Handler)
        self.objects = objects
        self.credentials = credentials
        self._busy = 0
        self._idle = threading.Condition()

    def request_started(self) -> None:
        with self._idle:
            self._busy += 1

    def request_done(self) -> None:
        with self._idle:
            self._busy -= 1
            self._idle.notify_all()

    def drain(self, timeout_s: float) -> bool:
        """Wait until no request is being served (True) or ``timeout_s`` passed (False)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._busy == 0, timeout_s)


class S3Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: every answer carries Content-Length
    server: ObjectServer
    server_version = "vidsearch-objstore"
    sys_version = ""

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        # http.server would print every request line to stderr; failures are logged in _handle.
        pass

    def do_GET(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    # -- plumbing ------------------------------------------------------------------
    def _handle(self) -> None:
        self.server.request_started()
        self._request_id = uuid.uuid4().hex[:16]
        url = urlsplit(self.path)
        try:
            body = self._read_body()
            self._authenticate(url.path, url.query, body)
            self._route(url.path, url.query, body)
        except S3Error as exc:
            self._error(exc, url.path)
        except ObjectError as exc:
            self._error(S3Error(exc.status, exc.code, str(exc)), url.path)
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception as exc:  # noqa: BLE001 - one bad request must not stop the server
            log.exception("object server request failed: %s %s", self.command, url.path)
            self._error(S3Error(500, "InternalError", f"{type(exc).__name__}"), url.path)
        finally:
            self.server.request_done()

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() not in ("", "identity"):
            self.close_connection = True  # the body's end is unknown: don't read the next request from it
            raise not_implemented("a chunked request body (send Content-Length)")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self.close_connection = True
            raise S3Error(400, "InvalidArgument", "Content-Length is not a number") from None
        if length < 0 or length > MAX_BODY_BYTES:
            self.close_connection = True
            raise S3Error(400, "EntityTooLarge", f"the body is larger than {MAX_BODY_BYTES} bytes")
        return self.rfile.read(length) if length else b""

    def _authenticate(self, path: str, query: str, body: bytes) -> None:
        headers: dict[str, list[str]] = {}
        for name, value in self.headers.items():
            headers.setdefault(name.lower(), []).append(value)
        try:
            payload_hash = verify(self.command, path, query, headers, self.server.credentials)
        except SignatureError as exc:
            log.warning("object server refused a request: %s %s: %s (%s)", self.command, path, exc.code, exc)
            raise S3Error(403, exc.code, str(exc)) from None
        if payload_hash.startswith("STREAMING-"):
            raise not_implemented("a streaming (aws-chunked) signed body")
        if payload_hash != UNSIGNED_PAYLOAD and payload_hash != hashlib.sha256(body).hexdigest():
            raise S3Error(400, "XAmzContentSHA256Mismatch", "the body does not match its signed x-amz-content-sha256")
        md5 = self.headers.get("Content-MD5")
        if md5 is not None and md5.strip() != base64.b64encode(hashlib.md5(body, usedforsecurity=False).digest()).decode():
            raise S3Error(400, "BadDigest", "the body does not match its Content-MD5")
        checksum = self.headers.get("x-amz-checksum-sha256")
        if checksum is not None and checksum.strip() != base64.b64encode(hashlib.sha256(body).digest()).decode():
            raise S3Error(400, "BadDigest", "the body does not match its x-amz-checksum-sha256")

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("x-amz-request-id", self._request_id)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if "Content-Length" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _error(self, exc: S3Error, resource: str) -> None:
        if exc.status >= 500 or exc.code == "NotImplemented":
            log.warning("object server answered %s %s: %s %s", self.command, resource, exc.status, exc.code)
        body = (f"{_XML_HEADER}<Error><Code>{escape(exc.code)}</Code><Message>{escape(str(exc))}</Message>"
                f"<Resource>{escape(resource)}</Resource><RequestId>{self._request_id}</RequestId></Error>")
        try:
            self._send(exc.status, body.encode("utf-8"), {"Content-Type": "application/xml"})
        except (ConnectionError, TimeoutError):
            self.close_connection = True

    # -- routing ------------------------------------------------------------------------
    def _route(self, path: str, query: str, body: bytes) -> None:
        bucket, _, raw_key = path.lstrip("/").partition("/")
        bucket, key = unquote(bucket), unquote(raw_key)
        params = dict(parse_query(query))
        if not bucket:
            raise not_implemented("ListBuckets")
        if not self.server.objects.bucket_exists(bucket):
            raise S3Error(404, "NoSuchBucket", f"no bucket {bucket!r} (this server holds only its own)")
        if key:
            self._object(bucket, key, params, body)
        else:
            self._bucket(bucket, params, body)

    def _bucket(self, bucket: str, params: dict[str, str], body: bytes) -> None:
        method = self.command
        if method == "GET" and params.get("list-type") == "2":
            return self._list(bucket, params)
        if method == "POST" and "delete" in params:
            return self._delete_objects(bucket, body)
        if method == "HEAD" and not params:
            return self._send(200)
        if method == "GET" and not params:
            raise not_implemented("ListObjects version 1 (use list-type=2)")
        raise not_implemented(f"{method} on a bucket with ?{'&'.join(sorted(params)) or ''}")

    def _object(self, bucket: str, key: str, params: dict[str, str], body: bytes) -> None:
        method = self.command
        if "uploads" in params or "uploadId" in params or "partNumber" in params:
            raise not_implemented("multipart upload")
        if params:
            raise not_implemented(f"the object subresource ?{'&'.join(sorted(params))}")
        objects = self.server.objects
        if method == "PUT":
            if self.headers.get("x-amz-copy-source"):
                raise not_implemented("CopyObject")
            if_none_match = self.headers.get("If-None-Match")
            if if_none_match is not None and if_none_match.strip() != "*":
                raise not_implemented("If-None-Match other than * on PUT")
            info = objects.put(bucket, key, body, if_match=self.headers.get("If-Match"),
                               if_none_match=if_none_match)
            return self._send(200, headers={"ETag": info.etag})
        if method in ("GET", "HEAD"):
            return self._read(bucket, key)
        if method == "DELETE":
            objects.delete(bucket, key)
            return self._send(204)
        raise not_implemented(f"{method} on an object")

    def _read(self, bucket: str, key: str) -> None:
        objects = self.server.objects
        if self.command == "HEAD":
            info, data = objects.head(bucket, key), b""
        else:
            info, data = objects.get(bucket, key)
        headers = {"ETag": info.etag, "Last-Modified": email.utils.formatdate(info.last_modified, usegmt=True),
                   "Content-Type": "application/octet-stream", "Accept-Ranges": "bytes"}
        if_match, if_none_match = self.headers.get("If-Match"), self.headers.get("If-None-Match")
        if if_match is not None and not etag_matches(if_match, info.etag):
            raise S3Error(412, "PreconditionFailed", f"{key!r} is not at ETag {if_match}")
        if if_none_match is not None and etag_matches(if_none_match, info.etag):
            return self._send(304, headers={**headers, "Content-Length": "0"})
        span = self._range(info.size)
        if span is None:
            return self._send(200, data, {**headers, "Content-Length": str(info.size)})
        start, end = span
        headers.update({"Content-Range": f"bytes {start}-{end}/{info.size}", "Content-Length": str(end - start + 1)})
        self._send(206, data[start:end + 1], headers)

    def _range(self, size: int) -> tuple[int, int] | None:
        """The one byte range asked for (inclusive), or None for the whole object."""
        value = self.headers.get("Range")
        if not value:
            return None
        unit, _, spec = value.strip().partition("=")
        first, sep, last = spec.partition("-")
        if unit != "bytes" or not sep or "," in spec:
            raise not_implemented(f"the Range {value!r} (one bytes=a-b range only)")
        try:
            if first:
                start, end = int(first), (int(last) if last else size - 1)
            else:
                start, end = max(size - int(last), 0), size - 1
        except ValueError:
            raise S3Error(400, "InvalidArgument", f"the Range {value!r} is not a byte range") from None
        end = min(end, size - 1)
        if start > end or start >= size:
            raise S3Error(416, "InvalidRange", f"the Range {value!r} is outside the object's {size} bytes")
        return start, end

    def _list(self, bucket: str, params: dict[str, str]) -> None:
        try:
            max_keys = int(params.get("max-keys", MAX_LIST_KEYS))
        except ValueError:
            raise S3Error(400, "InvalidArgument", "max-keys is not a number") from None
        prefix, delimiter = params.get("prefix", ""), params.get("delimiter", "")
        after, after_prefix = params.get("start-after", ""), None
        token = params.get("continuation-token")
        if token:
            kind, name = _untoken(token)
            if kind == "prefix":
                after_prefix = name
            else:
                after = max(after, name)
        page = self.server.objects.list(bucket, prefix, delimiter, after, after_prefix, max_keys)
        self._send(200, self._list_xml(bucket, params, page, token).encode("utf-8"),
                   {"Content-Type": "application/xml"})

    @staticmethod
    def _list_xml(bucket: str, params: dict[str, str], page: ListPage, token: str | None) -> str:
        def item(info: ObjectInfo) -> str:
            return (f"<Contents><Key>{escape(info.key)}</Key><LastModified>{_iso(info.last_modified)}</LastModified>"
                    f"<ETag>{escape(info.etag)}</ETag><Size>{info.size}</Size>"
                    "<StorageClass>STANDARD</StorageClass></Contents>")

        parts = [f'{_XML_HEADER}<ListBucketResult xmlns="{_NS}"><Name>{escape(bucket)}</Name>',
                 f"<Prefix>{escape(params.get('prefix', ''))}</Prefix>",
                 f"<KeyCount>{len(page.objects) + len(page.prefixes)}</KeyCount>",
                 f"<MaxKeys>{params.get('max-keys', MAX_LIST_KEYS)}</MaxKeys>"]
        if params.get("delimiter"):
            parts.append(f"<Delimiter>{escape(params['delimiter'])}</Delimiter>")
        if token:
            parts.append(f"<ContinuationToken>{escape(token)}</ContinuationToken>")
        if params.get("start-after"):
            parts.append(f"<StartAfter>{escape(params['start-after'])}</StartAfter>")
        parts.append(f"<IsTruncated>{'true' if page.next_marker else 'false'}</IsTruncated>")
        if page.next_marker:
            parts.append(f"<NextContinuationToken>{_token(*page.next_marker)}</NextContinuationToken>")
        parts.extend(item(info) for info in page.objects)
        parts.extend(f"<CommonPrefixes><Prefix>{escape(p)}</Prefix></CommonPrefixes>" for p in page.prefixes)
        parts.append("</ListBucketResult>")
        return "".join(parts)

    def _delete_objects(self, bucket: str, body: bytes) -> None:
        # Parsed only after the signature checked out: the XML comes from a holder of the secret.
        try:
            root = ET.fromstring(body)
        except ET.ParseError:
            raise S3Error(400, "MalformedXML", "the DeleteObjects body is not XML") from None

        def local(tag: str) -> str:
            return tag.rsplit("}", 1)[-1]

        if local(root.tag) != "Delete":
            raise S3Error(400, "MalformedXML", "the DeleteObjects body is not a <Delete> document")
        quiet = any(local(e.tag) == "Quiet" and (e.text or "").strip().lower() == "true" for e in root)
        keys = [next((c.text or "" for c in e if local(c.tag) == "Key"), "") for e in root if local(e.tag) == "Object"]
        if not keys or len(keys) > MAX_DELETE_KEYS:
            raise S3Error(400, "MalformedXML", f"DeleteObjects takes 1 to {MAX_DELETE_KEYS} keys, got {len(keys)}")
        parts = [f'{_XML_HEADER}<DeleteResult xmlns="{_NS}">']
        for key in keys:
            try:
                self.server.objects.delete(bucket, key)
            except ObjectError as exc:
                parts.append(f"<Error><Key>{escape(key)}</Key><Code>{exc.code}</Code>"
                             f"<Message>{escape(str(exc))}</Message></Error>")
                continue
            if not quiet:
                parts.append(f"<Deleted><Key>{escape(key)}</Key></Deleted>")
        parts.append("</DeleteResult>")
        self._send(200, "".join(parts).encode("utf-8"), {"Content-Type": "application/xml"})
