"""Who may do what on the bus: the principals and ACLs that bind a tenant to its topics.

Pure data, the one source of truth for `ragbus tenants` (which creates them through the Kafka
Admin API) and for the Helm chart's `KafkaUser` resources (a test compares the two).

A tenant's principal may write only its own request topics and read only its own reply topics
and consumer groups under its own prefix; internal topics (`*.enriched`, DLQs) have no ACL for
any tenant, so only ragbus's components (super users) reach them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from schemas.topics import DEFAULT_PREFIX, TENANT_READS, TENANT_SEGMENT, TENANT_WRITES, check_tenant, spec

#: The SCRAM user ragbus's own components (processors, workers, audit sink, CLI admin) use; the
#: broker lists it in `super.users`.
COMPONENTS_USER = "ragbus"
#: The SCRAM mechanism the local broker enables and `ragbus tenants` creates credentials for.
SCRAM_MECHANISM = "SCRAM-SHA-512"

Operation = Literal["READ", "WRITE", "DESCRIBE"]
ResourceType = Literal["TOPIC", "GROUP"]
PatternType = Literal["LITERAL", "PREFIXED"]


@dataclass(frozen=True)
class Acl:
    """One ALLOW rule for a principal, from any host."""

    resource_type: ResourceType
    resource_name: str
    pattern_type: PatternType
    operation: Operation


def tenant_principal(tenant: str, prefix: str = DEFAULT_PREFIX) -> str:
    """The SCRAM user name of a tenant: `<prefix>.t.<tenant>`, like its topics' prefix, so two
    deployments sharing a cluster have distinct principals for the same tenant name."""
    return f"{prefix}.{TENANT_SEGMENT}.{check_tenant(tenant)}"


def tenant_group_prefix(tenant: str, prefix: str = DEFAULT_PREFIX) -> str:
    """Consumer groups a tenant may use start with this (e.g. `ragbus.t.acme.billing-sync`)."""
    return tenant_principal(tenant, prefix) + "."


def tenant_acls(tenant: str, prefix: str = DEFAULT_PREFIX) -> list[Acl]:
    """Every ACL a tenant's principal gets; nothing else is allowed to it."""
    acls = [Acl("TOPIC", spec(s).name(prefix, tenant), "LITERAL", "WRITE") for s in TENANT_WRITES]
    acls += [Acl("TOPIC", spec(s).name(prefix, tenant), "LITERAL", "READ") for s in TENANT_READS]
    acls.append(Acl("GROUP", tenant_group_prefix(tenant, prefix), "PREFIXED", "READ"))
    return acls
