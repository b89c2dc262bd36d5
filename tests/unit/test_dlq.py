"""The dead-letter path never fails, whatever the record holds, and what it writes fits the DLQ."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from infra.kafka.codec import DecodeError, decode
from infra.kafka.dlq import (
    TENANT_MISMATCH,
    dead_letter,
    encode_dead_letter,
    rejection_response,
    tenant_mismatch,
)
from schemas import ChatResponse, DeadLetter, Topics, limits, spec_for_topic
from schemas.topics import dlq_name

PREFIX = "ragbus"


@dataclass
class Record:
    topic: str = "ragbus.t.demo.chat.requests"
    partition: int = 0
    offset: int = 7
    timestamp: int = 1_700_000_000_000
    key: bytes | None = None
    value: bytes | None = None
    headers: Any = field(default_factory=list)


def _fits_dlq(topic: str, encoded_value: bytes) -> bool:
    spec = spec_for_topic(dlq_name(topic), PREFIX)
    assert spec is not None
    return len(encoded_value) <= spec.max_message_bytes


def test_an_over_long_request_id_is_cut_not_refused() -> None:
    # Issue 9: this record made every restart of the processors die in DeadLetter validation.
    value = json.dumps({"request_id": "r" * 129, "tenant_id": "demo", "question": "hi"}).encode()
    record = Record(value=value)
    letter = dead_letter(record, DecodeError("schema_validation", "request_id too long"), stage="s")
    assert len(letter.request_id) == limits.REQUEST_ID_MAX
    assert letter.request_id.endswith(limits.CUT_MARK)
    assert letter.original_value == value and not letter.original_truncated
    # A reply to a cut id would reach nobody: none is sent.
    assert rejection_response(record, DecodeError("x", "y"), topics=Topics(PREFIX)) is None


def test_a_value_larger_than_the_dlq_holds_is_cut_and_says_so() -> None:
    spec = spec_for_topic("ragbus.t.demo.chat.requests", PREFIX)
    assert spec is not None
    value = b"x" * (spec.max_message_bytes + 10)
    record = Record(value=value, key=b"k" * 100_000, headers=[("h", b"v" * 100_000)] * 500)
    topic, enc = encode_dead_letter(record, DecodeError("too_large", "big"), stage="s")
    assert topic == "ragbus.chat.requests.dlq"
    letter = DeadLetter.model_validate_json(enc.value)
    assert letter.original_truncated
    assert letter.original_size == len(value)
    assert len(letter.original_value or b"") == spec.max_message_bytes
    assert len(letter.original_headers) == limits.DEAD_LETTER_HEADERS_MAX
    assert _fits_dlq(record.topic, enc.value)


def test_an_exception_naming_its_class_is_dead_lettered_with_it() -> None:
    class ParseTimeout(RuntimeError):
        error_class = "parse_timeout"

    letter = dead_letter(Record(value=b"{}"), ParseTimeout("30 s"), stage="s")
    assert letter.error_class == "parse_timeout"
    assert letter.error_message == "ParseTimeout: 30 s"
    assert dead_letter(Record(value=b"{}"), KeyError("k"), stage="s").error_class == "processing"


def test_a_record_that_cannot_be_echoed_still_gets_a_dead_letter() -> None:
    weird = Record(value=b"{}", headers=[("only-a-key",)])  # not (key, value) pairs
    letter = dead_letter(weird, ValueError("boom"), stage="s")
    assert letter.source_offset == 7 and letter.original_truncated
    assert letter.error_class == "processing"


def test_a_reply_goes_to_a_requester_named_within_the_contract() -> None:
    value = json.dumps({"request_id": "req-1", "tenant_id": "acme", "lane": "bulk", "custom_id": "c" * 999})
    out = rejection_response(
        Record(topic="ragbus.t.acme.bulk.requests", value=value.encode()),
        DecodeError("not_json", "x"),
        topics=Topics(PREFIX),
    )
    assert out is not None
    topic, enc = out
    assert topic == "ragbus.t.acme.bulk.responses"
    reply = ChatResponse.model_validate_json(enc.value)
    assert reply.request_id == "req-1" and reply.error is not None and reply.tenant_id == "acme"
    assert reply.custom_id is not None and len(reply.custom_id) == limits.CUSTOM_ID_MAX


def test_a_reply_goes_to_the_tenant_of_the_topic_never_to_the_one_the_payload_names() -> None:
    # acme's principal wrote bytes claiming tenant `victim` and the bulk lane on acme's chat topic:
    # the reply (and the dead letter's tenant) is acme's, on acme's chat responses.
    value = json.dumps({"request_id": "req-2", "tenant_id": "victim", "lane": "bulk"}).encode()
    record = Record(topic="ragbus.t.acme.chat.requests", value=value)
    error = tenant_mismatch(record.topic, "victim", PREFIX)
    assert error is not None and error.error_class == TENANT_MISMATCH
    out = rejection_response(record, error, topics=Topics(PREFIX))
    assert out is not None
    topic, enc = out
    assert topic == "ragbus.t.acme.chat.responses"
    reply = ChatResponse.model_validate_json(enc.value)
    assert reply.tenant_id == "acme" and reply.error is not None and "tenant_mismatch" in reply.error.message
    dlq_topic, letter_enc = encode_dead_letter(record, error, stage="s")
    letter = DeadLetter.model_validate_json(letter_enc.value)
    assert dlq_topic == "ragbus.chat.requests.dlq"
    assert letter.error_class == TENANT_MISMATCH and letter.tenant_id == "acme"


def test_tenant_mismatch_only_when_the_payload_names_another_tenant() -> None:
    assert tenant_mismatch("ragbus.t.acme.docs.ingest", "acme", PREFIX) is None
    assert tenant_mismatch("ragbus.t.acme.docs.ingest", "acm", PREFIX) is not None
    assert tenant_mismatch("ragbus.chat.enriched", "anyone", PREFIX) is None  # internal: not checked
    assert tenant_mismatch("other.t.acme.chat.requests", "x", PREFIX) is None  # not this deployment's


def test_every_error_class_is_in_the_readme_table() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Dead letters", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `([a-z_]+)` \|", section, re.M))
    assert TENANT_MISMATCH in listed and "processing" in listed


headers = st.lists(
    st.tuples(st.text(max_size=300), st.one_of(st.none(), st.binary(max_size=20_000))), max_size=80
)
values = st.one_of(
    st.none(),
    st.binary(max_size=2000),
    st.dictionaries(
        st.sampled_from(["request_id", "tenant_id", "user_id", "lane", "job_id", "custom_id", "x"]),
        st.one_of(st.text(max_size=600), st.integers(), st.none(), st.lists(st.integers(), max_size=3)),
    ).map(lambda d: json.dumps(d).encode()),
)


@settings(max_examples=300, deadline=None)
@given(
    topic=st.sampled_from(
        [
            "ragbus.t.acme.chat.requests",
            "ragbus.t.acme.docs.ingest",
            "ragbus.chat.requests",
            "ragbus.bulk.enriched",
            "other.topic",
        ]
    ),
    partition=st.integers(0, 2**31 - 1),
    offset=st.integers(0, 2**62),
    timestamp=st.integers(-(2**63), 2**63 - 1),
    key=st.one_of(st.none(), st.binary(max_size=10_000)),
    value=values,
    hdrs=headers,
)
def test_the_dead_letter_path_never_raises(
    topic: str, partition: int, offset: int, timestamp: int, key: bytes | None, value: bytes | None, hdrs: Any
) -> None:
    record = Record(topic, partition, offset, timestamp, key, value, hdrs)
    try:
        decode(value, DeadLetter, max_bytes=1 << 20, headers=hdrs)
    except DecodeError as e:
        error: BaseException = e
    else:
        error = RuntimeError("valid, but its handling failed")
    dlq_topic, enc = encode_dead_letter(record, error, stage="ragbus.processors.retrieval-chat")
    assert dlq_topic == dlq_name(topic)
    DeadLetter.model_validate_json(enc.value)
    assert len(enc.key) <= limits.REQUEST_ID_MAX * 4
    rejection_response(record, error, topics=Topics(PREFIX))  # never raises


def test_the_readme_lists_every_limit_once() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Dead letters", 1)[1].split("\n## ", 1)[0]
    listed = dict(re.findall(r"^\| `([A-Z_]+)` \| `(.+)` \|$", section, re.M))
    source = (Path(limits.__file__)).read_text()
    defined = dict(re.findall(r"^([A-Z_]+(?:_MAX|_PATTERN)) = (.+)$", source, re.M))
    assert {k: v.replace("\\|", "|") for k, v in listed.items()} == defined
