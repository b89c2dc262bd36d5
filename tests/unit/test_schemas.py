import json
from datetime import timedelta

import jsonschema
import pytest
from pydantic import ValidationError

from infra.smoke import sample_event
from schemas import (
    TOPICS,
    ChatRequest,
    ChatResponse,
    DocumentIngest,
    ErrorCode,
    ErrorInfo,
    utcnow,
)
from schemas.export import JSON_DIR, schema_documents
from schemas.headers import EVENT_MODELS


@pytest.mark.parametrize("event_type", sorted(EVENT_MODELS))
def test_every_event_round_trips_through_json(event_type: str) -> None:
    model = EVENT_MODELS[event_type]
    event = sample_event(model, "req-1")
    back = model.model_validate_json(event.model_dump_json())
    assert back == event
    assert back.model_dump() == event.model_dump()
    assert back.schema_version == 1 and back.event_id and back.request_id == "req-1"


@pytest.mark.parametrize("event_type", sorted(EVENT_MODELS))
def test_every_event_validates_against_its_committed_json_schema(event_type: str) -> None:
    schema = json.loads((JSON_DIR / f"{event_type}.json").read_text())
    event = sample_event(EVENT_MODELS[event_type], "req-1")
    jsonschema.validate(json.loads(event.model_dump_json()), schema)


def test_committed_json_schemas_match_the_models() -> None:
    expected = schema_documents()
    on_disk = {p.name: p.read_text() for p in JSON_DIR.glob("*.json")}
    assert set(on_disk) == set(expected), "run `ragbus schemas export` and commit schemas/json"
    for name, text in expected.items():
        assert on_disk[name] == text, f"{name} drifted from the models: run `ragbus schemas export`"


def test_topic_index_lists_every_declared_topic() -> None:
    index = json.loads(schema_documents()["topics.json"])
    assert [t["topic"] for t in index["topics"]] == [
        t.name(tenant="x").replace(".t.x.", ".t.{tenant}.") if t.per_tenant else t.name() for t in TOPICS
    ]


def test_envelope_fields_are_required_and_checked() -> None:
    with pytest.raises(ValidationError, match="tenant_id"):
        ChatRequest(question="q")  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="tenant_id"):
        ChatRequest(question="q", tenant_id="has space")
    with pytest.raises(ValidationError, match="lane"):
        ChatRequest(question="q", tenant_id="t", lane="express")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="extra"):
        ChatRequest.model_validate({"question": "q", "tenant_id": "t", "surprise": 1})


def test_deadline_and_envelope_copy() -> None:
    req = ChatRequest(question="q", tenant_id="t", user_id="u", deadline=utcnow() - timedelta(seconds=1))
    assert req.expired()
    resp = ChatResponse(**req.envelope(), error=ErrorInfo(code=ErrorCode.DEADLINE_EXCEEDED, message="late"))
    assert (resp.request_id, resp.tenant_id, resp.user_id, resp.lane) == (req.request_id, "t", "u", "chat")
    assert resp.event_id != req.event_id
    assert not resp.ok


def test_document_ingest_needs_content_for_upserts() -> None:
    with pytest.raises(ValidationError, match="needs `text` or `data`"):
        DocumentIngest(doc_id="d", tenant_id="t")
    with pytest.raises(ValidationError, match="PDF"):
        DocumentIngest(doc_id="d", tenant_id="t", content_type="application/pdf", text="x")
    assert DocumentIngest(doc_id="d", tenant_id="t", op="delete").op == "delete"
    pdf = DocumentIngest(doc_id="d", tenant_id="t", content_type="application/pdf", data=b"%PDF-1.4")
    wire = json.loads(pdf.model_dump_json())
    assert wire["data"] == "JVBERi0xLjQ="  # base64 on the wire
    assert DocumentIngest.model_validate_json(pdf.model_dump_json()).data == b"%PDF-1.4"
