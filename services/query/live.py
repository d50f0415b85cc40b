"""The live (model, collection) pair and the background check that swaps it.

Model-version consistency rests on two rules:

1. The pair is one immutable :class:`LiveIndex` object, replaced by a single
   reference assignment. A request reads ``tracker.current`` once, at its start,
   and uses that object's model and collection to the end, so it never mixes
   versions, whatever happens meanwhile.
2. When the alias moves, the new version's model is loaded *before* the swap.
   Until it is ready every request keeps using the old pair (whose collection
   still exists), so no request waits for a load or fails during the flip.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Callable

from vidsearch.models import VideoTextModel
from vidsearch.store import VectorStore
from vidsearch.store_schema import model_version_of
from vidsearch.telemetry import log_event

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LiveIndex:
    version: str
    collection: str
    model: VideoTextModel


class LiveIndexTracker:
    """Follows ``alias`` in the store and keeps the matching model loaded."""

    def __init__(self, store: VectorStore, alias: str, load_model: Callable[[str], VideoTextModel],
                 poll_s: float) -> None:
        self._store = store
        self._alias = alias
        self._load_model = load_model
        self._poll_s = poll_s
        self._current: LiveIndex | None = None
        # Why there is no live index (for FAILED_PRECONDITION messages).
        self.problem: str = f"alias {alias!r} does not point at a collection yet"
        self._refresh_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def current(self) -> LiveIndex | None:
        return self._current

    def refresh(self) -> LiveIndex | None:
        """Check the alias once; load and swap in a new version if it moved."""
        with self._refresh_lock:
            collection = self._store.resolve_alias(self._alias)
            current = self._current
            if collection is None:
                # The alias was removed: nothing is live any more.
                self.problem = f"alias {self._alias!r} does not point at a collection yet"
                self._current = None
                return None
            if current is not None and current.collection == collection:
                return current
            try:
                version = model_version_of(collection, alias=self._alias)
                model = self._load_model(version)
            except Exception as exc:
                # Keep serving the old pair: a version we can't load must not take
                # the service down; the next check tries again.
                self.problem = f"live collection {collection!r} cannot be served: {exc}"
                raise
            self._current = LiveIndex(version=version, collection=collection, model=model)
            log_event(log, "live index switched", collection=collection, model_version=version,
                      previous=current.collection if current else None)
            return self._current

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="live-index-watch", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        # A thread (not an asyncio task) so that loading a large model never blocks
        # the replica's event loop: requests keep being served by the old pair.
        while not self._stop.wait(self._poll_s):
            try:
                self.refresh()
            except Exception as exc:  # noqa: BLE001 - logged; the next tick retries
                log_event(log, "live index check failed", logging.WARNING, alias=self._alias, error=str(exc))
