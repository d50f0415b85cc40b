"""``python -m vidsearch.objstore --data-dir DIR``: serve DIR's objects until SIGTERM.

Started by :class:`vidsearch.objstore.process.ObjectServerProcess`; it reads the secret from
the data directory (never from its command line or environment), binds the address, and
then writes ``run/objstore.json`` with the port, which is how its parent learns it is ready.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from .datadir import OBJECTS_DIR, RUN_DIR, DataDirError, DirLock, load_credentials, start_time
from .deathsig import die_with_parent
from .objects import FileObjects
from .server import ObjectServer

log = logging.getLogger("vidsearch.objstore")
READY_FILE = "objstore.json"
DRAIN_S = 5.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vidsearch.objstore",
                                     description="the embedded broker's file-backed S3-compatible object server")
    parser.add_argument("--data-dir", required=True, type=Path)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 = any free port")
    parser.add_argument("--bucket", action="append", default=[], help="bucket to serve (repeatable)")
    parser.add_argument("--parent-pid", type=int, default=None, help="exit when this process dies")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.parent_pid is not None:
        # A SIGKILLed `vidsearch up` then leaves no object server behind (elsewhere than on
        # Linux the next owner reaps it instead).
        die_with_parent(args.parent_pid)
    data_dir = args.data_dir.resolve()
    run = data_dir / RUN_DIR
    try:
        lock = DirLock(run / "objstore.lock").acquire("another object server")
        credentials = load_credentials(data_dir)
    except DataDirError as exc:
        print(f"objstore: {exc}", file=sys.stderr, flush=True)
        return 3
    objects = FileObjects(data_dir / OBJECTS_DIR, args.bucket or ["tansu"])
    try:
        server = ObjectServer((args.host, args.port), objects, credentials)
    except OSError as exc:
        print(f"objstore: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr, flush=True)
        return 4
    stopping = threading.Event()

    def _stop(_signum: int, _frame: FrameType | None) -> None:
        if not stopping.is_set():
            stopping.set()
            # shutdown() waits for serve_forever to return: call it off the serving thread.
            threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    port = server.server_address[1]
    ready = run / READY_FILE
    tmp = run / f".{READY_FILE}.tmp"
    tmp.write_text(json.dumps({"pid": os.getpid(), "start": start_time(os.getpid()), "host": args.host,
                               "port": port}))
    os.replace(tmp, ready)
    log.info("object server for %s listening on %s:%d", data_dir, args.host, port)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        # Writes are atomic, so an unfinished one is simply not there; waiting lets the ones
        # being answered get their reply (else the client retries them).
        if not server.drain(DRAIN_S):
            log.warning("object server stopped with requests still being served")
        server.server_close()
        ready.unlink(missing_ok=True)
        lock.release()
        log.info("object server stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
