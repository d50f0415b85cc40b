"""One credential redaction for every surface: DLQ records, error messages, logs, CLI output.

Every text that leaves the process (a DLQ record's reason and kept value, a gRPC
error's details, a log line, what `vidsearch dlq` and `vidsearch status` print)
passes through :func:`redact`. What it removes, wherever it appears in the text:

* **URL user-info**: ``scheme://user:password@host`` becomes ``scheme://<redacted>@host``
  (also with JSON-escaped slashes, ``https:\\/\\/``).
* **Query parameters that carry credentials**, on URLs *and* on bare paths
  (``/data/a.mp4?token=...``): a parameter whose name says so (token, key, sig,
  signature, password, secret, credential, auth, session, code, ...: ``X-Amz-Signature``,
  ``api_key``, ``access_token``) or whose value looks like a key (long, mixed letters
  and digits, e.g. a hex digest or base64) keeps its name and loses its value:
  ``?t=5&token=<redacted>``. Other parameters stay readable. A URL's fragment
  (``#access_token=...`` in OAuth flows) becomes ``#<redacted>``.
* **Named secrets in free text**: ``password=...``, ``"api_key": "..."``,
  ``X-Api-Key: ...``, ``client_secret=...``.
* **Authorization values**: ``Authorization: Bearer ...`` / ``Basic ...`` and any
  ``Bearer <token>``; JSON Web Tokens and AWS access key ids wherever they stand.

It is idempotent (redacting twice changes nothing) and linear in the text's length
(every pattern is bounded or possessive), because DLQ values are hostile input.
:func:`redact_json` applies the same rules to decoded JSON (and replaces the whole
value of a key named like a secret), so escapes such as ``\\u0074oken`` can't hide one.
"""
from __future__ import annotations

import re
from functools import lru_cache
from typing import Any
from urllib.parse import unquote

REDACTED = "<redacted>"

# Name fragments that mark a secret wherever they occur in a name (compared with
# separators removed and lower-cased: X-Amz-Security-Token -> xamzsecuritytoken).
_STRONG_FRAGMENTS = ("token", "secret", "passw", "pwd", "signature", "apikey", "accesskey", "privatekey",
                     "credential", "authoriz", "sessionid", "cookie", "bearer", "jwt", "oauth")
# Whole name parts (split at separators and camelCase) that mark a secret anywhere...
_SECRET_PARTS = frozenset({"sig", "auth", "pass", "hmac"})
# ... and, in a query string, these too (?key=... is an API key; ?code=... an OAuth code).
_QUERY_SECRET_PARTS = _SECRET_PARTS | {"key", "session", "code", "otp", "sas"}

_CAMEL_RE = re.compile(r"([a-z0-9])([A-Z])")
_PARTS_RE = re.compile(r"[^a-z0-9]+")
_KEYISH_RE = re.compile(r"[A-Za-z0-9+/=_\-.~]+")
# Characters that end a token: whitespace, quotes, backticks.
_DELIMITERS = frozenset(" \t\r\n\f\v\"'`")
_TOKEN_RE = re.compile(r"[^\s\"'`]++")
# "scheme://" then the authority (up to /, \/, ?, #). Bounded scheme, possessive authority.
_AUTHORITY_RE = re.compile(r"(?i)(?<![a-z0-9+.\-])(?P<scheme>[a-z][a-z0-9+.\-]{0,31}:(?:\\?/){2})"
                           r"(?P<authority>(?:[^/\\?#]|\\(?!/))*+)")
_AUTH_HEADER_RE = re.compile(
    r"(?i)(?<![a-z0-9_\-])(?P<head>(?:proxy-)?authorization[\"']?\s*[:=]\s*[\"']?\s*"
    r"(?:(?:bearer|basic|digest|negotiate|token|aws4-hmac-sha256)\s+)?)(?P<cred>[^\s\"',;]++)")
_BEARER_RE = re.compile(r"(?i)(?<![a-z0-9_\-])(?P<head>bearer\s+)(?P<cred>[^\s\"',;]++)")
_JWT_RE = re.compile(r"(?<![A-Za-z0-9_\-])eyJ[A-Za-z0-9_\-]{5,}+\.[A-Za-z0-9_\-]{5,}+\.[A-Za-z0-9_\-]*+")
_AWS_KEY_ID_RE = re.compile(r"(?<![A-Z0-9])(?:AKIA|ASIA)[A-Z0-9]{16}(?![A-Z0-9])")
# name, then ":" or "=" (a quoted name's closing quote allowed): name=value, "name": "value".
_PAIR_RE = re.compile(r"(?<![A-Za-z0-9_.\-])(?P<name>[A-Za-z_][A-Za-z0-9_.\-]{0,127}+)(?P<sep>[\"']?\s*[:=]\s*)")
_TRAILING = ".,:;!)]}"  # prose punctuation after a url or value, kept outside the redaction
_UNQUOTED_VALUE_RE = re.compile(r"[^\s\"',;&)\]}]++")
# The scheme word of an Authorization value: kept (the credential after it is not).
_AUTH_SCHEMES = frozenset({"bearer", "basic", "digest", "negotiate", "token", "aws4-hmac-sha256"})
# After "name:" (not "name="), a plain word is prose: "password: must not be empty".
_PROSE_WORD_RE = re.compile(r"[A-Za-z][a-z]{0,19}")
_HEADER_NAMES = frozenset({"authorization", "proxy-authorization"})
_PLACEHOLDER_RE = re.compile(r"<[A-Za-z_ -]{1,32}>[.,:;!)\]}]*")
# A value this module already redacted ("Bearer <redacted>", "<redacted>#<redacted>").
_DONE_RE = re.compile(r"(?i)(?:(?:bearer|basic|digest|negotiate|token|aws4-hmac-sha256)\s+)?"
                      r"<redacted>(?:#<redacted>)?")


def is_sensitive_name(name: str, *, in_query: bool = False) -> bool:
    """Whether a parameter, header, field or key called ``name`` holds a credential.
    ``in_query``: the stricter rules of a query string (``key``, ``session``, ``code`` too)."""
    return _sensitive(str(name)[:256], in_query)


@lru_cache(maxsize=4096)
def _sensitive(name: str, in_query: bool) -> bool:
    text = unquote(name)
    compact = _PARTS_RE.sub("", text.lower())
    if any(fragment in compact for fragment in _STRONG_FRAGMENTS):
        return True
    parts = set(_PARTS_RE.split(_CAMEL_RE.sub(r"\1 \2", text).lower()))
    return bool(parts & (_QUERY_SECRET_PARTS if in_query else _SECRET_PARTS))


def looks_like_secret(value: str) -> bool:
    """A value that reads like a key: 20+ characters of a key alphabet, letters and digits
    mixed (or three character classes), few separators: a hex digest, base64, an access
    key; not a file name, a date or a uuid."""
    text = unquote(str(value))
    if len(text) < 20 or not _KEYISH_RE.fullmatch(text):
        return False
    digits = sum(c.isdigit() for c in text)
    separators = sum(c in "-_.~/" for c in text)
    classes = sum((any(c.islower() for c in text), any(c.isupper() for c in text), digits > 0,
                   any(c in "+/=" for c in text)))
    return (digits >= 2 and len(text) - digits - separators >= 2 or classes >= 3) and separators * 10 <= len(text)


def _redact_nested(value: str, depth: int) -> str:
    """A query value that may hold a url or a query itself (``?next=https://h/x?token=...``),
    perhaps percent-encoded: redacted in place, or wholly when the secret was encoded."""
    decoded = unquote(value)
    if "?" in decoded or "://" in decoded or "@" in decoded:
        probe = _redact_token(decoded, depth + 1)
    else:
        probe = _redact_query(decoded, depth + 1)
    if probe == decoded:
        return value
    return probe if decoded == value else REDACTED


def _redact_query(query: str, depth: int = 0) -> str:
    """``a=1&token=x`` -> ``a=1&token=<redacted>``: one parameter at a time."""
    out = []
    for param in re.split(r"([&;])", query):
        if param in ("&", ";", "", REDACTED):
            out.append(param)
            continue
        name, eq, value = param.partition("=")
        if not eq:
            out.append(REDACTED if looks_like_secret(name) else param)
            continue
        if looks_like_secret(name):
            name = REDACTED
        if value and value != REDACTED:
            core = value.rstrip(_TRAILING)
            if core and (is_sensitive_name(name, in_query=True) or looks_like_secret(core)):
                value = REDACTED + value[len(core):]
            elif depth < 3 and any(c in value for c in "=%?@"):
                value = _redact_nested(value, depth)
        out.append(f"{name}{eq}{value}")
    return "".join(out)


def _redact_bare_userinfo(token: str) -> str:
    """``user:password@host`` without a scheme (a netloc quoted on its own, a broker
    address): the user-info before the last ``@`` ahead of the first ``/``."""
    slash = token.find("/")
    at = token.rfind("@", 0, len(token) if slash < 0 else slash)
    colon = token.find(":", 0, max(at, 0))
    if at <= 0 or colon < 0 or not token[at + 1:at + 2].replace("[", "a").isalnum():
        return token
    start = max(token.rfind(c, 0, colon) for c in "=([{,;|") + 1
    return token[:start] + REDACTED + token[at:]


def _redact_token(token: str, depth: int = 0) -> str:
    """One whitespace- and quote-free run of text: the urls and paths in it."""
    if not any(c in token for c in "@?#=&:"):
        return token
    has_url = False

    def userinfo(match: re.Match) -> str:
        nonlocal has_url
        has_url = True
        authority = match["authority"]
        if "@" not in authority:
            return match[0]
        return match["scheme"] + REDACTED + authority[authority.rindex("@"):]

    token = _AUTHORITY_RE.sub(userinfo, token)
    if not has_url and "@" in token:
        token = _redact_bare_userinfo(token)
    mark, hash_at = token.find("?"), token.find("#")
    if has_url and hash_at >= 0 and (mark < 0 or hash_at < mark):
        # A url's fragment (OAuth puts tokens there); a "?" after the "#" is inside it.
        return token[:hash_at + 1] + (REDACTED if token[hash_at + 1:] else "")
    if mark < 0:
        return token
    end = token.find("#", mark) if has_url else -1
    query = _redact_query(token[mark + 1:] if end < 0 else token[mark + 1:end], depth)
    if end < 0:
        return token[:mark + 1] + query
    return token[:mark + 1] + query + "#" + (REDACTED if token[end + 1:] else "")


def _sub_credentials(pattern: re.Pattern, text: str) -> str:
    # A placeholder ("send 'Authorization: Bearer <key>'") is documentation, not a credential.
    # Without a scheme word, a plain lower-case word is prose ("authorization: missing or ...").
    def sub(m: re.Match) -> str:
        cred, schemeless = m["cred"], m["head"].rstrip()[-1:] in ":=\"'"
        if _PLACEHOLDER_RE.fullmatch(cred) or (schemeless and cred.isalpha() and cred.islower()):
            return m[0]
        return m["head"] + REDACTED

    return pattern.sub(sub, text)


def _quoted_end(text: str, start: int) -> int:
    """Index of the quote that closes the string opened at ``text[start]`` (len(text) when
    none does: a cut-off prefix, where all of the rest counts as the value)."""
    quote = text[start]
    end = start + 1
    while True:
        end = text.find(quote, end)
        if end < 0:
            return len(text)
        backslashes = 0
        while end - 1 - backslashes > start and text[end - 1 - backslashes] == "\\":
            backslashes += 1
        if backslashes % 2 == 0:
            return end
        end += 1


def _redact_pairs(text: str) -> str:
    """``password=x``, ``"api_key": "x"``, ``X-Api-Key: x``: the value of a secret-named field."""
    out: list[str] = []
    pos = search_at = 0
    while (match := _PAIR_RE.search(text, search_at)) is not None:
        if not is_sensitive_name(match["name"]) or match["name"].lower() in _HEADER_NAMES:
            search_at = match.end("name")  # (Authorization values are _AUTH_HEADER_RE's)
            continue
        start = match.end()
        if start < len(text) and text[start] in "\"'":
            value_start, value_end = start + 1, _quoted_end(text, start)
        else:
            value = _UNQUOTED_VALUE_RE.match(text, start)
            if value is None or value[0].lower() in _AUTH_SCHEMES:
                search_at = start  # "Authorization: Bearer <redacted>": the scheme word stays
                continue
            word = value[0].rstrip(_TRAILING)
            if "=" not in match["sep"] and _PROSE_WORD_RE.fullmatch(word):
                # "broker.sasl_password: Input should be ...": an error naming a field, not a value.
                search_at = start
                continue
            value_start, value_end = value.start(), value.start() + len(word)
        if value_end > value_start and not _DONE_RE.fullmatch(text, value_start, value_end):
            out.append(text[pos:value_start])
            out.append(REDACTED)
            pos = value_end
        search_at = max(value_end, start)
    out.append(text[pos:])
    return "".join(out)


def redact(text: Any) -> str:
    """``text`` (anything, as ``str``) with every credential in it replaced by ``<redacted>``."""
    out = str(text)
    if not out:
        return out
    out = _sub_credentials(_AUTH_HEADER_RE, out)
    out = _sub_credentials(_BEARER_RE, out)
    out = _TOKEN_RE.sub(lambda m: _redact_token(m[0]), out)
    out = _redact_pairs(out)
    out = _JWT_RE.sub(REDACTED, out)
    return _AWS_KEY_ID_RE.sub(REDACTED, out)


def redact_text(text: str) -> tuple[str, bool]:
    """(``redact(text)``, whether anything was removed)."""
    out = redact(text)
    return out, out != text


def redact_json(value: Any, _depth: int = 0) -> Any:
    """Decoded JSON with every string redacted, and the value of any key named like a
    secret (``"password": ...``, ``"api_key": ...``) replaced by ``"<redacted>"``."""
    if _depth > 200:
        return REDACTED  # deeper than any message the worker accepts; don't recurse further
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            shown = redact(key) if isinstance(key, str) else key
            secret = (isinstance(key, str) and is_sensitive_name(key)
                      and not (item is None or isinstance(item, bool) or item == ""))
            out[shown] = REDACTED if secret else redact_json(item, _depth + 1)
        return out
    if isinstance(value, list):
        return [redact_json(item, _depth + 1) for item in value]
    return value


def _drop_partial_token(text: str) -> str:
    """``text`` cut short: without its last token when that may be a credential cut in two
    (``https://alice:hun`` has lost the ``@`` that marks it)."""
    start = len(text)
    while start > 0 and text[start - 1] not in _DELIMITERS:
        start -= 1
    tail = text[start:]
    return text[:start] if any(c in tail for c in "@?#=&:%") else text


def redact_cut(text: Any, limit: int, *, marker: str = "...", lookahead: int = 4096) -> str:
    """``redact(text)`` in at most ``limit`` characters (ending in ``marker`` when cut).

    Redaction runs before the cut, over ``lookahead`` characters past it, so a credential
    that straddles the cut is still recognised; a token cut in two that might be one is dropped.
    """
    raw = str(text)
    out = redact(raw[:limit + lookahead])
    if len(out) <= limit and len(raw) <= limit + lookahead:
        return out
    room = max(limit - len(marker), 0)
    return _drop_partial_token(out[:room]) + marker[:limit]


def redact_prefix(text: str, keep: int, encoding: str = "utf-8", *, complete: bool) -> tuple[str, bool]:
    """The redacted start of ``text`` that fits ``keep`` bytes in ``encoding``, and whether
    anything was redacted. ``complete``: ``text`` is all there is; otherwise it should run
    a few KiB past the cut, so that a credential straddling the cut is still recognised."""
    out, changed = redact_text(text)
    data = out.encode(encoding)
    if len(data) <= keep and complete:
        return out, changed
    return _drop_partial_token(data[:keep].decode(encoding, "ignore")), changed


def redact_uri(uri: Any, limit: int = 300) -> str:
    """``uri`` fit for error messages, DLQ records and logs: redacted, then cut to ``limit``."""
    return redact_cut(uri, limit)


__all__ = ["REDACTED", "is_sensitive_name", "looks_like_secret", "redact", "redact_cut", "redact_json",
           "redact_prefix", "redact_text", "redact_uri"]
