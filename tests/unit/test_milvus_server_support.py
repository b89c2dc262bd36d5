"""The pieces of the Milvus server support that need no server: filling the server package's config
template, and reading which features a server has from its version."""

from __future__ import annotations

import pytest

from infra.milvus_server import render_config
from infra.procs import ServiceError
from processors.store import BM25_SINCE, INVERTED_SINCE, UPSERT_SINCE, server_at_least


def test_template_placeholders_take_values_or_their_defaults() -> None:
    template = (
        "endpoints: localhost:{{ etcd_port(int): 2379 }}\n"
        "  level: {{ etcd_log_level: info }} # comment\n"
        "  dir: {{ etcd_data_dir }}\n"
        "  auth: {{ authorization_enabled(bool): false }}\n"
    )
    out = render_config(
        template, {"etcd_port": 41000, "etcd_data_dir": "/d/etcd", "authorization_enabled": True}
    )
    assert out == "endpoints: localhost:41000\n  level: info # comment\n  dir: /d/etcd\n  auth: true\n"


def test_a_placeholder_without_value_or_default_is_an_error() -> None:
    with pytest.raises(ServiceError, match="etcd_data_dir"):
        render_config("dir: {{ etcd_data_dir }}", {})


@pytest.mark.parametrize(
    ("version", "bm25", "inverted"),
    [
        ("v2.3.5-lite", False, False),  # the `milvus` package's standalone server
        ("v2.4.15", False, True),
        ("v2.5.4", True, True),
        ("2.6.0", True, True),
        ("milvus_lite-3.2.2", True, True),  # Milvus Lite, its own numbering
        ("unknown version", True, True),
    ],
)
def test_server_features_follow_its_version(version: str, bm25: bool, inverted: bool) -> None:
    assert server_at_least(version, BM25_SINCE) is bm25
    assert server_at_least(version, INVERTED_SINCE) is inverted
    assert server_at_least(version, UPSERT_SINCE) is inverted
