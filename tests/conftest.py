"""Session-wide services (one broker, one Postgres server) and per-test isolation: each test gets
its own topic prefix, database and Milvus collection.

Services follow one policy (tests/provision.py): an env var names a running service → use it;
else a Docker engine → testcontainers; else the project's own local processes.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.settings import Settings
from tests.provision import (
    KafkaService,
    MilvusService,
    PostgresService,
    create_database,
    kafka_service,
    milvus_server_service,
    milvus_service,
    postgres_service,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

#: Jars and model caches survive between test sessions; everything else is per session.
CACHE = Path(os.environ.get("RAGBUS_TEST_CACHE", Path.home() / ".cache" / "ragbus"))
KAFKA_VERSION = Settings().kafka_version
MILVUS_SERVER_VERSION = Settings().milvus_server_version


@pytest.fixture(scope="session")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaService]:
    with kafka_service(tmp_path_factory.mktemp("kafka"), cache=CACHE, version=KAFKA_VERSION) as service:
        yield service


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresService]:
    with postgres_service(tmp_path_factory.mktemp("postgres")) as service:
        yield service


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MilvusService]:
    """A real Milvus server (not Lite), started only by the tests that ask for it; tests share it
    with a collection each (`milvus_collection` of `base_settings`)."""
    with milvus_server_service(
        tmp_path_factory.mktemp("milvus-server"), cache=CACHE, version=MILVUS_SERVER_VERSION
    ) as service:
        yield service


@pytest.fixture(scope="session")
def milvus_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("milvus")


def unique(prefix: str = "t") -> str:
    return f"{prefix}{uuid.uuid4().hex[:12]}"


@pytest.fixture
def test_id() -> str:
    return unique()


@pytest.fixture
def base_settings(kafka: KafkaService, tmp_path: Path, test_id: str) -> Settings:
    """Settings bound to the session's broker with a fresh topic prefix (topics not declared)."""
    return Settings(
        kafka_bootstrap=kafka.bootstrap,
        topic_prefix=test_id,
        kafka_partitions=2,
        home=tmp_path / "home",
        milvus_uri=str(tmp_path / "milvus.db")
        if not os.environ.get("RAGBUS_TEST_MILVUS_URI")
        else os.environ["RAGBUS_TEST_MILVUS_URI"],
        milvus_collection=f"c_{test_id}",
        instance_id=test_id,
        _env_file=None,  # type: ignore[call-arg]
        **kafka.client,  # the session broker's credentials (it is authenticated, like `ragbus up`'s)
    )


#: Tenants whose topics every test gets (`default` is the one clients act as unless told).
TEST_TENANTS = ("default", "t", "acme")


@pytest.fixture
async def settings(base_settings: Settings, postgres: PostgresService, test_id: str) -> Settings:
    """Per-test settings with its topics declared and its own database."""
    from infra.kafka.topics import declare_topics

    await create_database(postgres.dsn, test_id)
    s = base_settings.model_copy(update={"pg_dsn": _secret(postgres.dsn_for(test_id))})
    await declare_topics(s, tenants=TEST_TENANTS)
    return s


def _secret(value: str):  # type: ignore[no-untyped-def]
    from pydantic import SecretStr

    return SecretStr(value)


__all__ = ["TEST_TENANTS", "milvus_service", "unique"]
