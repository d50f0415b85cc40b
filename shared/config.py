"""One typed settings tree for every endpoint, limit and model choice.

Sources, lowest precedence first: defaults, a YAML file (``--config`` or
``VIDSEARCH_CONFIG``), then environment variables. Nested fields are set with
``VIDSEARCH_<SECTION>__<FIELD>`` (e.g. ``VIDSEARCH_INGEST__ENCODER_ACTORS=2``);
the well-known endpoints also read their conventional names (``QDRANT_URL``,
``KAFKA_BOOTSTRAP``, ``RAY_ADDRESS`` ...). Settings are validated once, at the
edge, and a bad one raises :class:`ConfigError` whose message names it.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

ENV_PREFIX = "VIDSEARCH_"
CONFIG_FILE_ENV = "VIDSEARCH_CONFIG"

# Conventional variable names that map onto a nested setting.
WELL_KNOWN_ENV: dict[str, tuple[str, str]] = {
    "KAFKA_BOOTSTRAP": ("broker", "bootstrap"),
    "QDRANT_URL": ("store", "url"),
    "QDRANT_API_KEY": ("store", "api_key"),
    "RAY_ADDRESS": ("ray", "address"),
    "VIDSEARCH_API_KEY": ("serve", "api_key"),
}


class ConfigError(ValueError):
    """A setting is missing or invalid; the message is one line naming it."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class BrokerSettings(_Section):
    bootstrap: str | None = Field(None, description="Kafka bootstrap servers; unset = embedded Tansu broker")
    ingest_topic: str = Field("videos.ingest", description='topic the ingest worker consumes')
    dlq_topic: str = Field("videos.ingest.dlq", description="dead-letter topic for messages that can't be processed")
    partitions: int = Field(4, ge=1, le=1024, description='partitions created for both topics (upper bound on worker parallelism)')
    # A least-privilege user (a Strimzi KafkaUser with Read/Write/Describe ACLs) may not create
    # topics: with false the topics are only looked up, and a missing one stops the client.
    create_topics: bool = Field(True, description="create the ingest and DLQ topics when missing (needs the Create "
                                "permission); false = they must exist (e.g. Strimzi KafkaTopics): a missing one "
                                "stops the worker with an error naming it")
    consumer_group: str = Field("vidsearch-ingest", description='consumer group of the ingest workers')
    session_timeout_ms: int = Field(6000, ge=1000, description='consumer session timeout')
    heartbeat_interval_ms: int = Field(1000, ge=100, description='consumer heartbeat interval')
    max_poll_interval_ms: int = Field(300_000, ge=1000, description='max time between polls before the group evicts a worker')
    max_poll_records: int = Field(32, ge=1, description='records per poll, i.e. the largest ingest batch')
    embedded_host: str = Field("127.0.0.1", min_length=1, description="address the embedded broker listens on (loopback by default)")
    storage: Literal["durable", "memory"] = Field(
        "durable", description="embedded broker storage: durable (queued messages, consumer offsets and the DLQ "
        "survive a stop or crash; files under broker.data_dir) | memory (lost when the broker stops)")
    data_dir: str = Field("./data/broker", min_length=1, description="where the durable embedded broker keeps its "
                          "data, with the 0600 secret of its local object server")
    storage_port: int = Field(0, ge=0, le=65535, description="port (on 127.0.0.1) of the durable embedded broker's "
                              "object server; 0 = any free port")
    max_request_bytes: int = Field(1_048_576, ge=16_384, description="largest produce request the clients send "
                                   "(kafka max_request_size); DLQ records are built to fit it")
    # Security of an external Kafka (the Helm chart sets these from a Secret); every
    # client (worker consumer and DLQ producer, `vidsearch ingest`, topic setup) uses them.
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="Kafka security protocol: PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL")
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = Field(
        "SCRAM-SHA-512", description="SASL mechanism with a SASL_* protocol: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512")
    sasl_username: str | None = Field(None, description="SASL username (required with SASL_*)")
    sasl_password: SecretStr | None = Field(None, description="SASL password (from the environment or a secret, never a file in git)")
    ssl_cafile: str | None = Field(None, description="CA certificate (PEM file) of the brokers for SSL/SASL_SSL; unset = system CAs")

    @model_validator(mode="after")
    def _sasl_credentials(self) -> "BrokerSettings":
        if self.security_protocol.startswith("SASL_") and not (self.sasl_username and self.sasl_password):
            raise ValueError(f"security_protocol {self.security_protocol} needs broker.sasl_username and "
                             "broker.sasl_password")
        return self


class StoreSettings(_Section):
    url: str | None = Field(None, description="Qdrant server URL; unset = embedded local mode")
    api_key: SecretStr | None = Field(None, description='Qdrant API key (from the environment or a secret, never a file in git)')
    path: str = Field("./data/qdrant", description="embedded-mode storage directory")
    alias: str = Field("videos", description='alias that names the live collection')
    upsert_batch: int = Field(64, ge=1, description='points per upsert request')
    timeout_s: float = Field(30.0, gt=0, description='per-request timeout against the store')
    region_dtype: Literal["uint8", "float16", "float32"] = Field(
        "uint8", description="how a point's region tokens (the spatial re-ranker's view) are stored: uint8 "
        "codes (1 byte a value), float16 or float32; a Qdrant server stores that datatype, local mode float32")
    keep_collections: int = Field(2, ge=2, description="index collections (`videos__<version>`) kept after a re-index; "
                                  "older ones are dropped, never the live one or its rollback target")
    reindex_grace_s: float = Field(10.0, ge=0, description="after a re-index flips the alias, how long it keeps copying "
                                   "late writes to the old collection (> serve.alias_poll_s + one store write)")
    # Filterable fields and their types. System payload fields (video_id, duration_s,
    # ingested_at ...) keep their name; any other name is a metadata field, stored at
    # payload path metadata.<name>. A payload index is created on each.
    filter_fields: dict[str, Literal["keyword", "integer", "float", "datetime", "bool"]] = Field(
        default_factory=lambda: {
            "video_id": "keyword", "duration_s": "float", "ingested_at": "datetime",
            "tags": "keyword", "category": "keyword",
        },
        description="filterable field name -> keyword | integer | float | datetime | bool",
    )

    @field_validator("filter_fields")
    @classmethod
    def _filter_field_names(cls, value: dict[str, str]) -> dict[str, str]:
        # Names become payload paths (metadata.<name>), so dots or brackets would address
        # something else than the user meant.
        bad = [name for name in value if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,63}", name)]
        if bad:
            raise ValueError(f"filter field names must be identifiers, got {bad[0]!r}")
        return value


class DecodeSettings(_Section):
    allowed_schemes: list[Literal["file", "http", "https", "s3"]] = Field(["file"], description='URI schemes ingest accepts: file, http, https, s3')
    allowed_prefixes: list[str] = Field(
        default_factory=lambda: ["./data"],
        description="roots a file uri must resolve inside (after symlinks), or url prefixes",
    )
    max_bytes: int = Field(512 * 1024 * 1024, ge=1, description='largest video file accepted')
    max_duration_s: float = Field(3600.0, gt=0, description='longest video accepted (seconds)')
    max_pixels: int = Field(3840 * 2160, ge=1, description="width x height limit")
    max_frames: int = Field(64, ge=1, description='most frames sampled from one video')
    num_frames: int = Field(12, ge=1, description='frames sampled per video when sampling=uniform')
    sampling: Literal["uniform", "fps"] = Field("uniform", description='uniform (num_frames spread over the video) | fps')
    fps: float = Field(1.0, gt=0, description="frames per second when sampling=fps")
    threads: int = Field(1, ge=0, description="PyAV decode threads per decode task; 1 gives the most frames per core "
                         "(docs/benchmarks/decode.md), 0 = let FFmpeg choose")
    segment_s: float = Field(30.0, gt=0, description="a video longer than this is indexed as segments this long (moments)")
    segment_overlap_s: float = Field(5.0, ge=0, description="overlap between consecutive segments (below segment_s)")
    max_segments: int = Field(144, ge=1, description="most segments per video; a video needing more goes to the DLQ (too_large)")
    max_decoded_mb: int = Field(1024, ge=1, description="most memory the sampled RGB frames of one video may take (MiB)")
    seek_mode: Literal["exact", "keyframe"] = Field("keyframe", description="keyframe: each target takes the nearest keyframe within keyframe_tolerance_s, decoded alone (exact where none is that near); the default because it cut decode CPU 2.5-6x at GOPs up to 2 s in docs/benchmarks/decode.md, and frame times stay the frames' own | exact: the frame on screen at each target")
    keyframe_tolerance_s: float = Field(2.0, gt=0, le=60, description="seek_mode=keyframe: farthest a keyframe may be from its target (seconds); always under half the target spacing, so frames stay distinct")

    @model_validator(mode="after")
    def _overlap_below_segment(self) -> "DecodeSettings":
        if self.segment_overlap_s >= self.segment_s:
            raise ValueError(f"segment_overlap_s={self.segment_overlap_s:g} must be below segment_s={self.segment_s:g}")
        return self


class ModelSettings(_Section):
    preset: str = Field("vit-b-32", description="model config preset name or path to a JSON config")
    pretrained: str | None = Field(None, description="open_clip pretrained tag or local checkpoint path")
    registry_root: str = Field("./data/registry", description='model registry: local path or fsspec URL (s3://, gs://)')
    model_name: str = Field("vidsearch", description='model name inside the registry')
    use_shipped: bool = Field(True, description="the local stack installs the trained model in deploy/models when the registry has no production version")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")


class IngestSettings(_Section):
    encoder_actors: int = Field(1, ge=1, description='frame-encoder Ray actors per worker')
    encoder_num_gpus: float = Field(0.25, ge=0, le=1, description='GPU share per encoder actor when the cluster has GPUs')
    encoder_batch_frames: int = Field(256, ge=1, description='frames per encoder forward pass (batched across videos)')
    decode_parallelism: int = Field(2, ge=1, description='decode tasks in flight')
    max_inflight_batches: int = Field(2, ge=1, description='poll batches between poll and commit (backpressure)')
    retry_initial_s: float = Field(0.5, gt=0, description='first backoff after a transient failure')
    retry_max_s: float = Field(30.0, gt=0, description='backoff cap')
    metrics_port: int = Field(9108, ge=0, le=65535, description="Prometheus port; 0 = off")
    metrics_host: str = Field("127.0.0.1", min_length=1, description="address the Prometheus endpoint listens on (0.0.0.0 = every interface)")
    log_summary_interval_s: float = Field(30.0, gt=0, description='how often the worker logs a metrics summary')
    shutdown_grace_s: float = Field(30.0, ge=0, description="on SIGTERM, time to finish in-flight batches")
    dlq_value_bytes: int = Field(65_536, ge=0, description="first bytes of a bad message kept in its DLQ record "
                                 "(size and sha256 of the whole value are always kept)")
    publish_timeout_s: float = Field(10.0, gt=0, description="how long one DLQ publish or offset commit may wait for the broker")
    stall_after_s: float = Field(120.0, gt=0, description="a partition with work and no commit for this long is "
                                 "reported stalled (log + vidsearch_ingest_partition_stalled)")


class MessageSettings(_Section):
    """Limits on one ingest message; anything outside them goes to the DLQ as bad_message
    naming the limit. They bound what a stored point (and so a search response) can hold."""

    max_bytes: int = Field(1_048_576, ge=256, description="largest ingest message value (bytes)")
    max_metadata_bytes: int = Field(16_384, ge=2, description="largest metadata object (bytes of compact JSON)")
    max_metadata_depth: int = Field(8, ge=1, le=32, description="deepest nesting of objects/arrays in metadata "
                                    "(the metadata object itself is level 1)")
    max_metadata_keys: int = Field(256, ge=1, description="object keys in metadata, all levels together")
    max_metadata_items: int = Field(1024, ge=1, description="array elements in metadata, all levels together")
    max_string_chars: int = Field(4096, ge=16, description="longest string in metadata (keys and values) and uri")
    max_integer: int = Field(2**53 - 1, ge=1, le=2**63 - 1, description="largest integer magnitude in metadata "
                             "(2^53-1: JSON clients read numbers as doubles); send bigger ones as strings")


class ServeSettings(_Section):
    grpc_port: int = Field(50051, ge=1, le=65535, description='gRPC port of the search service')
    grpc_host: str = Field("127.0.0.1", min_length=1, description="address the gRPC proxy listens on when vidsearch starts Ray (0.0.0.0 = every interface)")
    app_name: str = Field("vidsearch", description='Serve application of the query ingress (gRPC `application` metadata)')
    api_key: SecretStr | None = Field(None, description='when set, clients must send `authorization: Bearer <key>`')
    default_top_k: int = Field(10, ge=1, le=100, description='results per query when the request leaves top_k at 0')
    default_recall_k: int = Field(50, ge=1, le=1000, description='candidates recalled for re-ranking when recall_k is 0')
    beta: float = Field(0.5, ge=0, le=1, description='fusion weight: score = beta*rerank + (1-beta)*recall')
    max_query_chars: int = Field(512, ge=1, description='longest accepted query')
    rerank_deadline_fraction: float = Field(0.5, gt=0, le=1, description='share of the remaining deadline the reranker may use')
    default_deadline_s: float = Field(10.0, gt=0, description='deadline when the client sets none')
    reranker_app_name: str = Field("vidsearch-reranker", description="Serve application of the reranker")
    reranker_num_gpus: float = Field(0.5, ge=0, le=8, description="GPU share per reranker replica when the cluster has GPUs")
    reranker_niceness: int = Field(0, ge=0, le=19, description="CPU scheduling niceness (Linux nice) of reranker replica processes; Ray starts every worker at 15, the query ingress included, so only a value above 15 ranks the reranker below it: where they share CPUs (one machine), a replica that starts or scores then yields the CPUs to recall (measured: fewer slow recall-only answers while a replacement replica starts), but under a burst of searches the reranker's calls slow down and may miss their adaptive timeout, answering recall-only; 0 or any value at or below the process's own changes nothing")
    alias_poll_s: float = Field(2.0, gt=0, description="how often the query service checks the live alias")
    text_batch_size: int = Field(32, ge=1, description="max queries per text-encoding batch")
    rerank_batch_size: int = Field(16, ge=1, description="max requests per reranker batch")
    rerank_segments: int = Field(3, ge=1, le=64, description="segments of each recalled video the reranker scores (its best by recall); the video scores as its best segment")
    batch_wait_s: float = Field(0.005, ge=0, description="how long a batch waits to fill")
    max_payload_bytes: int = Field(1024 * 1024, ge=1024, description="largest encoded payload of one result; a larger stored payload is cut down for that result (payload_notice)")
    max_response_bytes: int = Field(3584 * 1024, ge=64 * 1024, description="largest Search/GetVideo answer (under the 4 MiB default gRPC receive limit); the largest payloads are cut until it fits")
    http_port: int = Field(8000, ge=1, le=65535, description="HTTP port (on 127.0.0.1) of the search page and its JSON API")
    web_enabled: bool = Field(True, description="deploy the search page application with the search service")
    web_app_name: str = Field("vidsearch-web", description="Serve application of the search page (HTTP route /)")
    thumb_cache_entries: int = Field(512, ge=0, description="JPEG thumbnails the search page keeps in memory per replica")
    # The ingress's circuit breaker around the reranker (vidsearch.circuit_breaker): without
    # it, every search waits out its rerank share of the deadline while the reranker is down.
    rerank_breaker_enabled: bool = Field(True, description="after a reranker failure or timeout, stop calling it for a back-off window (searches answer recall-only, reranked=false), then probe it with one call")
    rerank_breaker_failures: int = Field(1, ge=1, le=1000, description="consecutive reranker failures or timeouts that open the breaker")
    rerank_breaker_backoff_s: float = Field(2.0, gt=0, le=3600, description="first back-off window: how long an open breaker answers recall-only before one probe call may go")
    rerank_breaker_backoff_max_s: float = Field(30.0, gt=0, le=3600, description="longest back-off window; each failed probe doubles the window, up to this")
    rerank_breaker_probe_timeout_s: float = Field(5.0, gt=0, le=600, description="the most the half-open probe waits for the reranker; the probe is sent by the ingress in the background (with the last search's reranker request), never inside a user's search")
    rerank_breaker_min_timeout_s: float = Field(0.5, ge=0, description="a timed-out reranker call counts as a failure only when it had at least this long (a client's short deadline says nothing about the reranker); at most rerank_breaker_probe_timeout_s")
    # The adaptive per-call timeout: a reranker call gives up after a small multiple of the
    # latency recently observed, not after its whole share of the deadline, so the searches
    # in flight when a replica dies wait a bounded multiple of a normal answer.
    rerank_breaker_timeout_multiplier: float = Field(2.0, ge=1, le=100, description="a reranker call times out after this many times the slowest of the last serve.rerank_breaker_latency_window successful calls (never after more than its share of the deadline)")
    rerank_breaker_timeout_floor_s: float = Field(0.05, gt=0, le=600, description="the adaptive reranker timeout is never below this")
    rerank_breaker_latency_window: int = Field(50, ge=1, le=100000, description="successful reranker calls whose latency the adaptive timeout looks at")
    rerank_breaker_latency_min_samples: int = Field(5, ge=1, le=100000, description="successful calls needed before the adaptive timeout applies (until then a call may take its whole share of the deadline); at most serve.rerank_breaker_latency_window")

    @field_validator("rerank_breaker_backoff_max_s")
    @classmethod
    def _backoff_max_not_below_first(cls, value: float, info: Any) -> float:
        # A field validator (not a model one) so the error names this field and quotes only its value.
        first = info.data.get("rerank_breaker_backoff_s")
        if first is not None and value < first:
            raise ValueError(f"must be >= serve.rerank_breaker_backoff_s ({first:g})")
        return value

    @field_validator("rerank_breaker_min_timeout_s")
    @classmethod
    def _min_timeout_not_above_probe(cls, value: float, info: Any) -> float:
        # Above it, a probe that times out would never count and the breaker could stay half-open.
        probe = info.data.get("rerank_breaker_probe_timeout_s")
        if probe is not None and value > probe:
            raise ValueError(f"must be <= serve.rerank_breaker_probe_timeout_s ({probe:g})")
        return value

    @field_validator("rerank_breaker_latency_min_samples")
    @classmethod
    def _min_samples_within_window(cls, value: int, info: Any) -> int:
        # More than the window holds could never be reached: the adaptive timeout would never apply.
        window = info.data.get("rerank_breaker_latency_window")
        if window is not None and value > window:
            raise ValueError(f"must be <= serve.rerank_breaker_latency_window ({window})")
        return value


class RaySettings(_Section):
    address: str | None = Field(None, description="Ray cluster address; unset = local Ray")
    num_cpus: int | None = Field(None, ge=1, description='CPUs of a local Ray (unset = all)')
    node_ip: str = Field("127.0.0.1", min_length=1, description="address a local Ray binds and advertises (loopback by default)")


class StackSettings(_Section):
    state_file: str = Field("~/.vidsearch/stack.json", description="where `vidsearch up` writes its endpoints; other commands read it to find the running stack")
    worker_restart_initial_s: float = Field(1.0, gt=0, description="first wait before `vidsearch up` restarts a dead ingest worker")
    worker_restart_max_s: float = Field(60.0, gt=0, description="longest wait between worker restarts (backoff cap)")


class Settings(_Section):
    broker: BrokerSettings = BrokerSettings()
    store: StoreSettings = StoreSettings()
    decode: DecodeSettings = DecodeSettings()
    model: ModelSettings = ModelSettings()
    ingest: IngestSettings = IngestSettings()
    messages: MessageSettings = MessageSettings()
    serve: ServeSettings = ServeSettings()
    ray: RaySettings = RaySettings()
    stack: StackSettings = StackSettings()

    @model_validator(mode="after")
    def _cross_checks(self) -> "Settings":
        if self.serve.default_recall_k < self.serve.default_top_k:
            raise ValueError("serve.default_recall_k must be >= serve.default_top_k")
        if self.serve.max_payload_bytes > self.serve.max_response_bytes:
            raise ValueError("serve.max_payload_bytes must be <= serve.max_response_bytes")
        return self

    def dump(self) -> dict[str, Any]:
        """Plain dict with secrets masked, for logs."""
        return json.loads(self.model_dump_json())


def _set_nested(tree: dict, section: str, key: str, value: Any) -> None:
    tree.setdefault(section, {})[key] = value


def _parse_env_value(raw: str) -> Any:
    # JSON lets lists and numbers through (VIDSEARCH_DECODE__ALLOWED_PREFIXES='["/data"]');
    # anything that isn't JSON is taken as a plain string.
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _env_overrides(env: Mapping[str, str]) -> dict:
    tree: dict = {}
    for name, (section, key) in WELL_KNOWN_ENV.items():
        if env.get(name):
            _set_nested(tree, section, key, env[name])
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name or name == CONFIG_FILE_ENV:
            continue
        section, _, key = name[len(ENV_PREFIX):].lower().partition("__")
        if section not in Settings.model_fields:
            raise ConfigError(f"{name}: unknown settings section '{section}'")
        value = (raw if key in ("bootstrap", "url", "address", "api_key", "path", "sasl_username", "sasl_password",
                                "ssl_cafile", "data_dir") else _parse_env_value(raw))
        _set_nested(tree, section, key, value)
    return tree


def _merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "settings"
    return f"invalid setting {where}: {first['msg']} (got {first.get('input')!r})"


def load_settings(config_file: str | os.PathLike | None = None,
                  env: Mapping[str, str] | None = None) -> Settings:
    """Build and validate the settings once; raise ConfigError naming the bad setting."""
    env = os.environ if env is None else env
    tree: dict = {}
    path = config_file or env.get(CONFIG_FILE_ENV)
    if path:
        try:
            loaded = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"config file {path}: {exc.strerror or exc}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: top level must be a mapping of sections")
        tree = loaded
    tree = _merge(tree, _env_overrides(env))
    try:
        return Settings.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc)) from None
