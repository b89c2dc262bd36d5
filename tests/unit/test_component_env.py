"""`ragbus start` gives each component only the secrets it uses: the audit keys and the Postgres
DSNs reach the audit sink, never the worker, the processors or the gateway."""

from __future__ import annotations

from cli.background import BY_NAME, COMPONENTS, component_env

BASE = {
    "PATH": "/usr/bin",
    "RAGBUS_KAFKA_BOOTSTRAP": "127.0.0.1:9092",
    "RAGBUS_KAFKA_SASL_PASSWORD": "bus-pw",
    "RAGBUS_AUDIT_ENCRYPTION_KEYS": "k1:c2VjcmV0",
    "ragbus_audit_key_file": "/keys/audit",  # pydantic-settings reads env names case-insensitively
    "RAGBUS_PG_DSN": "postgresql://ragbus:pw@db/ragbus",
    "RAGBUS_PG_SINK_DSN": "postgresql://ragbus_sink:pw@db/ragbus",
    "RAGBUS_PG_READER_DSN": "postgresql://ragbus_reader:pw@db/ragbus",
}
AUDIT_AND_DB = {
    "RAGBUS_AUDIT_ENCRYPTION_KEYS",
    "ragbus_audit_key_file",
    "RAGBUS_PG_DSN",
    "RAGBUS_PG_SINK_DSN",
    "RAGBUS_PG_READER_DSN",
}


def test_only_the_sink_inherits_audit_keys_and_its_database_credentials() -> None:
    sink = component_env(BY_NAME["sink"], dict(BASE))
    assert {"RAGBUS_AUDIT_ENCRYPTION_KEYS", "ragbus_audit_key_file", "RAGBUS_PG_SINK_DSN"} <= set(sink)
    assert "RAGBUS_PG_READER_DSN" not in sink  # the sink never reads the trail
    for component in COMPONENTS:
        if component.name == "sink":
            continue
        env = component_env(component, dict(BASE))
        assert not AUDIT_AND_DB & set(env), component.name
        # What every component needs stays.
        assert env["RAGBUS_KAFKA_BOOTSTRAP"] == "127.0.0.1:9092" and env["PATH"] == "/usr/bin"


def test_the_environment_given_is_not_changed() -> None:
    base = dict(BASE)
    component_env(BY_NAME["worker"], base)
    assert base == BASE
