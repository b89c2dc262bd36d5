"""Kafka requests aiokafka 0.14 does not speak, defined once, sent through its admin client.

- IncrementalAlterConfigs (API key 44, KIP-339): aiokafka has only the legacy AlterConfigs, which
  replaces a topic's whole config set (anything not sent reverts to the broker default);
  `ragbus topics declare` must change only the keys it declares (`infra.kafka.topics`).
- DescribeQuorum (API key 55, KIP-595): in KRaft the ordinary metadata names a random broker as
  controller; `ragbus status` shows the active one (`infra.kafka.inspect`).
- AlterUserScramCredentials / DescribeUserScramCredentials (API keys 51 / 50, KIP-554): SCRAM
  users of `ragbus tenants`, made through the Admin API rather than a broker-side tool.
- CreateAcls / DescribeAcls / DeleteAcls (30 / 29 / 31) with many bindings per request: aiokafka
  has the version-1 wire structs but its request builders carry one binding each.

All go through `AIOKafkaAdminClient._send_request`, the one private call of the project's Kafka
code; aiokafka is pinned, and the tests that declare topics and read the status exercise both.
"""

from __future__ import annotations

from typing import Any

from aiokafka.admin.config_resource import ConfigResourceType
from aiokafka.protocol.admin import CreateAclsRequest_v1, DeleteAclsRequest_v1, DescribeAclsRequest_v1
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.types import (
    Array,
    Boolean,
    CompactArray,
    CompactBytes,
    CompactString,
    Int8,
    Int16,
    Int32,
    Int64,
    Schema,
    String,
    TaggedFields,
)

# aiokafka 0.14 speaks only the legacy AlterConfigs, which replaces a topic's whole config set
# (anything not sent reverts to the broker default). IncrementalAlterConfigs (API key 44, Kafka
# 2.3+) changes just the named keys; version 0 (not flexible) is enough for SET operations.
_SET = 0  # AlterConfigOp.OpType.SET


class _IncrementalAlterConfigsResponseV0(Response):
    API_KEY = 44
    API_VERSION = 0
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        (
            "responses",
            Array(
                ("error_code", Int16),
                ("error_message", String("utf-8")),
                ("resource_type", Int8),
                ("resource_name", String("utf-8")),
            ),
        ),
    )


class _IncrementalAlterConfigsRequestV0(RequestStruct):
    API_KEY = 44
    API_VERSION = 0
    RESPONSE_TYPE = _IncrementalAlterConfigsResponseV0
    SCHEMA = Schema(
        (
            "resources",
            Array(
                ("resource_type", Int8),
                ("resource_name", String("utf-8")),
                (
                    "configs",
                    Array(("name", String("utf-8")), ("config_operation", Int8), ("value", String("utf-8"))),
                ),
            ),
        ),
        ("validate_only", Boolean),
    )


class IncrementalAlterConfigs(Request[_IncrementalAlterConfigsRequestV0]):
    """SET `configs` (topic → {key: value}) on topics, leaving their other configs alone."""

    API_KEY = 44

    def __init__(self, configs: dict[str, dict[str, str]], validate_only: bool = False) -> None:
        self._configs = configs
        self._validate_only = validate_only

    def build(self, request_struct_class: type[_IncrementalAlterConfigsRequestV0]) -> Any:
        resources = [
            (int(ConfigResourceType.TOPIC), topic, [(key, _SET, value) for key, value in cfg.items()])
            for topic, cfg in self._configs.items()
        ]
        return request_struct_class(resources, self._validate_only)


# DescribeQuorum (API key 55, KIP-595), version 0; flexible from version 0 on.
_VOTERS = CompactArray(("replica_id", Int32), ("log_end_offset", Int64), ("tags", TaggedFields))


class _DescribeQuorumResponseV0(Response):
    API_KEY = 55
    API_VERSION = 0
    SCHEMA = Schema(
        ("error_code", Int16),
        (
            "topics",
            CompactArray(
                ("topic_name", CompactString("utf-8")),
                (
                    "partitions",
                    CompactArray(
                        ("partition_index", Int32),
                        ("error_code", Int16),
                        ("leader_id", Int32),
                        ("leader_epoch", Int32),
                        ("high_watermark", Int64),
                        ("current_voters", _VOTERS),
                        ("observers", _VOTERS),
                        ("tags", TaggedFields),
                    ),
                ),
                ("tags", TaggedFields),
            ),
        ),
        ("tags", TaggedFields),
    )


class _DescribeQuorumRequestV0(RequestStruct):
    FLEXIBLE_VERSION = True
    API_KEY = 55
    API_VERSION = 0
    RESPONSE_TYPE = _DescribeQuorumResponseV0
    SCHEMA = Schema(
        (
            "topics",
            CompactArray(
                ("topic_name", CompactString("utf-8")),
                ("partitions", CompactArray(("partition_index", Int32), ("tags", TaggedFields))),
                ("tags", TaggedFields),
            ),
        ),
        ("tags", TaggedFields),
    )


class DescribeQuorum(Request[_DescribeQuorumRequestV0]):
    """The state of the metadata log's quorum (`__cluster_metadata`, partition 0)."""

    API_KEY = 55

    def build(self, request_struct_class: type[_DescribeQuorumRequestV0]) -> Any:
        return request_struct_class([("__cluster_metadata", [(0, {})], {})], {})


# AlterUserScramCredentials (API key 51, KIP-554), version 0; flexible from version 0 on. The
# client sends the salt and the salted password (PBKDF2), never the password itself.
class _AlterUserScramCredentialsResponseV0(Response):
    API_KEY = 51
    API_VERSION = 0
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        (
            "results",
            CompactArray(
                ("user", CompactString("utf-8")),
                ("error_code", Int16),
                ("error_message", CompactString("utf-8")),
                ("tags", TaggedFields),
            ),
        ),
        ("tags", TaggedFields),
    )


class _AlterUserScramCredentialsRequestV0(RequestStruct):
    FLEXIBLE_VERSION = True
    API_KEY = 51
    API_VERSION = 0
    RESPONSE_TYPE = _AlterUserScramCredentialsResponseV0
    SCHEMA = Schema(
        (
            "deletions",
            CompactArray(("name", CompactString("utf-8")), ("mechanism", Int8), ("tags", TaggedFields)),
        ),
        (
            "upsertions",
            CompactArray(
                ("name", CompactString("utf-8")),
                ("mechanism", Int8),
                ("iterations", Int32),
                ("salt", CompactBytes),
                ("salted_password", CompactBytes),
                ("tags", TaggedFields),
            ),
        ),
        ("tags", TaggedFields),
    )


class AlterUserScramCredentials(Request[_AlterUserScramCredentialsRequestV0]):
    """Upsert (name, mechanism, iterations, salt, salted password) and delete (name, mechanism)
    SCRAM credentials; mechanism 1 is SCRAM-SHA-256, 2 SCRAM-SHA-512."""

    API_KEY = 51

    def __init__(
        self,
        upsertions: list[tuple[str, int, int, bytes, bytes]] = (),  # type: ignore[assignment]
        deletions: list[tuple[str, int]] = (),  # type: ignore[assignment]
    ) -> None:
        self._upsertions = list(upsertions)
        self._deletions = list(deletions)

    def build(self, request_struct_class: type[_AlterUserScramCredentialsRequestV0]) -> Any:
        return request_struct_class(
            [(name, mech, {}) for name, mech in self._deletions],
            [(*each, {}) for each in self._upsertions],
            {},
        )


class _DescribeUserScramCredentialsResponseV0(Response):
    API_KEY = 50
    API_VERSION = 0
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        ("error_code", Int16),
        ("error_message", CompactString("utf-8")),
        (
            "results",
            CompactArray(
                ("user", CompactString("utf-8")),
                ("error_code", Int16),
                ("error_message", CompactString("utf-8")),
                (
                    "credential_infos",
                    CompactArray(("mechanism", Int8), ("iterations", Int32), ("tags", TaggedFields)),
                ),
                ("tags", TaggedFields),
            ),
        ),
        ("tags", TaggedFields),
    )


class _DescribeUserScramCredentialsRequestV0(RequestStruct):
    FLEXIBLE_VERSION = True
    API_KEY = 50
    API_VERSION = 0
    RESPONSE_TYPE = _DescribeUserScramCredentialsResponseV0
    SCHEMA = Schema(
        ("users", CompactArray(("name", CompactString("utf-8")), ("tags", TaggedFields))),
        ("tags", TaggedFields),
    )


class DescribeUserScramCredentials(Request[_DescribeUserScramCredentialsRequestV0]):
    """The mechanisms and iterations (never the keys) of the named SCRAM users; None: all users."""

    API_KEY = 50

    def __init__(self, users: list[str] | None = None) -> None:
        self._users = users

    def build(self, request_struct_class: type[_DescribeUserScramCredentialsRequestV0]) -> Any:
        users = None if self._users is None else [(u, {}) for u in self._users]
        return request_struct_class(users, {})


#: One ACL binding on the wire (version 1): resource type, name, pattern type, principal, host,
#: operation, permission type — the codes of `infra.kafka.security`.
AclBinding = tuple[int, str, int, str, str, int, int]


class CreateAcls(Request[CreateAclsRequest_v1]):
    API_KEY = 30

    def __init__(self, bindings: list[AclBinding]) -> None:
        self._bindings = bindings

    def build(self, request_struct_class: type[CreateAclsRequest_v1]) -> Any:
        return request_struct_class(self._bindings)


class DeleteAcls(Request[DeleteAclsRequest_v1]):
    """Delete the ACLs matching each filter (same fields as a binding; ANY codes match all)."""

    API_KEY = 31

    def __init__(self, filters: list[AclBinding]) -> None:
        self._filters = filters

    def build(self, request_struct_class: type[DeleteAclsRequest_v1]) -> Any:
        return request_struct_class(self._filters)


class DescribeAcls(Request[DescribeAclsRequest_v1]):
    """The ACLs matching one filter (resource name and principal may be None: any)."""

    API_KEY = 29

    def __init__(self, acl_filter: tuple[int, str | None, int, str | None, str | None, int, int]) -> None:
        self._filter = acl_filter

    def build(self, request_struct_class: type[DescribeAclsRequest_v1]) -> Any:
        return request_struct_class(*self._filter)
