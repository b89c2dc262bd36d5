"""Secrets the local stack generates and keeps under the home: one place that writes and reads them.

Files are 0600 in 0700 folders, written atomically (a reader never sees half a password), and
their contents are never logged; what `ragbus` prints once on creation is the only copy shown.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from pydantic import SecretStr

from infra.settings import Settings
from schemas.tenants import COMPONENTS_USER, SCRAM_MECHANISM, tenant_principal


def secrets_dir(settings: Settings) -> Path:
    return settings.home / "secrets"


def components_password_path(settings: Settings) -> Path:
    """The SCRAM password of ragbus's own components (`schemas.tenants.COMPONENTS_USER`)."""
    return secrets_dir(settings) / f"kafka-{COMPONENTS_USER}.password"


def tenant_password_path(settings: Settings, tenant: str) -> Path:
    """A tenant's SCRAM password, kept for the CLI's `--tenant` and the gateway."""
    return secrets_dir(settings) / "tenants" / f"{tenant_principal(tenant, settings.topic_prefix)}.password"


def postgres_password_path(settings: Settings, role: str) -> Path:
    """The password of a Postgres role of the local server: its owner (`pg_user`, created by initdb)
    or a least-privilege role (`infra.postgres.roles`), generated once by `ragbus up`."""
    return secrets_dir(settings) / "postgres" / f"{role}.password"


def generate_password() -> str:
    return secrets.token_urlsafe(32)


def write_secret(path: Path, value: str) -> None:
    """Write `value` to `path` as 0600, creating its folders as 0700, atomically."""
    _private_dirs(path.parent)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, value.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_secret(path: Path) -> str | None:
    """The secret in `path`, or None when there is none."""
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None


def remove_secret(path: Path) -> None:
    path.unlink(missing_ok=True)


def _private_dirs(folder: Path) -> None:
    """Create `folder`; make it and its ancestors up to the `secrets` folder 0700 (mkdir's mode is
    masked by the umask and leaves existing folders alone)."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    for each in (folder, *folder.parents):
        each.chmod(0o700)
        if each.name == "secrets":
            break


def as_tenant(settings: Settings, tenant: str) -> Settings:
    """Settings for a client acting as `tenant`: its topics (`settings.tenant`) and, when this
    machine keeps the tenant's password (`ragbus tenants add`), its SCRAM principal; otherwise the
    credentials already configured (say `RAGBUS_KAFKA_SASL_USERNAME` for a remote cluster)."""
    from infra.kafka.clients import client_settings  # (clients reads its secrets from here)

    update: dict[str, object] = {"tenant": tenant}
    password = read_secret(tenant_password_path(settings, tenant))
    # The local broker's protocol (TLS?) and CA; an open broker (`--insecure`) takes no password.
    effective = client_settings(settings) if password is not None else settings
    if password is not None and effective.kafka_security_protocol.startswith("SASL"):
        tls = effective.kafka_security_protocol.endswith("SSL")
        if effective.kafka_ssl_cafile is not None:
            update["kafka_ssl_cafile"] = effective.kafka_ssl_cafile
        update |= {
            "kafka_security_protocol": "SASL_SSL" if tls else "SASL_PLAINTEXT",
            "kafka_sasl_mechanism": SCRAM_MECHANISM,
            "kafka_sasl_username": tenant_principal(tenant, settings.topic_prefix),
            "kafka_sasl_password": SecretStr(password),
        }
    return settings.model_copy(update=update)
