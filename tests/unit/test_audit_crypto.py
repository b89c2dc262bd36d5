"""Field-level AES-256-GCM of audit payloads: what is sealed, binding, rotation, key parsing."""

from __future__ import annotations

import base64
from pathlib import Path

import orjson
import pytest
from pydantic import SecretStr

from infra.kafka.codec import encode
from infra.settings import Settings
from schemas import (
    ChatRequest,
    ChatResponse,
    DeadLetter,
    DocumentIngest,
    EnrichedRequest,
    RetrievedChunk,
    TokenChunk,
)
from schemas.topics import spec
from sinks.audit.crypto import ENC, KeyConfigError, Keyring, generate_key, seal, unseal
from sinks.audit.rows import COL, RowMapper
from tests.unit.test_audit_rows import Rec

SECRET = "the launch code is pineapple-42"
K1 = generate_key("k1")
K2 = generate_key("k2")


def sealed_events() -> list[tuple[str, object]]:
    req = ChatRequest(
        question=SECRET,
        system_prompt=SECRET,
        history=[{"role": "user", "content": SECRET}],
        tenant_id="acme",
        request_id="r1",
    )
    return [
        ("chat.requests", req),
        (
            "chat.enriched",
            EnrichedRequest(
                request=req,
                chunks=[RetrievedChunk(chunk_id="c1", doc_id="d1", text=SECRET, score=0.5)],
                **req.envelope(),
            ),
        ),
        ("chat.responses", ChatResponse(answer=SECRET, **req.envelope())),
        ("chat.tokens", TokenChunk(index=0, text=SECRET, **req.envelope())),
        ("docs.ingest", DocumentIngest(doc_id="d1", text=SECRET, **req.envelope())),
        (
            "chat.requests.dlq",
            DeadLetter(
                source_topic="x",
                source_partition=0,
                source_offset=1,
                original_value=SECRET.encode(),
                error_class="schema_validation",
                error_message="bad",
                stage="s",
                **req.envelope(),
            ),
        ),
    ]


@pytest.mark.parametrize(("topic", "event"), sealed_events(), ids=lambda x: x if isinstance(x, str) else "")
def test_sensitive_fields_are_sealed_and_come_back(topic: str, event: object) -> None:
    keyring = Keyring.parse(K1)
    topic = spec(topic).name("ragbus", "acme" if spec(topic).per_tenant else None)
    r = Rec(topic, encode(event).value, offset=3)  # type: ignore[arg-type]
    row = RowMapper("ragbus", keyring).row(r)
    stored = row[COL["request_payload"]]
    assert SECRET not in stored and base64.b64encode(SECRET.encode()).decode() not in stored
    assert row[COL["key_id"]] == "k1" and row[COL["tenant_id"]] == "acme" and row[COL["request_id"]] == "r1"
    plain, problems = unseal(orjson.loads(stored), "k1", keyring, f"{topic}/0/3")
    assert problems == []
    assert plain == orjson.loads(encode(event).value)  # type: ignore[arg-type]


def test_raw_bytes_are_sealed_too() -> None:
    keyring = Keyring.parse(K1)
    row = RowMapper("ragbus", keyring).row(Rec("ragbus.chat.requests", f"not json: {SECRET}".encode()))
    assert SECRET not in row[COL["request_payload"]] and row[COL["key_id"]] == "k1"
    plain, _ = unseal(orjson.loads(row[COL["request_payload"]]), "k1", keyring, "ragbus.chat.requests/0/7")
    assert base64.b64decode(plain["raw_b64"]) == f"not json: {SECRET}".encode()


def test_nothing_to_seal_leaves_the_row_plain() -> None:
    row = RowMapper("ragbus", Keyring.parse(K1)).row(Rec("ragbus.other", b'{"a": 1}'))
    assert row[COL["key_id"]] is None and row[COL["request_payload"]] == '{"a": 1}'


def test_a_ciphertext_only_opens_in_its_own_row_and_field() -> None:
    keyring = Keyring.parse(K1)
    obj = {"question": SECRET, "history": []}
    assert seal(obj, "chat.request", keyring, "t/0/1")
    _, problems = unseal(obj, "k1", keyring, "t/0/2")
    assert problems and "does not verify" in problems[0]
    swapped = {"question": obj["history"], "history": obj["question"]}
    _, problems = unseal(swapped, "k1", keyring, "t/0/1")
    assert len(problems) == 2


def test_rotation_old_rows_still_decrypt() -> None:
    old = Keyring.parse(K1)
    obj = {"answer": SECRET}
    seal(obj, "chat.response", old, "t/0/1")
    rotated = Keyring.parse(f"{K2},{K1}")
    assert rotated.primary == "k2"
    assert unseal(obj, "k1", rotated, "t/0/1") == ({"answer": SECRET}, [])
    kept, problems = unseal(obj, "k1", Keyring.parse(K2), "t/0/1")
    assert kept["answer"][ENC] and "not configured" in problems[0]
    kept, problems = unseal(obj, "k1", None, "t/0/1")
    assert kept == obj and "not configured" in problems[0]


def test_key_parsing() -> None:
    ring = Keyring.parse(f"# rotated 2026-11\n{K2}\n{K1}, ")
    assert list(ring.keys) == ["k2", "k1"] and all(len(k) == 32 for k in ring.keys.values())
    short = base64.b64encode(b"x" * 16).decode()
    with pytest.raises(KeyConfigError, match="32"):
        Keyring.parse(f"k:{short}")
    with pytest.raises(KeyConfigError, match="base64"):
        Keyring.parse("k:***")
    with pytest.raises(KeyConfigError, match="pairs"):
        Keyring.parse(base64.b64encode(b"x" * 32).decode())
    with pytest.raises(KeyConfigError) as err:
        Keyring.parse(f"k:{short}")
    assert short not in str(err.value)


def test_keys_from_settings(tmp_path: Path) -> None:
    base = Settings(_env_file=None)  # type: ignore[call-arg]
    assert Keyring.from_settings(base) is None
    key_file = tmp_path / "audit.keys"
    key_file.write_text(f"{K1}\n")
    from_file = Keyring.from_settings(base.model_copy(update={"audit_key_file": key_file}))
    assert from_file is not None and from_file.primary == "k1"
    both = base.model_copy(update={"audit_key_file": key_file, "audit_encryption_keys": SecretStr(K2)})
    ring = Keyring.from_settings(both)
    assert ring is not None and list(ring.keys) == ["k2", "k1"]
    with pytest.raises(KeyConfigError, match="cannot read"):
        Keyring.from_settings(base.model_copy(update={"audit_key_file": tmp_path / "missing"}))
