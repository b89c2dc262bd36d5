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


def test_each_slot_has_its_own_stable_identity_and_files(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from cli.background import Background, backgrounds, instance_id_for
    from infra.settings import Settings

    s = Settings(home=tmp_path, instance_id="pod-a", _env_file=None)  # type: ignore[call-arg]
    assert [instance_id_for(s, n) for n in range(3)] == ["pod-a-0", "pod-a-1", "pod-a-2"]
    # Slot 0 keeps the paths a single instance always had; others are numbered.
    first, second = backgrounds(s, ["worker"], instances=2)
    assert (first.name, second.name) == ("worker", "worker-1")
    assert first.pid_path.name == "worker.pid" and second.log_path.name == "worker-1.log"
    # Without a count, `stop` and `status` see every slot that has a pid file (slot 0 always).
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "worker-3.pid").write_text("1")
    (tmp_path / "run" / "workers-1.pid").write_text("1")  # another name: not a slot of worker
    assert [bg.name for bg in backgrounds(s, ["worker"])] == ["worker", "worker-3"]
    assert isinstance(Background(s, first.component, 2), Background)
