"""Kafka requests aiokafka 0.14 does not speak, defined once, sent through its admin client.

- IncrementalAlterConfigs (API key 44, KIP-339): aiokafka has only the legacy AlterConfigs, which
  replaces a topic's whole config set (anything not sent reverts to the broker default);
  `ragbus topics declare` must change only the keys it declares (`infra.kafka.topics`).
- DescribeQuorum (API key 55, KIP-595): in KRaft the ordinary metadata names a random broker as
  controller; `ragbus status` shows the active one (`infra.kafka.inspect`).

Both go through `AIOKafkaAdminClient._send_request`, the one private call of the project's Kafka
code; aiokafka is pinned, and the tests that declare topics and read the status exercise both.
"""

from __future__ import annotations

from typing import Any

from aiokafka.admin.config_resource import ConfigResourceType
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.types import (
    Array,
    Boolean,
    CompactArray,
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
