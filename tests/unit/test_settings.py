from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from infra.settings import Settings, mask_uri


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


def test_config_masks_secrets_inside_uris(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    s = Settings(
        home=tmp_path,
        milvus_uri="https://root:Milvus-pw@milvus.example:19530/db?token=tok-123&timeout=5",
        otel_endpoint="http://collector:4318/v1/traces?api_key=k-456&x=1",
        _env_file=None,  # type: ignore[call-arg]
    )
    masked = s.masked()
    shown = repr(masked)
    for secret in ("Milvus-pw", "tok-123", "k-456"):
        assert secret not in shown
    assert masked["milvus_uri"].startswith("https://root:********@milvus.example:19530/db?")
    assert "timeout=5" in masked["milvus_uri"] and "x=1" in masked["otel_endpoint"]
    # A bare token as the user part, and a URI with nothing secret, shown as they are otherwise.
    assert mask_uri("https://tok-789@host/x") == "https://********@host/x"
    assert mask_uri("http://localhost:4318") == "http://localhost:4318"


def test_each_part_gets_its_own_postgres_role(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from infra.secrets import postgres_password_path, write_secret

    monkeypatch.chdir(tmp_path)
    s = Settings(home=tmp_path, _env_file=None)  # type: ignore[call-arg]
    for role, password in (("ragbus", "own/er"), ("ragbus_sink", "s1nk"), ("ragbus_reader", "r3ad")):
        write_secret(postgres_password_path(s, role), password)
    assert s.postgres_dsn == "postgresql://ragbus:own%2Fer@127.0.0.1:55432/ragbus"
    assert s.postgres_dsn_for("sink") == "postgresql://ragbus_sink:s1nk@127.0.0.1:55432/ragbus"
    assert s.postgres_dsn_for("reader") == "postgresql://ragbus_reader:r3ad@127.0.0.1:55432/ragbus"
    # An external server: pg_dsn serves every part unless a part has its own DSN.
    ext = Settings(home=tmp_path, pg_dsn="postgresql://admin:a@db/audit", _env_file=None)  # type: ignore[call-arg]
    assert ext.postgres_dsn_for("sink") == ext.postgres_dsn == "postgresql://admin:a@db/audit"
    ext = ext.model_copy(update={"pg_reader_dsn": SecretStr("postgresql://ro:r@db/audit")})
    assert ext.postgres_dsn_for("reader") == "postgresql://ro:r@db/audit"
    assert ext.masked()["pg_reader_dsn"] == "********"


def test_every_setting_belongs_to_exactly_one_section() -> None:
    from infra.settings import SECTIONS

    owners: dict[str, list[str]] = {}
    for name, cls in SECTIONS.items():
        for field in cls.model_fields:
            owners.setdefault(field, []).append(name)
    assert {f: o for f, o in owners.items() if len(o) > 1} == {}
    assert set(owners) == set(Settings.model_fields)


def test_masked_sections_group_the_masked_values(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    s = Settings(home=tmp_path, kafka_sasl_password=SecretStr("hunter2"), retrieval_top_k=7)
    groups = s.masked_sections()
    assert groups["kafka"]["kafka_sasl_password"] == "********"
    assert groups["processors"]["retrieval_top_k"] == 7
    assert "retrieval_top_k" not in groups["kafka"] and "hunter2" not in repr(groups)
