"""Shared fixtures. Heavy pieces (Ray, the broker, the store) are started once per
session and shared, because each takes seconds to start on a 2-core machine."""
from __future__ import annotations

import os
import tempfile

import pytest

# Keep every test off any cluster or server the developer happens to have configured.
for _var in ("RAY_ADDRESS", "KAFKA_BOOTSTRAP", "QDRANT_URL", "QDRANT_API_KEY", "VIDSEARCH_CONFIG", "VIDSEARCH_API_KEY"):
    os.environ.pop(_var, None)
# ... and off a `vidsearch up` the developer is running: commands find one through its
# state file (stack.state_file), so the tests get an empty location of their own.
_TEST_HOME = tempfile.mkdtemp(prefix="vidsearch-tests-")
os.environ["VIDSEARCH_STACK__STATE_FILE"] = os.path.join(_TEST_HOME, "stack.json")
# ... and off its durable broker data (broker.data_dir, ./data/broker by default).
os.environ["VIDSEARCH_BROKER__DATA_DIR"] = os.path.join(_TEST_HOME, "broker")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# No hub is reachable here: fail a pretrained-tag download at once instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole test session."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
                 configure_logging=False, object_store_memory=256 * 1024 * 1024)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def broker():
    """One embedded Tansu broker (ingest + DLQ topics, 4 partitions) for the session.
    Tests that consume use their own topic or consumer group, so they don't see each
    other's messages."""
    from vidsearch.broker import EmbeddedBroker

    with EmbeddedBroker(partitions=4) as started:
        yield started
