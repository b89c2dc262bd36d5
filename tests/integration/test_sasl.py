"""With TLS on the local broker's authenticated listener (SASL_SSL, SCRAM-SHA-512; what
RAGBUS_KAFKA_LOCAL_TLS=1 starts), a client without valid credentials is refused and one with them
works (TLS verified against the broker's certificate)."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiokafka.errors import KafkaError
from pydantic import SecretStr

from infra.kafka.broker import LocalKafka
from infra.kafka.clients import make_producer
from infra.kafka.topics import declare_topics
from infra.procs import free_port
from infra.settings import Settings
from infra.smoke import round_trip
from tests.conftest import CACHE, KAFKA_VERSION
from tests.provision import broker_auth

AUTH, CLIENT = broker_auth(tls=True)


@pytest.fixture(scope="module")
def secure_broker(tmp_path_factory: pytest.TempPathFactory):
    broker = LocalKafka(
        tmp_path_factory.mktemp("sasl-broker"),
        cache=CACHE,
        version=KAFKA_VERSION,
        port=free_port(),
        controller_port=free_port(),
        auth=AUTH,
    )
    broker.start()
    yield broker
    broker.stop()


def _settings(broker: LocalKafka, **kw: object) -> Settings:
    base: dict[str, object] = {
        "kafka_bootstrap": broker.bootstrap,
        **CLIENT,
        "kafka_ssl_cafile": broker.ca_file,
        "topic_prefix": "secure",
        "kafka_partitions": 1,
        "kafka_request_timeout_ms": 5000,
        "_env_file": None,
    }
    base.update(kw)
    return Settings(**base)  # type: ignore[arg-type]


async def test_client_with_credentials_works(secure_broker: LocalKafka) -> None:
    s = _settings(secure_broker)
    await declare_topics(s, tenants=[s.tenant])  # the round trip covers the client's tenant's topics too
    results = await round_trip(s, timeout=20)
    assert results and all(r.ok for r in results), results


@pytest.mark.parametrize(
    "override",
    [
        {"kafka_security_protocol": "SSL", "kafka_sasl_mechanism": None},  # TLS, no credentials
        {"kafka_sasl_password": SecretStr("wrong-password")},
        {"kafka_sasl_username": "mallory"},
    ],
    ids=["no-credentials", "wrong-password", "unknown-user"],
)
async def test_client_without_valid_credentials_is_refused(secure_broker: LocalKafka, override: dict) -> None:  # type: ignore[type-arg]
    s = _settings(secure_broker, **override)
    producer = make_producer(s, request_timeout_ms=5000, metadata_max_age_ms=5000)
    with pytest.raises(KafkaError):
        try:
            await producer.start()
            await producer.send_and_wait("secure.t.default.chat.requests", b"should never land")
        finally:
            await producer.stop()


async def test_tls_is_verified(secure_broker: LocalKafka, tmp_path: Path) -> None:
    """A client that trusts another CA cannot talk to the broker even with the right password."""
    from infra.kafka.tls import make_keystore

    _, other_ca = make_keystore(tmp_path / "other", "pw")
    s = _settings(secure_broker, kafka_ssl_cafile=other_ca)
    producer = make_producer(s, request_timeout_ms=5000)
    with pytest.raises(KafkaError):
        try:
            await producer.start()
        finally:
            await producer.stop()
