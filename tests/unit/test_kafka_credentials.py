"""How a client of the local broker authenticates is derived in one place
(`infra.kafka.clients.client_settings`): the components' SCRAM user with the password `ragbus up`
stored under the home, unless insecure; explicit settings (a remote cluster) are left alone."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr

from infra.kafka.clients import client_settings, local_ca_file, security_kwargs
from infra.procs import ServiceError
from infra.secrets import as_tenant, components_password_path, tenant_password_path, write_secret
from infra.settings import Settings


def _settings(home: Path, **kw: object) -> Settings:
    return Settings(home=home, _env_file=None, **kw)  # type: ignore[arg-type, call-arg]


def test_local_clients_log_in_as_the_components(tmp_path: Path) -> None:
    s = _settings(tmp_path)
    write_secret(components_password_path(s), "components-secret")
    kw = security_kwargs(s)
    assert kw["security_protocol"] == "SASL_PLAINTEXT" and kw["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (kw["sasl_plain_username"], kw["sasl_plain_password"]) == ("ragbus", "components-secret")


def test_local_tls_trusts_the_brokers_own_ca(tmp_path: Path) -> None:
    s = _settings(tmp_path, kafka_local_tls=True)
    write_secret(components_password_path(s), "pw")
    effective = client_settings(s)
    assert effective.kafka_security_protocol == "SASL_SSL"
    assert effective.kafka_ssl_cafile == local_ca_file(s) == tmp_path / "broker" / "tls" / "ca.pem"


def test_without_the_password_file_the_error_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ServiceError, match="ragbus up"):
        security_kwargs(_settings(tmp_path))


@pytest.mark.parametrize("how", ["setting", "broker-started-insecure"])
def test_insecure_is_plaintext(tmp_path: Path, how: str) -> None:
    if how == "setting":
        s = _settings(tmp_path, insecure=True)
    else:
        s = _settings(tmp_path)
        (tmp_path / "broker").mkdir()
        (tmp_path / "broker" / "client-listener").write_text("PLAINTEXT\n")
    assert security_kwargs(s) == {"security_protocol": "PLAINTEXT"}


def test_explicit_settings_win(tmp_path: Path) -> None:
    remote = _settings(tmp_path, kafka_bootstrap="kafka.example:9092")
    assert client_settings(remote) is remote
    explicit = _settings(
        tmp_path,
        kafka_security_protocol="SASL_PLAINTEXT",
        kafka_sasl_mechanism="SCRAM-SHA-256",
        kafka_sasl_username="svc",
        kafka_sasl_password=SecretStr("x"),
    )
    assert client_settings(explicit) is explicit


def test_a_tenant_acts_with_its_own_principal(tmp_path: Path) -> None:
    s = _settings(tmp_path)
    write_secret(components_password_path(s), "components-secret")
    write_secret(tenant_password_path(s, "acme"), "acme-secret")
    kw = security_kwargs(as_tenant(s, "acme"))
    assert (kw["sasl_plain_username"], kw["sasl_plain_password"]) == ("ragbus.t.acme", "acme-secret")
    assert kw["security_protocol"] == "SASL_PLAINTEXT"
    # On an open broker the tenant's stored password is not used.
    assert security_kwargs(as_tenant(s.model_copy(update={"insecure": True}), "acme")) == {
        "security_protocol": "PLAINTEXT"
    }
