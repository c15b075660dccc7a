"""The worker's one config object, read from the environment (12-factor style).

Every setting has a default that runs against the local broker; a bad value stops the program with a
message naming the variable and what it accepts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """A setting that cannot be used; the message names the variable and the fix."""


def _positive_int(name: str, default: int, maximum: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    accepts = "a positive integer" + (f" of at most {maximum}" if maximum is not None else "")
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be {accepts}, got {raw!r}") from None
    if value <= 0 or (maximum is not None and value > maximum):
        raise ConfigError(f"{name} must be {accepts}, got {raw!r}")
    return value


# The user state stores its item-history and event-id counts in 16 bits (worker/state.py).
# tests/test_state.py checks this limit against the header, and model.checkpoint.VERSION_MAX
# against the header's 32-bit model version.
STATE_COUNT_MAX = 65535


def _positive_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a positive, finite number, got {raw!r}") from None
    if not 0 < value < float("inf"):
        raise ConfigError(f"{name} must be a positive, finite number, got {raw!r}")
    return value


def _choice(name: str, default: str, choices: tuple[str, ...]) -> str:
    value = os.environ.get(name) or default
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _text(name: str, default: str) -> str:
    return os.environ.get(name) or default


def var_dir() -> Path:
    """Project-local folder for runtime data (broker data, worker state, checkpoints)."""
    return Path(os.environ.get("KSR_VAR_DIR") or REPO_ROOT / "var")


@dataclass(frozen=True)
class Settings:
    """Everything the worker, replay and fine-tuner need to know about their surroundings."""

    bootstrap_servers: str
    app_id: str
    interactions_topic: str
    recommendations_topic: str
    dlq_topic: str
    model_updates_topic: str
    partitions: int
    checkpoint: Path
    state_dir: Path
    metrics_host: str
    metrics_port: int
    batch_size: int
    top_k: int
    history_length: int
    recent_event_ids: int
    rocksdb_write_buffer_mb: int
    fast_delivery: bool
    gc_freeze: bool
    rocksdb_block_cache_mb: int
    max_event_bytes: int
    processing_guarantee: str
    commit_interval_s: float
    commit_when_idle: bool
    commit_timeout_s: float
    txn_retry_backoff_ms: int
    fetch_max_wait_ms: int
    standby_replicas: int
    start_timeout_s: float
    stall_timeout_s: float
    session_timeout_s: float
    state_precision: str
    serving_kernel: str
    ranking_precision: str
    torch_threads: int
    kafka_security: dict = field(default_factory=dict, repr=False)  # holds the SASL password

    @classmethod
    def from_env(cls) -> Settings:
        """Read and validate every setting; raises ConfigError on the first bad one."""
        base = var_dir()
        settings = cls(
            bootstrap_servers=_text("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092"),
            app_id=_text("KSR_APP_ID", "ksr-worker"),
            interactions_topic=_text("KSR_TOPIC_INTERACTIONS", "interactions"),
            recommendations_topic=_text("KSR_TOPIC_RECOMMENDATIONS", "recommendations"),
            dlq_topic=_text("KSR_TOPIC_DLQ", "interactions.dlq"),
            model_updates_topic=_text("KSR_TOPIC_MODEL_UPDATES", "model-updates"),
            partitions=_positive_int("KSR_PARTITIONS", 4),
            checkpoint=Path(_text("KSR_CHECKPOINT", str(base / "checkpoints" / "current"))),
            state_dir=Path(_text("KSR_STATE_DIR", str(base / "worker"))),
            metrics_host=_text("KSR_METRICS_HOST", "127.0.0.1"),
            metrics_port=_positive_int("KSR_METRICS_PORT", 9464, maximum=65535),
            batch_size=_positive_int("KSR_BATCH_SIZE", 256),
            top_k=_positive_int("KSR_TOP_K", 10),
            history_length=_positive_int("KSR_HISTORY_LENGTH", 1000, maximum=STATE_COUNT_MAX),
            recent_event_ids=_positive_int("KSR_RECENT_EVENT_IDS", 32, maximum=STATE_COUNT_MAX),
            rocksdb_write_buffer_mb=_positive_int("KSR_ROCKSDB_WRITE_BUFFER_MB", 16),
            fast_delivery=_choice("KSR_FAST_DELIVERY", "1", ("0", "1")) == "1",
            gc_freeze=_choice("KSR_GC_FREEZE", "1", ("0", "1")) == "1",
            rocksdb_block_cache_mb=_positive_int("KSR_ROCKSDB_BLOCK_CACHE_MB", 32),
            max_event_bytes=_positive_int("KSR_MAX_EVENT_BYTES", 64 * 1024),
            processing_guarantee=_choice(
                "KSR_PROCESSING_GUARANTEE", "exactly_once", ("exactly_once", "at_least_once")
            ),
            commit_interval_s=_positive_float("KSR_COMMIT_INTERVAL_MS", 100.0) / 1000,
            commit_when_idle=_choice("KSR_COMMIT_WHEN_IDLE", "1", ("0", "1")) == "1",
            commit_timeout_s=_positive_float("KSR_COMMIT_TIMEOUT_S", 120.0),
            txn_retry_backoff_ms=_positive_int("KSR_TXN_RETRY_BACKOFF_MS", 5),
            fetch_max_wait_ms=_positive_int("KSR_FETCH_MAX_WAIT_MS", 50, maximum=30000),
            standby_replicas=int(_choice("KSR_STANDBY_REPLICAS", "1", ("0", "1", "2", "3"))),
            start_timeout_s=_positive_float("KSR_START_TIMEOUT_S", 120.0),
            stall_timeout_s=_positive_float("KSR_STALL_TIMEOUT_S", 60.0),
            session_timeout_s=_positive_float("KSR_SESSION_TIMEOUT_S", 10.0),
            state_precision=_choice("KSR_STATE_PRECISION", "float32", ("float32", "float16", "int8")),
            serving_kernel=_choice("KSR_SERVING_KERNEL", "compiled", ("compiled", "torch")),
            ranking_precision=_choice("KSR_RANKING_PRECISION", "auto", ("auto", "float32", "int8")),
            torch_threads=_positive_int("KSR_TORCH_THREADS", 1),
            kafka_security=kafka_security_from_env(),
        )
        if settings.ranking_precision == "int8" and settings.serving_kernel != "compiled":
            raise ConfigError("KSR_RANKING_PRECISION=int8 runs through the compiled kernels: unset "
                              "KSR_SERVING_KERNEL or set it to compiled")
        return settings

    def describe(self) -> dict:
        """The settings as printable values (secrets masked)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "kafka_security":
                value = {k: ("***" if "password" in k else v) for k, v in value.items()}
            out[f.name] = str(value) if isinstance(value, Path) else value
        return out


def kafka_security_from_env() -> dict:
    """SASL/SSL client settings shared by every Kafka client (names as kafka-python/aiokafka use)."""
    mapping = {
        "KAFKA_SECURITY_PROTOCOL": "security_protocol",
        "KAFKA_SASL_MECHANISM": "sasl_mechanism",
        "KAFKA_SASL_USERNAME": "sasl_plain_username",
        "KAFKA_SASL_PASSWORD": "sasl_plain_password",
        "KAFKA_SSL_CAFILE": "ssl_cafile",
        "KAFKA_SSL_CERTFILE": "ssl_certfile",
        "KAFKA_SSL_KEYFILE": "ssl_keyfile",
    }
    settings = {key: os.environ[var] for var, key in mapping.items() if os.environ.get(var)}
    protocol = settings.get("security_protocol", "PLAINTEXT")
    allowed = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
    if protocol not in allowed:
        raise ConfigError(f"KAFKA_SECURITY_PROTOCOL must be one of {', '.join(allowed)}, got {protocol!r}")
    # A setting the protocol would silently ignore (credentials sent nowhere) is a mistake.
    for var, key in mapping.items():
        if key.startswith("sasl_") and key in settings and not protocol.startswith("SASL_"):
            raise ConfigError(f"{var} is set but KAFKA_SECURITY_PROTOCOL is {protocol}: use SASL_PLAINTEXT "
                              "or SASL_SSL")
        if key.startswith("ssl_") and key in settings and "SSL" not in protocol:
            raise ConfigError(f"{var} is set but KAFKA_SECURITY_PROTOCOL is {protocol}: use SSL or SASL_SSL")
        if key.startswith("ssl_") and key in settings and not (
            os.path.isfile(settings[key]) and os.access(settings[key], os.R_OK)
        ):
            raise ConfigError(f"{var} must name a readable file, got {settings[key]!r}")
    if protocol.startswith("SASL_"):
        # kafka-python has no default mechanism; aiokafka and Faust default to PLAIN.
        mechanism = settings.setdefault("sasl_mechanism", "PLAIN")
        mechanisms = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
        if mechanism not in mechanisms:
            raise ConfigError(f"KAFKA_SASL_MECHANISM must be one of {', '.join(mechanisms)}, got {mechanism!r}")
        for var in ("KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD"):
            if not os.environ.get(var):
                raise ConfigError(f"{var} must be set when KAFKA_SECURITY_PROTOCOL is {protocol}")
    return settings
