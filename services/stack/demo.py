"""`vidsearch demo`: the whole system on one machine, end to end.

Synthetic videos (``vidsearch synth``) -> the local stack (broker, embedded store,
Ray, ingest worker subprocess, Serve) -> upsert messages through Kafka -> wait
until every video is in the live collection -> real gRPC searches with captions
from the manifest. Everything lives under one data directory (``./.demo``), which
is also added to the decode allowlist.

Re-running is safe: the dataset is reused when it matches, and the index is
rebuilt from scratch each run so what is searched is exactly this run's ingest.
"""
from __future__ import annotations

import fcntl
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from vidsearch.config import Settings
from vidsearch.telemetry import log_event

from .local import LocalStack, StackError

if TYPE_CHECKING:
    from vidsearch.services.query.client import SearchClient
    from vidsearch.synth import SynthRecord

log = logging.getLogger(__name__)

DEFAULT_DATA_DIR = ".demo"
# Random-init ViT-B/32 (the real serving architecture; no weights can be downloaded)
# encodes 12 frames in ~1.3 s on a laptop CPU, so 24 videos ingest in well under a minute.
DEFAULT_PRESET = None  # None = the shipped trained model (deploy/models)
DEFAULT_N = 24
SEED = 0
TOP_K = 5
QUERIES = 3
WARMUP_TIMEOUT_S = 180.0


class DemoError(RuntimeError):
    """The demo could not run; one-line message."""


@dataclass(frozen=True)
class DemoOptions:
    data_dir: Path
    n: int = DEFAULT_N
    preset: str | None = DEFAULT_PRESET
    once: bool = False
    timeout_s: float = 900.0


def demo_settings(settings: Settings, options: DemoOptions) -> Settings:
    """The user's settings with the demo's model, store, registry and allowlist.

    Anything the user set explicitly (``model_fields_set``) wins, except the preset,
    which is the demo's own option.
    """
    data = options.data_dir
    if options.preset is None:
        # The shipped trained model, installed into the demo's registry by the stack.
        update: dict = {"registry_root": str(data / "registry")}
    else:
        # An explicit preset means its deterministic base model: a registry of its own,
        # so a production version installed by an earlier run does not win.
        update = {"preset": options.preset, "use_shipped": False, "registry_root": str(data / "registry-base")}
    if "registry_root" in settings.model.model_fields_set:
        update.pop("registry_root")
    model = settings.model.model_copy(update=update)
    store = settings.store
    if store.url is None:
        store = store.model_copy(update={"path": str(data / "store")})
    prefixes = list(dict.fromkeys([*settings.decode.allowed_prefixes, str(data)]))
    decode = settings.decode.model_copy(update={"allowed_prefixes": prefixes})
    ingest = settings.ingest
    if "metrics_port" not in ingest.model_fields_set:
        # The default port may be taken on a shared machine; the demo does not need it.
        ingest = ingest.model_copy(update={"metrics_port": 0})
    broker = settings.broker
    if "data_dir" not in broker.model_fields_set:
        # The demo's queued messages live with its other data, not in ./data/broker.
        broker = broker.model_copy(update={"data_dir": str(data / "broker")})
    return settings.model_copy(update={"model": model, "store": store, "decode": decode, "ingest": ingest,
                                       "broker": broker})


def ensure_dataset(root: Path, n: int, seed: int = SEED) -> Path:
    """The synthetic dataset under ``root``: reused when its parameters match, else rewritten."""
    from vidsearch.synth import INFO_NAME, MANIFEST_NAME, SynthError, generate_dataset

    manifest = root / MANIFEST_NAME
    try:
        info = json.loads((root / INFO_NAME).read_text())
        if manifest.exists() and info.get("n") == n and info.get("seed") == seed:
            return manifest
    except (OSError, ValueError):
        pass
    try:
        return generate_dataset(root, n, seed, overwrite=True, progress=False)
    except SynthError as exc:
        raise DemoError(str(exc)) from None


def reset_embedded_store(path: Path) -> None:
    """Remove the demo's embedded store, unless another process (a demo still running) holds it."""
    lock = path / ".lock"
    if lock.exists():
        with open(lock, "r+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                raise DemoError(f"the demo store {path} is in use by another process "
                                "(is another `vidsearch demo` running?)") from None
            fcntl.flock(handle, fcntl.LOCK_UN)
    shutil.rmtree(path, ignore_errors=True)


def wait_searchable(stack: LocalStack, video_ids: list[str], timeout_s: float,
                    say: Callable[[str], None]) -> str:
    """Block until every id is in the live collection; return the collection."""
    from vidsearch.store import StoreError, open_store

    store = open_store(stack.settings)
    deadline = time.monotonic() + timeout_s
    reported = -1
    while True:
        stack.check_alive()
        collection = store.resolve_alias()
        found = 0
        if collection is not None:
            try:
                found = len(store.get(collection, video_ids))
            except StoreError:
                found = 0  # the collection is being created
        if found != reported:
            say(f"    {found}/{len(video_ids)} videos searchable")
            reported = found
        if collection is not None and found == len(video_ids):
            return collection
        if time.monotonic() > deadline:
            raise DemoError(f"only {found} of {len(video_ids)} videos were ingested within {timeout_s:g}s; "
                            f"see the worker log and the {stack.settings.broker.dlq_topic} topic")
        time.sleep(1.0)


def run_demo(settings: Settings, options: DemoOptions, say: Callable[[str], None] = print) -> None:
    from vidsearch.services.ingest.producer import ProducerError, ops_from_manifest, publish
    from vidsearch.services.query.client import ClientError, SearchClient
    from vidsearch.synth import load_manifest

    data = options.data_dir
    data.mkdir(parents=True, exist_ok=True)
    settings = demo_settings(settings, options)
    say(f"==> synthetic dataset: {options.n} videos under {data / 'synth'}")
    manifest = ensure_dataset(data / "synth", options.n)
    records = load_manifest(manifest)
    if settings.store.url is None:
        reset_embedded_store(Path(settings.store.path))
    which = f"base model of preset {options.preset!r}" if options.preset else "the shipped trained model"
    say(f"==> starting the local stack ({which}; worker log {data / 'ingest-worker.log'})")
    started = time.monotonic()
    with LocalStack(settings, worker_log=data / "ingest-worker.log", log_to_driver=False) as stack:
        s = stack.settings
        try:
            sent = publish(s.broker.bootstrap or "", s.broker.ingest_topic, ops_from_manifest(manifest),
                           partitions=s.broker.partitions, progress=False)
        except ProducerError as exc:
            raise DemoError(str(exc)) from None
        say(f"==> published {sent.sent} upsert messages to {sent.topic} on {sent.bootstrap}; ingesting ...")
        collection = wait_searchable(stack, [r.video_id for r in records], options.timeout_s, say)
        say(f"==> all {len(records)} videos searchable in {collection} "
            f"({time.monotonic() - started:.0f}s after start)")
        if collection.split("__", 1)[-1].startswith("base-"):
            say("    (no trained model is published, so this is the deterministic base model: random-init "
                "weights, since nothing is downloaded. Its cross-encoder starts out scoring like the dual "
                "encoder, so the rankings below show the system working, not a trained model's quality.)")

        address = f"127.0.0.1:{s.serve.grpc_port}"
        key = s.serve.api_key.get_secret_value() if s.serve.api_key else None
        with SearchClient(address, s.serve.app_name, key, timeout_s=60.0) as client:
            _warm_up(client, records[0].captions[0])
            try:
                _show_queries(client, records, say)
            except ClientError as exc:
                raise DemoError(f"search failed: {exc}") from None
        if stack.page_url is not None:
            _check_page(stack.page_url, records[0].captions[0], key, say)
        if options.once:
            say("==> done (--once): stopping the stack")
            return
        say(f"==> the stack is up. Try:  vidsearch search \"a red circle\" --address {address}\n"
            "    Ctrl-C to stop.")
        stack.wait_forever()
        say("==> stopping ...")


def _warm_up(client: "SearchClient", query: str) -> None:
    """Searches until one is re-ranked: each replica loads the live model version on
    first use, and a cold reranker would make the first tables recall-only."""
    from vidsearch.services.query.client import ClientError, build_request

    deadline = time.monotonic() + WARMUP_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            if client.search(build_request(query, top_k=1)).reranked:
                return
        except ClientError as exc:
            log_event(log, "warm-up search failed", logging.DEBUG, error=str(exc))
        time.sleep(1.0)
    log_event(log, "reranker still cold after warm-up; results may be recall-only", logging.WARNING)


def _check_page(url: str, caption: str, key: str | None, say: Callable[[str], None]) -> None:
    """The search page answers a caption through its JSON API (the same search path)."""
    import json
    import urllib.error
    import urllib.parse
    import urllib.request

    query = urllib.parse.urlencode({"q": caption, "top_k": 1})
    request = urllib.request.Request(f"{url}api/search?{query}",
                                     headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            body = json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise DemoError(f"the search page at {url} does not answer: {exc}") from None
    say("")
    say(f"==> search page: {url}  (its API found {len(body.get('results', []))} result for the first caption; "
        f"open {url}?{urllib.parse.urlencode({'q': caption})} in a browser)")


def _show_queries(client: "SearchClient", records: list["SynthRecord"], say: Callable[[str], None]) -> None:
    from vidsearch.services.query.client import build_request, format_response

    picks = [records[i * len(records) // QUERIES] for i in range(min(QUERIES, len(records)))]
    for record in picks:
        caption = record.captions[0]
        response = client.search(build_request(caption, top_k=TOP_K))
        say("")
        say(format_response(response, caption, mark=record.video_id))
        ranks = [r.video_id for r in response.results]
        where = f"#{ranks.index(record.video_id) + 1}" if record.video_id in ranks else f"not in the top {TOP_K}"
        say(f"  (* = {record.video_id}, the video this caption describes: {where})")
    # A filtered query: the same caption, only videos tagged with its first colour.
    record = picks[0]
    colour = record.metadata["colours"][0]
    response = client.search(build_request(record.captions[0], top_k=TOP_K, filters=[f"tags={colour}"]))
    say("")
    say(f"with --filter tags={colour}:")
    say(format_response(response, record.captions[0], mark=record.video_id))


__all__ = ["DemoError", "DemoOptions", "StackError", "demo_settings", "ensure_dataset", "run_demo"]
