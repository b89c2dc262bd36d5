"""SCRAM users and ACLs through the Kafka Admin API, and the tenant lifecycle built on them.

Why the Admin API and not the broker's shell tools: it works the same on the local broker and on
a remote cluster (given a principal allowed to alter users and ACLs), and needs no Java here.
The client computes the salted password (PBKDF2, RFC 5802 `Hi`) and sends only that and the
salt: the password itself never crosses the wire.

A tenant (`schemas.tenants`) is its topics, its SCRAM principal `<prefix>.t.<tenant>` and exactly
the ACLs `tenant_acls` lists. Its password is generated here, stored 0600 under the home
(`infra.secrets`) for the CLI's `--tenant` and the gateway, and shown once by `ragbus tenants`.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import for_code

from infra.kafka.clients import client_settings, is_secured, make_admin
from infra.kafka.protocol import (
    AclBinding,
    AlterUserScramCredentials,
    CreateAcls,
    DeleteAcls,
    DescribeAcls,
    DescribeUserScramCredentials,
)
from infra.kafka.topics import declare_topics, declared_names
from infra.secrets import generate_password, read_secret, remove_secret, tenant_password_path, write_secret
from infra.settings import Settings
from schemas.tenants import SCRAM_MECHANISM, Acl, tenant_acls, tenant_principal
from schemas.topics import TENANT_SEGMENT, check_tenant, tenant_of

#: Kafka's ScramMechanism codes and the hash behind each.
SCRAM_CODES = {"SCRAM-SHA-256": 1, "SCRAM-SHA-512": 2}
_HASHES = {"SCRAM-SHA-256": "sha256", "SCRAM-SHA-512": "sha512"}
#: PBKDF2 iterations of the credentials made here (Kafka accepts 4096 to 16384).
SCRAM_ITERATIONS = 8192

# ACL codes of the Kafka protocol (ResourceType, PatternType, AclOperation, AclPermissionType).
_RESOURCE = {"ANY": 1, "TOPIC": 2, "GROUP": 3, "CLUSTER": 4}
_PATTERN = {"ANY": 1, "MATCH": 2, "LITERAL": 3, "PREFIXED": 4}
_OPERATION = {"ANY": 1, "ALL": 2, "READ": 3, "WRITE": 4, "CREATE": 5, "DELETE": 6, "ALTER": 7, "DESCRIBE": 8}
_ALLOW, _ANY_PERMISSION = 3, 1
_NAMES = {
    "resource": {v: k for k, v in _RESOURCE.items()},
    "pattern": {v: k for k, v in _PATTERN.items()},
    "operation": {v: k for k, v in _OPERATION.items()},
}
#: DescribeUserScramCredentials' answer for a user without credentials.
RESOURCE_NOT_FOUND = 91


class SecurityError(RuntimeError):
    """The cluster refused a user or ACL change; the message says which and why."""


def _raise_for(code: int, message: str | None, what: str) -> None:
    if code:
        name = for_code(code).__name__
        raise SecurityError(f"{what}: {name} ({code}){': ' + message if message else ''}")


# --- SCRAM ------------------------------------------------------------------------------------
def salted_password(password: str, salt: bytes, iterations: int, mechanism: str = SCRAM_MECHANISM) -> bytes:
    """RFC 5802 SaltedPassword := Hi(Normalize(password), salt, i), i.e. PBKDF2-HMAC with the
    mechanism's hash and its digest length. The passwords made here are ASCII, which SASLprep
    leaves unchanged."""
    digest = _HASHES[mechanism]
    return hashlib.pbkdf2_hmac(digest, password.encode(), salt, iterations)


async def upsert_scram_user(
    admin: AIOKafkaAdminClient,
    name: str,
    password: str,
    *,
    mechanism: str = SCRAM_MECHANISM,
    iterations: int = SCRAM_ITERATIONS,
) -> None:
    """Create `name`'s SCRAM credential, or replace it (the old password stops working)."""
    salt = os.urandom(32)
    # 8192 rounds of HMAC-SHA-512 are a few milliseconds; off the event loop all the same.
    salted = await asyncio.to_thread(salted_password, password, salt, iterations, mechanism)
    response = await admin._send_request(  # noqa: SLF001 - aiokafka has no AlterUserScramCredentials
        AlterUserScramCredentials(upsertions=[(name, SCRAM_CODES[mechanism], iterations, salt, salted)])
    )
    for user, code, message, _ in response.results:
        _raise_for(code, message, f"creating the SCRAM user {user}")


async def delete_scram_user(
    admin: AIOKafkaAdminClient, name: str, *, mechanism: str = SCRAM_MECHANISM
) -> bool:
    """Delete `name`'s credential for `mechanism`; False when it had none."""
    response = await admin._send_request(  # noqa: SLF001 - aiokafka has no AlterUserScramCredentials
        AlterUserScramCredentials(deletions=[(name, SCRAM_CODES[mechanism])])
    )
    for user, code, message, _ in response.results:
        if code == RESOURCE_NOT_FOUND:
            return False
        _raise_for(code, message, f"deleting the SCRAM user {user}")
    return True


async def describe_scram_users(
    admin: AIOKafkaAdminClient, names: list[str] | None = None
) -> dict[str, dict[str, int]]:
    """User → {mechanism: iterations} for `names` (None: every user); users without any
    credential are left out."""
    response = await admin._send_request(  # noqa: SLF001 - aiokafka has no DescribeUserScramCredentials
        DescribeUserScramCredentials(names)
    )
    _raise_for(response.error_code, response.error_message, "describing SCRAM users")
    by_code = {v: k for k, v in SCRAM_CODES.items()}
    out: dict[str, dict[str, int]] = {}
    for user, code, message, infos, _ in response.results:
        if code == RESOURCE_NOT_FOUND:
            continue
        _raise_for(code, message, f"describing the SCRAM user {user}")
        out[user] = {by_code.get(mech, str(mech)): iterations for mech, iterations, _ in infos}
    return out


# --- ACLs ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AclEntry:
    """An ACL as the cluster lists it: whose, and what it allows."""

    principal: str
    acl: Acl
    host: str = "*"


def _binding(principal: str, acl: Acl) -> AclBinding:
    return (
        _RESOURCE[acl.resource_type],
        acl.resource_name,
        _PATTERN[acl.pattern_type],
        f"User:{principal}",
        "*",
        _OPERATION[acl.operation],
        _ALLOW,
    )


async def create_acls(admin: AIOKafkaAdminClient, principal: str, acls: Iterable[Acl]) -> int:
    """ALLOW each of `acls` to `principal` from any host (creating an existing ACL is a no-op)."""
    bindings = [_binding(principal, acl) for acl in acls]
    if not bindings:
        return 0
    response = await admin._send_request(CreateAcls(bindings))  # noqa: SLF001 - one request for all
    for (code, message), binding in zip(response.creation_responses, bindings, strict=True):
        _raise_for(code, message, f"creating the ACL {binding} for {principal}")
    return len(bindings)


async def delete_acls(admin: AIOKafkaAdminClient, principal: str) -> int:
    """Delete every ACL of `principal`; how many there were."""
    any_filter = (_RESOURCE["ANY"], None, _PATTERN["ANY"], f"User:{principal}", None, 1, _ANY_PERMISSION)
    response = await admin._send_request(DeleteAcls([any_filter]))  # noqa: SLF001 - aiokafka builds one
    deleted = 0
    for code, message, matching in response.filter_responses:
        _raise_for(code, message, f"deleting the ACLs of {principal}")
        deleted += len(matching)
    return deleted


async def describe_acls(admin: AIOKafkaAdminClient, principal: str | None = None) -> list[AclEntry]:
    """Every ALLOW/DENY ACL on topics and groups of `principal` (None: of everyone)."""
    acl_filter = (
        _RESOURCE["ANY"],
        None,
        _PATTERN["ANY"],
        None if principal is None else f"User:{principal}",
        None,
        _OPERATION["ANY"],
        _ANY_PERMISSION,
    )
    response = await admin._send_request(DescribeAcls(acl_filter))  # noqa: SLF001 - aiokafka builds v0/v1
    _raise_for(response.error_code, response.error_message, "describing ACLs")
    out = []
    for rtype, rname, ptype, acls in response.resources:
        for who, host, op, _perm in acls:
            resource = _NAMES["resource"].get(rtype)
            if resource not in ("TOPIC", "GROUP"):
                continue
            acl = Acl(resource, rname, _NAMES["pattern"][ptype], _NAMES["operation"][op])  # type: ignore[arg-type]
            out.append(AclEntry(who.removeprefix("User:"), acl, host))
    return out


# --- tenants ------------------------------------------------------------------------------------
@dataclass
class TenantCredentials:
    """What a tenant's client needs; `password` is shown once and stored only 0600."""

    tenant: str
    principal: str
    password: str
    mechanism: str = SCRAM_MECHANISM


@dataclass
class TenantInfo:
    tenant: str
    principal: str
    topics: list[str] = field(default_factory=list)
    has_user: bool = False
    acls: int = 0
    password_stored: bool = False


async def _admin(settings: Settings) -> AIOKafkaAdminClient:
    admin = make_admin(settings)
    await admin.start()
    return admin


async def _set_credentials(settings: Settings, tenant: str) -> TenantCredentials:
    principal = tenant_principal(tenant, settings.topic_prefix)
    password = generate_password()
    admin = await _admin(settings)
    try:
        await upsert_scram_user(admin, principal, password)
        await create_acls(admin, principal, tenant_acls(tenant, settings.topic_prefix))
    finally:
        await admin.close()
    write_secret(tenant_password_path(settings, tenant), password)
    return TenantCredentials(tenant, principal, password)


async def add_tenant(settings: Settings, tenant: str) -> TenantCredentials | None:
    """Declare `tenant`'s topics; on a secured cluster create its principal (a new password,
    replacing any earlier one) and ACLs. None when the cluster takes no credentials."""
    check_tenant(tenant)
    await declare_topics(settings, tenants=[tenant])
    if not is_secured(settings):
        return None
    return await _set_credentials(settings, tenant)


async def ensure_tenant(settings: Settings, tenant: str, *, declare: bool = True) -> TenantCredentials | None:
    """`add_tenant` unless the tenant already has its principal and a stored password (what
    `ragbus up` runs for the `default` tenant, so `ragbus chat` works out of the box): its topics
    are declared either way; credentials only when new (None otherwise)."""
    check_tenant(tenant)
    if declare:
        await declare_topics(settings, tenants=[tenant])
    if not is_secured(settings):
        return None
    principal = tenant_principal(tenant, settings.topic_prefix)
    admin = await _admin(settings)
    try:
        exists = principal in await describe_scram_users(admin, [principal])
    finally:
        await admin.close()
    if exists and read_secret(tenant_password_path(settings, tenant)) is not None:
        return None
    return await _set_credentials(settings, tenant)


async def rotate_tenant(settings: Settings, tenant: str) -> TenantCredentials:
    """A new password for an existing tenant; the old one fails from the next login on."""
    check_tenant(tenant)
    if not is_secured(settings):
        raise SecurityError(
            "the cluster takes no credentials (insecure mode): there is no password to rotate"
        )
    principal = tenant_principal(tenant, settings.topic_prefix)
    admin = await _admin(settings)
    try:
        if principal not in await describe_scram_users(admin, [principal]):
            raise SecurityError(
                f"tenant {tenant} has no SCRAM user {principal}; create it with `ragbus tenants add`"
            )
        password = generate_password()
        await upsert_scram_user(admin, principal, password)
    finally:
        await admin.close()
    write_secret(tenant_password_path(settings, tenant), password)
    return TenantCredentials(tenant, principal, password)


@dataclass
class Removed:
    acls: int = 0
    user: bool = False
    topics: list[str] = field(default_factory=list)


async def remove_tenant(settings: Settings, tenant: str, *, delete_topics: bool = False) -> Removed:
    """Delete the tenant's ACLs, SCRAM user and stored password; its topics (and their records)
    only with `delete_topics`."""
    check_tenant(tenant)
    principal = tenant_principal(tenant, settings.topic_prefix)
    removed = Removed()
    admin = await _admin(settings)
    try:
        if is_secured(settings):
            removed.acls = await delete_acls(admin, principal)
            removed.user = await delete_scram_user(admin, principal)
        if delete_topics:
            present = set(await admin.list_topics())
            names = [
                n
                for n in declared_names(settings.topic_prefix, [tenant])
                if tenant_of(n, settings.topic_prefix) == tenant
            ]
            removed.topics = [n for n in names if n in present]
            if removed.topics:
                await admin.delete_topics(removed.topics)
    finally:
        await admin.close()
    remove_secret(tenant_password_path(settings, tenant))
    return removed


async def list_tenants(settings: Settings) -> list[TenantInfo]:
    """Every tenant of this prefix that has topics, a SCRAM user or ACLs on the cluster."""
    prefix = settings.topic_prefix
    user_prefix = f"{prefix}.{TENANT_SEGMENT}."
    found: dict[str, TenantInfo] = {}

    def info(tenant: str) -> TenantInfo:
        if tenant not in found:
            found[tenant] = TenantInfo(tenant, tenant_principal(tenant, prefix))
        return found[tenant]

    admin = await _admin(settings)
    try:
        for topic in sorted(await admin.list_topics()):
            tenant = tenant_of(topic, prefix)
            if tenant is not None:
                info(tenant).topics.append(topic)
        if is_secured(settings):
            for user in await describe_scram_users(admin):
                tenant = user.removeprefix(user_prefix)
                if user.startswith(user_prefix) and _valid(tenant):
                    info(tenant).has_user = True
            for entry in await describe_acls(admin):
                tenant = entry.principal.removeprefix(user_prefix)
                if entry.principal.startswith(user_prefix) and _valid(tenant):
                    info(tenant).acls += 1
    finally:
        await admin.close()
    for tenant, each in found.items():
        each.password_stored = tenant_password_path(settings, tenant).exists()
    return [found[t] for t in sorted(found)]


def _valid(tenant: str) -> bool:
    try:
        check_tenant(tenant)
    except ValueError:
        return False
    return True


def client_properties(settings: Settings, creds: TenantCredentials) -> dict[str, str]:
    """Java-client properties for the tenant's principal (also what kcat takes with -X)."""
    effective = client_settings(settings)
    tls = effective.kafka_security_protocol.endswith("SSL")
    props = {
        "bootstrap.servers": settings.bootstrap,
        "security.protocol": "SASL_SSL" if tls else "SASL_PLAINTEXT",
        "sasl.mechanism": creds.mechanism,
        "sasl.jaas.config": "org.apache.kafka.common.security.scram.ScramLoginModule required "
        f'username="{creds.principal}" password="{creds.password}";',
    }
    if tls and effective.kafka_ssl_cafile is not None:
        # The CA clients must trust (the local broker's self-signed one with kafka_local_tls).
        props |= {"ssl.truststore.type": "PEM", "ssl.truststore.location": str(effective.kafka_ssl_cafile)}
    return props
