"""`ragbus up` on a fresh home starts an authenticated broker; `ragbus tenants add|list|rotate|remove`
give a tenant credentials that Debian's kcat can use on its own topics and nowhere else; the
secrets stay in 0600 files. `ragbus up --insecure` is the open broker, and says so."""

from __future__ import annotations

import json
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from schemas.tenants import tenant_acls
from schemas.topics import TENANT_TOPICS
from tests.conftest import CACHE
from tests.helpers import stack_env

RAGBUS = [sys.executable, "-m", "cli.main"]
KCAT = shutil.which("kcat") or shutil.which("kafkacat")


def _ragbus(*args: str, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*RAGBUS, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def _home(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    home = tmp_path / "home"
    jars = CACHE / "kafka"  # reuse the resolved jars: this test is about security, not Maven
    if jars.exists():
        home.mkdir()
        (home / "kafka").symlink_to(jars, target_is_directory=True)
    return home, stack_env(home)


@pytest.fixture
def secure_stack(tmp_path: Path):
    home, env = _home(tmp_path)
    up = _ragbus("up", env=env)
    assert up.returncode == 0, up.stderr + up.stdout
    assert "security: SASL/SCRAM-SHA-512 + ACLs" in up.stdout and "tenant default created" in up.stdout
    yield home, env
    _ragbus("down", env=env)


def _kcat_produce(env: dict[str, str], topic: str, *auth: str) -> subprocess.CompletedProcess[str]:
    assert KCAT, "Debian's kcat is part of the set-up (infra/bootstrap)"
    return subprocess.run(
        [KCAT, "-b", f"127.0.0.1:{env['RAGBUS_KAFKA_PORT']}", *auth, "-m", "10", "-P", "-t", topic],
        input='{"hello": 1}\n',
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _credentials(output: str) -> tuple[str, str]:
    """(username, password) from the client properties `ragbus tenants add/rotate` printed."""
    jaas = next(x for x in output.splitlines() if x.startswith("sasl.jaas.config="))
    found = re.search(r'username="([^"]+)" password="([^"]+)"', jaas)
    assert found, jaas
    return found.group(1), found.group(2)


def _produce_as(env: dict[str, str], topic: str, user: str, password: str) -> str:
    """Produce one record with the printed properties (aiokafka: Debian's kcat links librdkafka
    2.0, whose SCRAM Kafka 4 rejects — fixed in librdkafka 2.6.1); "ok" or the error's class."""
    import asyncio

    from aiokafka import AIOKafkaProducer
    from aiokafka.errors import KafkaError

    async def go() -> str:
        producer = AIOKafkaProducer(
            bootstrap_servers=f"127.0.0.1:{env['RAGBUS_KAFKA_PORT']}",
            security_protocol="SASL_PLAINTEXT",
            sasl_mechanism="SCRAM-SHA-512",
            sasl_plain_username=user,
            sasl_plain_password=password,
            request_timeout_ms=8000,
        )
        try:
            await producer.start()
            await asyncio.wait_for(producer.send_and_wait(topic, b'{"hello": 1}'), 20)
            return "ok"
        except KafkaError as e:
            return type(e).__name__
        finally:
            await producer.stop()

    return asyncio.run(go())


def test_tenants_lifecycle(secure_stack: tuple[Path, dict[str, str]]) -> None:
    home, env = secure_stack
    status = _ragbus("status", env=env)
    assert "security: SASL/SCRAM-SHA-512 + ACLs" in status.stdout, status.stdout

    # kcat without credentials: no metadata, nothing written.
    anonymous = _kcat_produce(env, "ragbus.t.default.chat.requests")
    assert anonymous.returncode != 0, anonymous.stderr

    added = _ragbus("tenants", "add", "acme", env=env)
    assert added.returncode == 0, added.stderr + added.stdout
    assert (
        "security.protocol=SASL_PLAINTEXT" in added.stdout and "sasl.mechanism=SCRAM-SHA-512" in added.stdout
    )
    assert "kcat -b" in added.stdout
    user, password = _credentials(added.stdout)
    assert user == "ragbus.t.acme"
    assert _produce_as(env, "ragbus.t.acme.chat.requests", user, password) == "ok"
    assert (
        _produce_as(env, "ragbus.t.default.chat.requests", user, password) == "TopicAuthorizationFailedError"
    )

    listed = {t["tenant"]: t for t in json.loads(_ragbus("tenants", "list", "--json", env=env).stdout)}
    assert set(listed) >= {"default", "acme"}
    assert listed["acme"]["acls"] == len(tenant_acls("acme"))
    assert listed["acme"]["topics"] == len(TENANT_TOPICS)
    assert "password" not in json.dumps(listed).replace("password_stored", "")
    assert password not in _ragbus("tenants", "list", env=env).stdout

    rotated = _ragbus("tenants", "rotate", "acme", env=env)
    assert rotated.returncode == 0, rotated.stderr
    assert _produce_as(env, "ragbus.t.acme.chat.requests", user, password) != "ok"  # the old password
    new_password = _credentials(rotated.stdout)[1]
    assert _produce_as(env, "ragbus.t.acme.chat.requests", user, new_password) == "ok"

    removed = _ragbus("tenants", "remove", "acme", env=env)
    assert removed.returncode == 0 and f"{len(tenant_acls('acme'))} ACLs" in removed.stdout, (
        removed.stdout + removed.stderr
    )
    assert _produce_as(env, "ragbus.t.acme.chat.requests", user, new_password) != "ok"

    # Every secret under the home is 0600 in a 0700 folder.
    secrets = home / "secrets"
    for path in (secrets / "kafka-ragbus.password", home / "broker" / "server.properties"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for folder in (secrets, secrets / "tenants", home / "broker"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    assert not (secrets / "tenants" / "ragbus.t.acme.password").exists()


def test_insecure_up_says_so(tmp_path: Path) -> None:
    _, env = _home(tmp_path)
    try:
        up = _ragbus("up", "--insecure", env=env)
        assert up.returncode == 0, up.stderr + up.stdout
        status = _ragbus("status", env=env)
        assert "INSECURE: open listener" in status.stdout, status.stdout
        added = _ragbus("tenants", "add", "acme", env=env)
        assert added.returncode == 0 and "no credentials" in added.stdout, added.stdout + added.stderr
        assert _kcat_produce(env, "ragbus.t.acme.chat.requests").returncode == 0
    finally:
        _ragbus("down", env=env)
