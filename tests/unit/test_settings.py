from pathlib import Path

import pytest
from pydantic import ValidationError

from infra.settings import Settings


def test_environment_overrides_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAGBUS_KAFKA_BOOTSTRAP", "broker-a:9092,broker-b:9092")
    monkeypatch.setenv("RAGBUS_PG_DSN", "postgresql://u:hunter2@db:5432/audit")
    s = Settings()
    assert s.bootstrap == "broker-a:9092,broker-b:9092" and not s.uses_local_kafka
    assert s.postgres_dsn.endswith("/audit") and not s.uses_local_postgres
    masked = s.masked()
    assert masked["pg_dsn"] == "********"
    assert "hunter2" not in repr(masked)


def test_toml_file_is_read_below_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cfg = tmp_path / "ragbus.toml"
    cfg.write_text('topic_prefix = "acme"\nretrieval_top_k = 7\nkafka_sasl_password = "s3cret"\n')
    monkeypatch.setenv("RAGBUS_CONFIG", str(cfg))
    monkeypatch.setenv("RAGBUS_RETRIEVAL_TOP_K", "9")
    s = Settings()
    assert s.topic_prefix == "acme" and s.topics.tenant("x").requests("bulk") == "acme.t.x.bulk.requests"
    assert s.retrieval_top_k == 9
    assert s.masked()["kafka_sasl_password"] == "********"


def test_local_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    s = Settings(home=tmp_path)
    assert s.uses_local_kafka and s.bootstrap == "127.0.0.1:9092"
    assert s.uses_milvus_lite and s.milvus_target == str(tmp_path / "milvus" / "ragbus.db")
    assert not Settings(milvus_uri="http://milvus:19530").uses_milvus_lite


def test_inconsistent_settings_are_refused() -> None:
    with pytest.raises(ValidationError, match="chunk_overlap_tokens"):
        Settings(chunk_tokens=32, chunk_overlap_tokens=32)
    with pytest.raises(ValidationError, match="kafka_sasl_mechanism"):
        Settings(kafka_security_protocol="SASL_SSL")
