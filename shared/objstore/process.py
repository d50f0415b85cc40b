"""Run the object server as a child process, and talk to it (a small signed S3 client).

:class:`ObjectServerProcess` starts ``python -m vidsearch.objstore`` on a data directory,
waits until it listens and answers a signed request, and stops it (SIGTERM, then SIGKILL).
:func:`s3_request` is the client: the readiness probe uses it, and so do the tests that
check the server's semantics directly.
"""
from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import quote

from .__main__ import READY_FILE
from .datadir import RUN_DIR, DataDirError, forget_process, load_or_create_credentials, record_process
from .sigv4 import Credentials, sign

BUCKET = "tansu"  # the bucket named in Tansu's --storage-engine s3://tansu/
LOG_KEEP_BYTES = 1024 * 1024
REGION = "us-east-1"  # any region works: the server checks the signature, whatever region it names


class ObjectServerError(RuntimeError):
    """The object server could not be started or reached; the message says why (never the secret)."""


def s3_request(endpoint: str, credentials: Credentials, method: str, path: str, query: str = "",
               body: bytes = b"", headers: dict[str, str] | None = None, timeout_s: float = 10.0,
               ) -> tuple[int, dict[str, str], bytes]:
    """One signed request; ``path`` is decoded (``/bucket/key``) and encoded here the way S3
    clients do. Returns (status, lower-cased headers, body)."""
    host = endpoint.split("://", 1)[-1].rstrip("/")
    encoded = quote(path, safe="/-_.~")
    signed = sign(method, host, encoded, query, headers or {}, body, credentials, REGION)
    connection = http.client.HTTPConnection(host, timeout=timeout_s)
    try:
        connection.request(method, encoded + (f"?{query}" if query else ""), body=body or None,
                           headers={**signed, "content-length": str(len(body))})
        answer = connection.getresponse()
        return answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read()
    finally:
        connection.close()


class ObjectServerProcess:
    """The data directory's object server, listening on ``host`` (loopback by default)."""

    def __init__(self, data_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 0,
                 startup_timeout_s: float = 20.0, stop_grace_s: float = 5.0) -> None:
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.host = host
        self.requested_port = port
        self.startup_timeout_s = startup_timeout_s
        self.stop_grace_s = stop_grace_s
        self.port: int | None = None
        self._proc: subprocess.Popen | None = None
        self._credentials: Credentials | None = None

    @property
    def log_path(self) -> Path:
        return self.data_dir / RUN_DIR / "objstore.log"

    @property
    def credentials(self) -> Credentials:
        if self._credentials is None:
            try:
                self._credentials = load_or_create_credentials(self.data_dir)
            except (DataDirError, OSError) as exc:
                raise ObjectServerError(f"broker storage {self.data_dir}: {exc}") from None
        return self._credentials

    @property
    def endpoint(self) -> str:
        if self.port is None:
            raise ObjectServerError("the object server is not running")
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def mask(self, text: str, replacement: str = "<redacted>") -> str:
        """``text`` with this directory's secret replaced (a client's error output may echo it)."""
        if self._credentials is None:
            return text
        return text.replace(self._credentials.secret_access_key, replacement)

    def client_env(self) -> dict[str, str]:
        """What an S3 client (Tansu's object_store) needs to use this server. Passed through
        the environment only: command lines are visible to every user on the machine."""
        creds = self.credentials
        return {"AWS_ENDPOINT": self.endpoint, "AWS_ALLOW_HTTP": "true", "AWS_DEFAULT_REGION": REGION,
                "AWS_REGION": REGION, "AWS_ACCESS_KEY_ID": creds.access_key_id,
                "AWS_SECRET_ACCESS_KEY": creds.secret_access_key}

    def start(self) -> "ObjectServerProcess":
        if self.running:
            return self
        _ = self.credentials  # made before the server starts: it only reads them
        ready = self.data_dir / RUN_DIR / READY_FILE
        ready.unlink(missing_ok=True)
        command = [sys.executable, "-m", "vidsearch.objstore", "--data-dir", str(self.data_dir), "--host", self.host,
                   "--port", str(self.requested_port), "--bucket", BUCKET]
        if threading.current_thread() is threading.main_thread():
            # The kernel's parent-death signal follows the thread that forked: only the main
            # thread lives as long as the process.
            command += ["--parent-pid", str(os.getpid())]
        # Its own environment, without AWS_* variables: nothing here configures or needs them.
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        if self.log_path.exists() and self.log_path.stat().st_size > LOG_KEEP_BYTES:
            os.replace(self.log_path, self.log_path.with_name(self.log_path.name + ".1"))  # one old log kept
        with os.fdopen(os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab") as log_file:
            try:
                # Its own session: a signal to `vidsearch up`'s process group must not stop it
                # before Tansu, which may still be writing (see vidsearch.objstore.deathsig).
                self._proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log_file,
                                              stderr=subprocess.STDOUT, env=env, start_new_session=True)
            except OSError as exc:
                raise ObjectServerError(f"cannot run the object server: {exc}") from None
        record_process(self.data_dir, "objstore", self._proc.pid)
        try:
            self._wait_ready(ready)
        except ObjectServerError:
            self.stop()
            raise
        return self

    def _wait_ready(self, ready: Path) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        last = ""
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                tail = self.output_tail().strip().splitlines()
                raise ObjectServerError(f"the object server exited with code {self._proc.returncode} during "
                                        "startup" + (f": {tail[-1][:300]}" if tail else ""))
            if self.port is None:
                try:
                    found = json.loads(ready.read_text())
                    if int(found["pid"]) == self._proc.pid:
                        self.port = int(found["port"])
                except (OSError, ValueError, KeyError, TypeError):
                    pass
            if self.port is not None:
                try:
                    status, _headers, _body = s3_request(self.endpoint, self.credentials, "HEAD", f"/{BUCKET}",
                                                         timeout_s=2.0)
                    if status == 200:
                        return
                    last = f"HEAD /{BUCKET} answered {status}"
                except OSError as exc:
                    last = str(exc)
            time.sleep(0.05)
        raise ObjectServerError(f"the object server for {self.data_dir} was not ready within "
                                f"{self.startup_timeout_s:g}s ({last or 'it never listened'})")

    def output_tail(self, max_chars: int = 2000) -> str:
        """The end of the server's log (it logs no secrets)."""
        try:
            return self.log_path.read_bytes()[-max_chars:].decode("utf-8", "replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM (it finishes the requests it is answering), SIGKILL after the grace period."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(self.stop_grace_s + 5.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc is not None:
            forget_process(self.data_dir, "objstore")
        self.port = None
