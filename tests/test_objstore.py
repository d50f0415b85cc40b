"""The embedded broker's object server (vidsearch.objstore), spoken to directly over HTTP.

One real server process per module (``python -m vidsearch.objstore``), reached with this
package's signed client and with hand-made unsigned or mis-signed requests. Tansu's own use
of it (through the Rust object_store crate) is in test_broker_durable.py.
"""
from __future__ import annotations

import base64
import hashlib
import http.client
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from urllib.parse import quote, urlencode
from xml.etree import ElementTree as ET

import pytest

from vidsearch.objstore.datadir import load_or_create_credentials
from vidsearch.objstore.objects import FileObjects
from vidsearch.objstore.process import BUCKET, ObjectServerProcess, s3_request
from vidsearch.objstore.sigv4 import Credentials, SignatureError, sign, signature, verify

NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    started = ObjectServerProcess(tmp_path_factory.mktemp("objstore") / "data").start()
    yield started
    started.stop()


def call(server, method, key="", query="", body=b"", headers=None, credentials=None):
    path = f"/{BUCKET}/{key}" if key else f"/{BUCKET}"
    return s3_request(server.endpoint, credentials or server.credentials, method, path, query, body, headers)


def md5_etag(data: bytes) -> str:
    return '"' + hashlib.md5(data).hexdigest() + '"'


def list_keys(server, prefix="", delimiter="", max_keys=1000, start_after=""):
    """Every page of a ListObjectsV2 walk: (keys, common prefixes, number of pages)."""
    keys, prefixes, pages, token = [], [], 0, None
    while True:
        params = {"list-type": "2", "prefix": prefix, "max-keys": str(max_keys)}
        if delimiter:
            params["delimiter"] = delimiter
        if start_after:
            params["start-after"] = start_after
        if token:
            params["continuation-token"] = token
        # As S3 clients encode a query: %20 for a space, %2B for a plus (urlencode's default
        # would send a space as "+").
        status, _h, body = call(server, "GET", query=urlencode(params, quote_via=quote))
        assert status == 200, body
        root = ET.fromstring(body)
        pages += 1
        keys += [e.text for e in root.iter(f"{NS}Key")]
        prefixes += [e.text for e in root.findall(f"{NS}CommonPrefixes/{NS}Prefix")]
        if root.find(f"{NS}IsTruncated").text != "true":
            return keys, prefixes, pages
        token = root.find(f"{NS}NextContinuationToken").text


# --------------------------------------------------------------------------- signatures

AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
EMPTY = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_signature_matches_the_aws_documentation_examples():
    """The S3 SigV4 examples (GET Object with a Range; GET Bucket with a query string)."""
    headers = {"host": ["examplebucket.s3.amazonaws.com"], "range": ["bytes=0-9"],
               "x-amz-content-sha256": [EMPTY], "x-amz-date": ["20130524T000000Z"]}
    assert signature(AWS_SECRET, "20130524T000000Z", "us-east-1", "GET", "/test.txt", "", headers,
                     sorted(headers), EMPTY) == "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
    del headers["range"]
    assert signature(AWS_SECRET, "20130524T000000Z", "us-east-1", "GET", "/", "max-keys=2&prefix=J", headers,
                     sorted(headers), EMPTY) == "34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7"


def test_verify_accepts_what_sign_made_and_nothing_altered():
    creds = Credentials("AKID", "s3cr3t")
    now = time.time()
    signed = sign("PUT", "127.0.0.1:9", "/b/k%20x", "a=1", {"if-match": '"x"'}, b"body", creds, now=now)
    headers = {k: [v] for k, v in signed.items()}
    assert verify("PUT", "/b/k%20x", "a=1", headers, creds, now=now) == hashlib.sha256(b"body").hexdigest()
    for method, path, query, changed in (("GET", "/b/k%20x", "a=1", {}), ("PUT", "/b/other", "a=1", {}),
                                         ("PUT", "/b/k%20x", "a=2", {}), ("PUT", "/b/k%20x", "a=1", {"if-match": ['"y"']})):
        with pytest.raises(SignatureError) as info:
            verify(method, path, query, {**headers, **changed}, creds, now=now)
        assert info.value.code == "SignatureDoesNotMatch"
    with pytest.raises(SignatureError) as info:
        verify("PUT", "/b/k%20x", "a=1", headers, creds, now=now + 16 * 60)
    assert info.value.code == "RequestTimeTooSkewed"
    assert "s3cr3t" not in repr(creds)


def test_unsigned_and_wrongly_signed_requests_are_refused_with_403(server):
    host = server.endpoint.split("://")[1]
    connection = http.client.HTTPConnection(host, timeout=10)
    connection.request("GET", f"/{BUCKET}?list-type=2")
    answer = connection.getresponse()
    body = answer.read()
    assert answer.status == 403 and b"<Code>AccessDenied</Code>" in body
    connection.close()
    wrong = Credentials(server.credentials.access_key_id, "not-the-secret")
    status, _h, body = call(server, "PUT", "forged", body=b"x", credentials=wrong)
    assert status == 403 and b"SignatureDoesNotMatch" in body
    status, _h, body = call(server, "GET", "forged", credentials=Credentials("SOMEONEELSE", "x"))
    assert status == 403 and b"InvalidAccessKeyId" in body
    assert call(server, "GET", "forged")[0] == 404  # the forged PUT wrote nothing


def test_a_body_that_does_not_match_its_signed_hash_is_refused(server):
    host = server.endpoint.split("://")[1]
    headers = sign("PUT", host, f"/{BUCKET}/tampered", "", {}, b"what was signed", server.credentials)
    connection = http.client.HTTPConnection(host, timeout=10)
    connection.request("PUT", f"/{BUCKET}/tampered", body=b"something else", headers=headers)
    answer = connection.getresponse()
    assert answer.status == 400 and b"XAmzContentSHA256Mismatch" in answer.read()
    connection.close()
    assert call(server, "GET", "tampered")[0] == 404


# --------------------------------------------------------------------------- objects

def test_put_get_head_delete_round_trip(server):
    data = b"\x00record batch\xff" * 100
    status, headers, _ = call(server, "PUT", "topics/t/0/records/00000000000000000000.batch", body=data)
    assert status == 200 and headers["etag"] == md5_etag(data)
    status, headers, body = call(server, "GET", "topics/t/0/records/00000000000000000000.batch")
    assert (status, body, headers["etag"]) == (200, data, md5_etag(data))
    assert headers["last-modified"].endswith("GMT") and headers["content-length"] == str(len(data))
    status, headers, body = call(server, "HEAD", "topics/t/0/records/00000000000000000000.batch")
    assert status == 200 and body == b"" and headers["content-length"] == str(len(data))
    status, headers, body = call(server, "GET", "topics/t/0/records/00000000000000000000.batch",
                                 headers={"range": "bytes=1-6"})
    assert status == 206 and body == data[1:7] and headers["content-range"] == f"bytes 1-6/{len(data)}"
    status, _h, _b = call(server, "GET", "topics/t/0/records/00000000000000000000.batch",
                          headers={"if-none-match": md5_etag(data)})
    assert status == 304
    assert call(server, "DELETE", "topics/t/0/records/00000000000000000000.batch")[0] == 204
    status, _h, body = call(server, "GET", "topics/t/0/records/00000000000000000000.batch")
    assert status == 404 and b"<Code>NoSuchKey</Code>" in body
    assert call(server, "DELETE", "topics/t/0/records/00000000000000000000.batch")[0] == 204  # idempotent


def test_conditional_put_gives_412_when_its_condition_fails(server):
    create = {"if-none-match": "*"}
    assert call(server, "PUT", "cas/watermark.json", body=b'{"high": 1}', headers=create)[0] == 200
    status, _h, body = call(server, "PUT", "cas/watermark.json", body=b'{"high": 9}', headers=create)
    assert status == 412 and b"<Code>PreconditionFailed</Code>" in body
    first = md5_etag(b'{"high": 1}')
    status, headers, _ = call(server, "PUT", "cas/watermark.json", body=b'{"high": 2}', headers={"if-match": first})
    assert status == 200
    second = headers["etag"]
    # The old version's ETag no longer matches: that writer lost the race.
    assert call(server, "PUT", "cas/watermark.json", body=b'{"high": 3}', headers={"if-match": first})[0] == 412
    assert call(server, "PUT", "cas/missing.json", body=b"{}", headers={"if-match": second})[0] == 412
    assert call(server, "GET", "cas/watermark.json")[2] == b'{"high": 2}'
    assert call(server, "GET", "cas/watermark.json", headers={"if-match": first})[0] == 412


def test_racing_conditional_writers_have_exactly_one_winner(server):
    """The check and the replace happen under one lock: 16 writers, one If-None-Match: * win,
    then 16 If-Match updates from the same version, one win."""
    def race(key, round_name, headers_for):
        results = []
        barrier = threading.Barrier(16)

        def writer(i):
            barrier.wait()
            # Bodies unique across rounds: the ETag is the content's MD5, so a writer putting
            # back the very bytes stored would keep the version (as on S3).
            body = f"{round_name} {i}".encode()
            results.append((call(server, "PUT", key, body=body, headers=headers_for(i))[0], i))

        threads = [threading.Thread(target=writer, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results

    created = race("race/group.json", "create", lambda i: {"if-none-match": "*"})
    winners = [i for status, i in created if status == 200]
    assert len(winners) == 1 and sorted(s for s, _ in created) == [200] + [412] * 15
    assert call(server, "GET", "race/group.json")[2] == f"create {winners[0]}".encode()
    version = md5_etag(f"create {winners[0]}".encode())
    updated = race("race/group.json", "update", lambda i: {"if-match": version})
    assert sorted(s for s, _ in updated) == [200] + [412] * 15


def test_list_objects_v2_orders_pages_and_rolls_up_prefixes(server):
    keys = sorted([f"list/p/{i:03d}.batch" for i in range(23)] + ["list/a-c", "list/a/b", "list/a/c/d", "list/a",
                                                                   "list/z.json", "list/é", "list/q/"])
    for key in keys:
        assert call(server, "PUT", key, body=key.encode())[0] == 200
    # S3 order is UTF-8 byte order: "a-c" before "a/b" ('-' < '/'), "é" last.
    assert list_keys(server, "list/")[0] == keys
    paged, _, pages = list_keys(server, "list/", max_keys=4)
    assert paged == keys and pages == -(-len(keys) // 4)  # every key once, in order, across pages
    assert list_keys(server, "list/p/0")[0] == [k for k in keys if k.startswith("list/p/0")]
    assert list_keys(server, "list/", start_after="list/p/020.batch")[0] == [k for k in keys if k > "list/p/020.batch"]
    top, prefixes, _ = list_keys(server, "list/", delimiter="/")
    assert top == ["list/a", "list/a-c", "list/z.json", "list/é"]
    assert prefixes == ["list/a/", "list/p/", "list/q/"]
    # Continuation across common prefixes, one entry per page.
    one_by_one, prefixes_paged, _ = list_keys(server, "list/", delimiter="/", max_keys=1)
    assert (one_by_one, prefixes_paged) == (top, prefixes)
    # Spaces and plus signs in keys and prefixes stay what they are.
    for key in ("odd/a+b c", "odd/a b", "odd/a+"):
        assert call(server, "PUT", key, body=b"x")[0] == 200
    assert list_keys(server, "odd/a+")[0] == ["odd/a+", "odd/a+b c"]
    assert list_keys(server, "odd/a ")[0] == ["odd/a b"]
    # Another delimiter rolls up by its own character.
    assert list_keys(server, "list/p/", delimiter=".")[1] == [f"list/p/{i:03d}." for i in range(23)]


def test_delete_objects_removes_a_batch_and_checks_its_digest(server):
    for i in range(5):
        call(server, "PUT", f"batch/{i}", body=b"x")
    body = (f'<Delete xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
            + "".join(f"<Object><Key>batch/{i}</Key></Object>" for i in (0, 1, 2, 9)) + "</Delete>").encode()
    md5 = base64.b64encode(hashlib.md5(body).digest()).decode()
    status, _h, answer = call(server, "POST", query="delete=", body=body, headers={"content-md5": md5})
    assert status == 200
    deleted = [e.text for e in ET.fromstring(answer).iter(f"{NS}Key")]
    assert deleted == ["batch/0", "batch/1", "batch/2", "batch/9"]
    assert list_keys(server, "batch/")[0] == ["batch/3", "batch/4"]
    status, _h, answer = call(server, "POST", query="delete=", body=body, headers={"content-md5": "AAAA"})
    assert status == 400 and b"BadDigest" in answer
    # Emptied directories are pruned: no common prefix of nothing.
    assert "batch/" in list_keys(server, "", delimiter="/")[1]
    call(server, "POST", query="delete=", body=b"<Delete><Object><Key>batch/3</Key></Object>"
         b"<Object><Key>batch/4</Key></Object><Quiet>true</Quiet></Delete>")
    assert "batch/" not in list_keys(server, "", delimiter="/")[1]


def test_what_is_not_implemented_says_so_and_is_logged(server):
    status, _h, body = call(server, "POST", "big.parquet", query="uploads=")
    assert status == 501 and b"<Code>NotImplemented</Code>" in body and b"multipart upload" in body
    status, _h, body = call(server, "PUT", "copy", headers={"x-amz-copy-source": f"/{BUCKET}/list/a"})
    assert status == 501 and b"CopyObject" in body
    assert call(server, "GET", query="")[0] == 501  # ListObjects v1
    deadline = time.monotonic() + 5
    while "NotImplemented" not in server.output_tail() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "POST /tansu/big.parquet: 501 NotImplemented" in server.output_tail()
    status, _h, body = s3_request(server.endpoint, server.credentials, "GET", "/other-bucket/k")
    assert status == 404 and b"NoSuchBucket" in body


# --------------------------------------------------------------------------- process, files, secret

def test_data_survives_a_sigkill_of_the_server(tmp_path):
    first = ObjectServerProcess(tmp_path / "data").start()
    assert call(first, "PUT", "durable/x", body=b"acknowledged")[0] == 200
    os.kill(first.pid, signal.SIGKILL)
    first._proc.wait()
    # A write interrupted before its rename leaves only a temporary file, removed at start.
    stray = tmp_path / "data" / "objects" / BUCKET / "ddurable" / "tabc.tmp"
    stray.write_bytes(b"half")
    second = ObjectServerProcess(tmp_path / "data").start()
    try:
        assert call(second, "GET", "durable/x")[2] == b"acknowledged"
        assert not stray.exists()
        assert list_keys(second, "durable/")[0] == ["durable/x"]
    finally:
        second.stop()
        first.stop()


def test_secret_is_private_and_never_logged_or_on_a_command_line(server):
    data_dir = server.data_dir
    assert stat.S_IMODE(os.stat(data_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(data_dir / "credentials").st_mode) == 0o600
    secret = server.credentials.secret_access_key
    assert len(secret) >= 40 and load_or_create_credentials(data_dir) == server.credentials  # made once
    call(server, "GET", "x", credentials=Credentials(server.credentials.access_key_id, "wrong"))
    cmdline = open(f"/proc/{server.pid}/cmdline", "rb").read().decode()
    environ = open(f"/proc/{server.pid}/environ", "rb").read().decode()
    assert secret not in cmdline and secret not in environ
    assert secret not in server.output_tail(10**6)
    assert "refused a request" in server.output_tail()


def test_one_server_per_data_directory_and_loopback_only(server):
    second = subprocess.run([sys.executable, "-m", "vidsearch.objstore", "--data-dir", str(server.data_dir)],
                            capture_output=True, text=True, timeout=60)
    assert second.returncode == 3 and "in use by another object server" in second.stderr
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
    mine = [line.split()[3] for line in out.splitlines() if f"pid={server.pid}," in line]
    assert mine == [f"127.0.0.1:{server.port}"]


def test_file_objects_keep_any_key_apart_from_its_prefixes(tmp_path):
    objects = FileObjects(tmp_path, ["b"])
    for key in ("a", "a/", "a/b", ".", "..", "../x", "a//b", "%2F", "ü/ß"):
        objects.put("b", key, key.encode())
    for key in ("a", "a/", "a/b", ".", "..", "../x", "a//b", "%2F", "ü/ß"):
        assert objects.get("b", key)[1] == key.encode()
    assert [o.key for o in objects.list("b").objects] == sorted(["a", "a/", "a/b", ".", "..", "../x", "a//b", "%2F", "ü/ß"])
    # Every file and directory below the bucket is a d<segment> or o<segment>: nothing escapes it.
    assert all(p.name[0] in "do" for p in (tmp_path / "b").rglob("*"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
