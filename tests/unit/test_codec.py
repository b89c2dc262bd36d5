import json

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from infra.kafka.codec import DecodeError, decode, encode, header, salvage_envelope
from infra.telemetry import extract_context
from schemas import ChatRequest, DocumentIngest
from schemas.headers import EVENT_TYPE_HEADER, SCHEMA_VERSION_HEADER


def good() -> bytes:
    return ChatRequest(question="q", tenant_id="t", request_id="r1").model_dump_json().encode()


@pytest.mark.parametrize(
    ("value", "error_class"),
    [
        (None, "empty"),
        (b"", "empty"),
        (b"x" * 2_000_000, "too_large"),
        (b'{"question": "\xff\xfe"}', "invalid_utf8"),
        (b"not json at all", "not_json"),
        (b"[1, 2, 3]", "not_json"),
        (b'{"question": "q"}', "schema_validation"),
        (
            json.dumps({"question": "q", "tenant_id": "t", "schema_version": 99}).encode(),
            "unsupported_version",
        ),
    ],
)
def test_decode_classifies_bad_bytes(value: bytes | None, error_class: str) -> None:
    with pytest.raises(DecodeError) as info:
        decode(value, ChatRequest, max_bytes=1_000_000)
    assert info.value.error_class == error_class
    assert info.value.message


def test_decode_rejects_a_mislabelled_event() -> None:
    with pytest.raises(DecodeError) as info:
        decode(good(), ChatRequest, max_bytes=10_000, headers=[(EVENT_TYPE_HEADER, b"docs.ingest")])
    assert info.value.error_class == "wrong_event_type"


def test_schema_errors_name_the_field() -> None:
    with pytest.raises(DecodeError, match="tenant_id"):
        decode(b'{"question": "q"}', ChatRequest, max_bytes=10_000)


def test_encode_then_decode() -> None:
    event = DocumentIngest(doc_id="doc-7", tenant_id="t", text="hello")
    enc = encode(event)
    assert enc.key == b"doc-7"
    assert header(enc.headers, EVENT_TYPE_HEADER) == b"docs.ingest"
    assert header(enc.headers, SCHEMA_VERSION_HEADER) == b"1"
    assert decode(enc.value, DocumentIngest, max_bytes=10_000, headers=enc.headers) == event
    assert encode(ChatRequest(question="q", tenant_id="t", request_id="abc")).key == b"abc"


def test_encode_carries_the_current_trace_context() -> None:
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("produce") as span:
        enc = encode(ChatRequest(question="q", tenant_id="t"))
    traceparent = header(enc.headers, "traceparent")
    assert traceparent is not None
    assert f"{span.get_span_context().trace_id:032x}" in traceparent.decode()
    restored = trace.get_current_span(extract_context(enc.headers)).get_span_context()
    assert restored.trace_id == span.get_span_context().trace_id
    assert restored.span_id == span.get_span_context().span_id


def test_salvage_envelope_is_best_effort() -> None:
    assert salvage_envelope(b'{"request_id": "r", "tenant_id": "t", "lane": "bulk", "x": 1}') == {
        "request_id": "r",
        "tenant_id": "t",
        "lane": "bulk",
    }
    assert salvage_envelope(b"\xff\xfe") == {}
    assert salvage_envelope(b"[1]") == {}
    assert salvage_envelope(b'{"request_id": 5}') == {}
