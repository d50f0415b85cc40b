"""AWS Signature Version 4, header form: verify what a client signed, and sign our own requests.

The object server (:mod:`vidsearch.objstore.server`) accepts only requests signed with the
secret of its data directory, so the secret means something even on loopback: another local
user's process can reach the port but not forge a write. Tansu signs with the Rust
``object_store`` crate; :func:`sign` exists for this package's own client (the readiness
probe, the tests). Implemented from the AWS specification
(https://docs.aws.amazon.com/AmazonS3/latest/API/sig-v4-header-based-auth.html); query-string
(presigned) and streaming chunked signatures are not accepted.
"""
from __future__ import annotations

import calendar
import hashlib
import hmac
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from urllib.parse import quote, unquote

ALGORITHM = "AWS4-HMAC-SHA256"
SERVICE = "s3"
TERMINATOR = "aws4_request"
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
# How far a request's x-amz-date may be from the server's clock (AWS allows 15 minutes): a
# captured request can't be replayed later.
MAX_SKEW_S = 15 * 60

_AUTH_RE = re.compile(
    r"^AWS4-HMAC-SHA256\s+Credential=(?P<credential>[^,\s]+)\s*,\s*"
    r"SignedHeaders=(?P<signed>[^,\s]+)\s*,\s*Signature=(?P<signature>[0-9a-f]{64})\s*$")
_SPACES_RE = re.compile(r"\s+")


@dataclass(frozen=True)
class Credentials:
    """An access key id (not secret) and its secret key (never printed: repr masks it)."""

    access_key_id: str
    secret_access_key: str = field(repr=False)


class SignatureError(Exception):
    """The request is not signed with our credentials; ``code`` is the S3 error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def _uri_encode(text: str) -> str:
    # AWS's UriEncode: every byte but the unreserved characters A-Z a-z 0-9 - _ . ~ is %XX.
    return quote(text, safe="-_.~")


def parse_query(query: str) -> list[tuple[str, str]]:
    """The decoded (name, value) pairs, %XX only: S3 clients send a literal '+' as %2B, so a
    '+' is not a space here (the server reads parameters the way it checks their signature)."""
    pairs = []
    for part in query.split("&") if query else []:
        name, _, value = part.partition("=")
        pairs.append((unquote(name), unquote(value)))
    return pairs


def canonical_query(query: str) -> str:
    """The sorted, strictly re-encoded query string."""
    pairs = [(_uri_encode(name), _uri_encode(value)) for name, value in parse_query(query)]
    return "&".join(f"{name}={value}" for name, value in sorted(pairs))


def canonical_headers(headers: Mapping[str, Iterable[str]], signed: Iterable[str]) -> str:
    """``name:value\\n`` per signed header: values trimmed, inner runs of spaces collapsed,
    repeated headers joined with commas."""
    lines = []
    for name in signed:
        values = headers.get(name)
        if values is None:
            raise SignatureError("AccessDenied", f"signed header {name!r} is missing from the request")
        lines.append(f"{name}:{','.join(_SPACES_RE.sub(' ', v.strip()) for v in values)}\n")
    return "".join(lines)


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.new(key, text.encode("utf-8"), hashlib.sha256).digest()


def signature(secret: str, amz_date: str, region: str, method: str, path: str, query: str,
              headers: Mapping[str, Iterable[str]], signed: Iterable[str], payload_hash: str) -> str:
    """Hex signature of one request (``path`` exactly as sent on the request line: S3 signs
    the path encoded once, as the client encoded it)."""
    signed = list(signed)
    day = amz_date[:8]
    request = "\n".join([method, path or "/", canonical_query(query), canonical_headers(headers, signed),
                         ";".join(signed), payload_hash])
    scope = f"{day}/{region}/{SERVICE}/{TERMINATOR}"
    to_sign = "\n".join([ALGORITHM, amz_date, scope, hashlib.sha256(request.encode("utf-8")).hexdigest()])
    key = _hmac(_hmac(_hmac(_hmac(f"AWS4{secret}".encode("utf-8"), day), region), SERVICE), TERMINATOR)
    return hmac.new(key, to_sign.encode("utf-8"), hashlib.sha256).hexdigest()


def _amz_time(amz_date: str) -> float:
    try:
        parsed = time.strptime(amz_date, "%Y%m%dT%H%M%SZ")
    except ValueError:
        raise SignatureError("AccessDenied", f"x-amz-date {amz_date!r} is not YYYYMMDDTHHMMSSZ") from None
    return float(calendar.timegm(parsed))


def verify(method: str, path: str, query: str, headers: Mapping[str, Iterable[str]],
           credentials: Credentials, now: float | None = None) -> str:
    """Check the request's ``Authorization`` header against ``credentials``; return the payload
    hash it signed (``x-amz-content-sha256``), which the caller compares with the body.

    ``headers``: lower-cased name -> the values received. Raises :class:`SignatureError`.
    """
    (authorization, *_rest) = headers.get("authorization") or [""]
    if not authorization:
        if "X-Amz-Signature" in query or "x-amz-signature" in query.lower():
            raise SignatureError("AccessDenied", "presigned (query-string) requests are not accepted")
        raise SignatureError("AccessDenied", "the request is not signed (no Authorization header)")
    match = _AUTH_RE.match(authorization.strip())
    if match is None:
        raise SignatureError("AuthorizationHeaderMalformed",
                             f"the Authorization header is not {ALGORITHM} Credential=..., SignedHeaders=..., "
                             "Signature=...")
    scope = match["credential"].split("/")
    if len(scope) != 5 or scope[3] != SERVICE or scope[4] != TERMINATOR:
        raise SignatureError("AuthorizationHeaderMalformed", "the credential scope is not KEY/DATE/REGION/s3/aws4_request")
    key_id, day, region = scope[0], scope[1], scope[2]
    if not hmac.compare_digest(key_id.encode(), credentials.access_key_id.encode()):
        raise SignatureError("InvalidAccessKeyId", "the access key id is not this server's")
    signed = match["signed"].split(";")
    if signed != sorted(signed) or "host" not in signed:
        raise SignatureError("AuthorizationHeaderMalformed", "SignedHeaders must be sorted and include host")
    for needed in ("x-amz-date", "x-amz-content-sha256"):
        if needed not in signed:
            raise SignatureError("AccessDenied", f"{needed} must be present and signed")
    (amz_date, *_rest) = headers.get("x-amz-date") or [""]
    amz_date = amz_date.strip()
    if amz_date[:8] != day:
        raise SignatureError("AuthorizationHeaderMalformed", "the credential date is not x-amz-date's day")
    skew = abs((time.time() if now is None else now) - _amz_time(amz_date))
    if skew > MAX_SKEW_S:
        raise SignatureError("RequestTimeTooSkewed", f"x-amz-date is {skew:.0f}s from the server's clock "
                                                     f"(at most {MAX_SKEW_S}s)")
    (payload_hash, *_rest) = headers.get("x-amz-content-sha256") or [""]
    payload_hash = payload_hash.strip()
    expected = signature(credentials.secret_access_key, amz_date, region, method, path, query, headers,
                         signed, payload_hash)
    if not hmac.compare_digest(expected, match["signature"]):
        raise SignatureError("SignatureDoesNotMatch", "the request signature does not match "
                                                      "(wrong secret, or the request was altered)")
    return payload_hash


def sign(method: str, host: str, path: str, query: str, headers: Mapping[str, str], body: bytes,
         credentials: Credentials, region: str = "us-east-1", now: float | None = None) -> dict[str, str]:
    """The headers to send: ``headers`` plus host, x-amz-date, x-amz-content-sha256 and
    Authorization (every given header is signed)."""
    amz_date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
    out = {name.lower(): value for name, value in headers.items()}
    out.update({"host": host, "x-amz-date": amz_date, "x-amz-content-sha256": hashlib.sha256(body).hexdigest()})
    signed = sorted(out)
    value = signature(credentials.secret_access_key, amz_date, region, method, path, query,
                      {name: [text] for name, text in out.items()}, signed, out["x-amz-content-sha256"])
    out["authorization"] = (f"{ALGORITHM} Credential={credentials.access_key_id}/{amz_date[:8]}/{region}/"
                            f"{SERVICE}/{TERMINATOR}, SignedHeaders={';'.join(signed)}, Signature={value}")
    return out
