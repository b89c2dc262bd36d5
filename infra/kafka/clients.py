"""One place that builds Kafka clients from settings: security, idempotence, transactions.

Producers are idempotent with acks=all; consumers never auto-commit and read only committed
records, so a component commits an offset only after its effect is durable (or inside the same
transaction as its output).
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.helpers import create_ssl_context
from aiokafka.producer import sender as _aiokafka_sender
from pydantic import SecretStr

from infra.kafka import unreadable
from infra.procs import ServiceError
from infra.secrets import components_password_path, read_secret
from infra.settings import Settings
from schemas.tenants import COMPONENTS_USER, SCRAM_MECHANISM

# A record the client cannot parse must not stop a partition (see infra.kafka.unreadable).
unreadable.install()

#: Larger than any declared topic's max.message.bytes, so the broker is the one that decides.
MAX_REQUEST_BYTES = 64 * 1024 * 1024

#: How soon a transactional producer retries a coordinator request answered with
#: CONCURRENT_TRANSACTIONS (the previous commit's markers still being written).
TXN_RETRY_BACKOFF_MS = 5

# aiokafka retries AddPartitionsToTxn answered with CONCURRENT_TRANSACTIONS after a module-level
# BACKOFF_OVERRIDE (20 ms) instead of retry_backoff_ms; with a commit per micro-batch that constant
# was a floor under the latency of every back-to-back transaction. Only that one retry reads it.
if isinstance(getattr(_aiokafka_sender, "BACKOFF_OVERRIDE", None), float):
    _aiokafka_sender.BACKOFF_OVERRIDE = TXN_RETRY_BACKOFF_MS / 1000


#: Where `ragbus up` keeps the local broker, and a local cluster (`infra.stack`).
LOCAL_BROKER_DIR = "broker"
LOCAL_CLUSTER_DIR = "kafka-cluster"


def local_kafka_dir(settings: Settings) -> Path:
    return settings.home / (LOCAL_CLUSTER_DIR if settings.kafka_brokers > 1 else LOCAL_BROKER_DIR)


def local_ca_file(settings: Settings) -> Path:
    """The self-signed CA of the local broker's TLS listener (`kafka_local_tls`)."""
    return local_kafka_dir(settings) / "tls" / "ca.pem"


def local_listener(settings: Settings) -> str | None:
    """The client listener's protocol the local broker was last started with (None: never)."""
    root = local_kafka_dir(settings)
    marker = (root / "node-1" if settings.kafka_brokers > 1 else root) / "client-listener"
    try:
        return marker.read_text().strip() or None
    except OSError:
        return None


def client_settings(settings: Settings) -> Settings:
    """The one place that fills in how a client of the LOCAL broker authenticates.

    Unless `insecure` (or the broker was started with `ragbus up --insecure`), the local broker
    takes SASL (SCRAM-SHA-512; over TLS with `kafka_local_tls`) and ACLs only: a client that names
    no security protocol acts as ragbus's components (`schemas.tenants.COMPONENTS_USER`) with the
    password `ragbus up` generated under the home. Settings that name a protocol or a remote
    cluster (RAGBUS_KAFKA_BOOTSTRAP, RAGBUS_KAFKA_SECURITY_PROTOCOL, a tenant's principal from
    `infra.secrets.as_tenant`) are used as they are."""
    if not settings.uses_local_kafka or settings.insecure or settings.kafka_security_protocol != "PLAINTEXT":
        return settings
    listener = local_listener(settings)
    if listener == "PLAINTEXT":
        return settings  # the broker was started open (`ragbus up --insecure`)
    path = components_password_path(settings)
    password = read_secret(path)
    if password is None:
        raise ServiceError(
            f"no Kafka credentials: {path} does not exist; start the local broker with `ragbus up` "
            "(it creates them), or set RAGBUS_INSECURE=1 for a broker started with `ragbus up --insecure`"
        )
    tls = settings.kafka_local_tls or listener == "SASL_SSL"
    update: dict[str, Any] = {
        "kafka_security_protocol": "SASL_SSL" if tls else "SASL_PLAINTEXT",
        "kafka_sasl_mechanism": SCRAM_MECHANISM,
        "kafka_sasl_username": COMPONENTS_USER,
        "kafka_sasl_password": SecretStr(password),
    }
    if tls and settings.kafka_ssl_cafile is None:
        update["kafka_ssl_cafile"] = local_ca_file(settings)
    return settings.model_copy(update=update)


def is_secured(settings: Settings) -> bool:
    """Whether clients of these settings authenticate (SASL) — then ACLs and users apply."""
    return client_settings(settings).kafka_security_protocol.startswith("SASL")


def security_kwargs(settings: Settings, **override: Any) -> dict[str, Any]:
    """SSL and SASL options shared by producers, consumers and the admin client."""
    settings = client_settings(settings)
    protocol = override.get("security_protocol", settings.kafka_security_protocol)
    kw: dict[str, Any] = {"security_protocol": protocol}
    if protocol in ("SSL", "SASL_SSL"):
        kw["ssl_context"] = override.get("ssl_context") or ssl_context(settings)
    if protocol.startswith("SASL"):
        kw["sasl_mechanism"] = settings.kafka_sasl_mechanism
        kw["sasl_plain_username"] = settings.kafka_sasl_username
        kw["sasl_plain_password"] = (
            settings.kafka_sasl_password.get_secret_value() if settings.kafka_sasl_password else None
        )
    return kw


def ssl_context(settings: Settings) -> ssl.SSLContext:
    ctx = create_ssl_context(
        cafile=str(settings.kafka_ssl_cafile) if settings.kafka_ssl_cafile else None,
        certfile=str(settings.kafka_ssl_certfile) if settings.kafka_ssl_certfile else None,
        keyfile=str(settings.kafka_ssl_keyfile) if settings.kafka_ssl_keyfile else None,
        password=settings.kafka_ssl_password.get_secret_value() if settings.kafka_ssl_password else None,
    )
    ctx.check_hostname = settings.kafka_ssl_check_hostname
    return ctx


def _common(settings: Settings, client_id: str | None) -> dict[str, Any]:
    return {
        "bootstrap_servers": settings.bootstrap,
        "client_id": client_id or settings.kafka_client_id,
        "request_timeout_ms": settings.kafka_request_timeout_ms,
        **security_kwargs(settings),
    }


def make_producer(
    settings: Settings,
    *,
    client_id: str | None = None,
    transactional_id: str | None = None,
    **overrides: Any,
) -> AIOKafkaProducer:
    """An idempotent producer (acks=all); transactional when `transactional_id` is given.

    Call `await producer.start()` (and `stop()`), or use it as an async context manager.
    """
    compression = None if settings.kafka_compression == "none" else settings.kafka_compression
    kw: dict[str, Any] = {
        **_common(settings, client_id),
        "acks": "all",
        "enable_idempotence": True,
        "compression_type": compression,
        "linger_ms": settings.kafka_linger_ms,
        "max_request_size": MAX_REQUEST_BYTES,
        "max_batch_size": 1024 * 1024,
    }
    if transactional_id is not None:
        kw["transactional_id"] = transactional_id
        # The transaction spans only the publish of finished results, never model work, so a
        # short timeout lets the coordinator abort a crashed process's transaction quickly.
        kw["transaction_timeout_ms"] = 15_000
        # Inside a transaction lingering only delays: the partitions are added first, then each
        # batch waits out linger_ms before it is sent, and the commit waits for every batch
        # (bench/hops.py: a commit took 28 ms at p50 with linger 5, 14 ms with 0). Records a
        # batch's outputs add while a send is in flight still share the next request.
        kw["linger_ms"] = 0
        # The coordinator answers CONCURRENT_TRANSACTIONS while the previous commit's markers are
        # still being written (KAFKA-5477), a millisecond or two on a healthy broker; aiokafka then
        # waits retry_backoff_ms before adding the consumer offsets (and a fixed 20 ms before
        # adding partitions, see below). Back-to-back commits hit this every time, so retry soon.
        kw["retry_backoff_ms"] = TXN_RETRY_BACKOFF_MS
    kw.update(overrides)
    return AIOKafkaProducer(**kw)


def make_consumer(
    settings: Settings,
    *topics: str,
    group_id: str | None,
    client_id: str | None = None,
    **overrides: Any,
) -> AIOKafkaConsumer:
    """A consumer that commits manually and reads only committed records."""
    kw: dict[str, Any] = {
        **_common(settings, client_id),
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "isolation_level": "read_committed",
        "max_poll_interval_ms": settings.kafka_max_poll_interval_ms,
        "session_timeout_ms": settings.kafka_session_timeout_ms,
        "heartbeat_interval_ms": max(1000, settings.kafka_session_timeout_ms // 3),
        "fetch_max_bytes": MAX_REQUEST_BYTES,
        "max_partition_fetch_bytes": 32 * 1024 * 1024,
    }
    kw.update(overrides)
    return AIOKafkaConsumer(*topics, **kw)


def make_admin(settings: Settings, *, client_id: str | None = None) -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(**_common(settings, (client_id or settings.kafka_client_id) + "-admin"))


def transactional_id(settings: Settings, component: str) -> str:
    """`<prefix>.<component>.<instance>`: a stable RAGBUS_INSTANCE_ID lets a restarted process
    fence its crashed predecessor at once instead of waiting for the transaction timeout."""
    return f"{settings.topic_prefix}.{component}.{settings.process_id}"


async def topic_partitions(
    settings: Settings, consumer: AIOKafkaConsumer, topics: Iterable[str]
) -> list[TopicPartition]:
    """Every partition of `topics`, for a consumer that assigns them itself (no group).

    A started consumer knows the topics that existed when it bootstrapped; a topic created since
    is looked up in the cluster's metadata through the admin client (aiokafka's consumer has no
    public way to refresh its own). All topics are described, never just the missing names: a
    metadata request naming a topic would create it on a broker with auto-creation on. Raises
    LookupError naming the topics that do not exist."""
    wanted = list(dict.fromkeys(topics))
    found: dict[str, set[int]] = {t: set(consumer.partitions_for_topic(t) or ()) for t in wanted}
    if not all(found.values()):
        admin = make_admin(settings)
        await admin.start()
        try:
            described = await admin.describe_topics()
        finally:
            await admin.close()
        for entry in described:
            if entry["topic"] in found and not found[entry["topic"]]:
                found[entry["topic"]] = {p["partition"] for p in entry["partitions"]}
    missing = [t for t, parts in found.items() if not parts]
    if missing:
        names = (
            "topic " + missing[0] + " does" if len(missing) == 1 else "topics " + ", ".join(missing) + " do"
        )
        raise LookupError(f"{names} not exist (run `ragbus up` or `ragbus topics declare`)")
    return [TopicPartition(t, p) for t in wanted for p in sorted(found[t])]
