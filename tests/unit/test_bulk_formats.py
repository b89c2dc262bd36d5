import json
import uuid
from pathlib import Path

import pytest

from producers.bulk.formats import (
    CUSTOM_ID_MAX,
    BadLine,
    BulkItem,
    answered_ids,
    build_request,
    count_items,
    field_max_length,
    output_line,
    read_items,
    safe_custom_id,
)
from producers.bulk.runner import request_id_for
from producers.bulk.state import JobState, JobStore
from producers.client.conversations import Conversations
from producers.openai.convert import InvalidInput, split_messages
from schemas import ChatRequest, ChatResponse, Citation, ErrorCode, ErrorInfo, Usage


def test_openai_batch_lines(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    lines = [
        {
            "custom_id": "a",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "m",
                "max_tokens": 20,
                "messages": [
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "hello"},
                    {"role": "user", "content": [{"type": "text", "text": "what is ragbus?"}]},
                ],
            },
        },
        {"custom_id": "b", "url": "/v1/embeddings", "body": {"messages": [{"role": "user", "content": "x"}]}},
        "not json",
        {"custom_id": "c", "body": {"messages": [{"role": "assistant", "content": "x"}]}},
    ]
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n\n")
    items = list(read_items(path))
    assert isinstance(items[0], BulkItem) and isinstance(items[3], BulkItem)
    first = _build(items[0])
    assert (first.custom_id, first.question, first.system_prompt, first.model, first.sampling.max_tokens) == (
        "a",
        "what is ragbus?",
        "be brief",
        "m",
        20,
    )
    assert (first.lane, first.job_id, first.deadline, first.stream) == ("bulk", "j", None, False)
    assert [m.role for m in first.history] == ["user", "assistant"]
    assert isinstance(items[1], BadLine) and "unsupported url" in str(items[1])
    assert isinstance(items[2], BadLine) and items[2].custom_id == "line-3"
    with pytest.raises(BadLine, match="last message"):
        _build(items[3])
    assert count_items(path) == 4


def test_text_and_csv(tmp_path: Path) -> None:
    text = tmp_path / "q.txt"
    text.write_text("first?\n\nsecond?\n")
    assert [(i.custom_id, i.question) for i in read_items(text)] == [
        ("line-1", "first?"),
        ("line-3", "second?"),
    ]
    csv_path = tmp_path / "q.csv"
    csv_path.write_text('id,question,other\nx1,"what, exactly?",z\nx2,why?,z\n')
    got = [(i.custom_id, i.question) for i in read_items(csv_path, id_column="id")]
    assert got == [("x1", "what, exactly?"), ("x2", "why?")]
    assert count_items(csv_path) == 2
    with pytest.raises(ValueError, match="column 'nope'"):
        list(read_items(csv_path, column="nope"))


def test_output_lines_follow_the_openai_batch_format() -> None:
    ok = ChatResponse(
        request_id="r1",
        tenant_id="t",
        lane="bulk",
        answer="42",
        model="smol",
        finish_reason="stop",
        usage=Usage(prompt_tokens=10, completion_tokens=2, total_tokens=12),
        citations=[Citation(index=1, doc_id="d", chunk_id="d#0", score=0.5)],
    )
    line = json.loads(output_line("a", ok))
    assert line["custom_id"] == "a" and line["error"] is None
    body = line["response"]["body"]
    assert line["response"]["status_code"] == 200
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"] == "42"
    assert body["usage"] == {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}
    failed = ok.model_copy(update={"error": ErrorInfo(code=ErrorCode.CONTEXT_OVERFLOW, message="too long")})
    line = json.loads(output_line("b", failed))
    assert line["response"] is None and line["error"] == {"code": "context_overflow", "message": "too long"}
    assert (
        json.loads(output_line("c", None, ("invalid_request", "bad")))["error"]["code"] == "invalid_request"
    )


def test_answered_ids_cuts_a_torn_last_line(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text(
        json.dumps({"custom_id": "a"}) + "\n" + json.dumps({"custom_id": "b"}) + "\n" + '{"custom_'
    )
    assert answered_ids(out) == {"a", "b"}
    assert out.read_text().endswith("}\n")
    assert answered_ids(tmp_path / "missing.jsonl") == set()


def test_request_ids_are_stable_per_tenant_job_and_id() -> None:
    assert request_id_for("t", "j", "a") == request_id_for("t", "j", "a")
    ids = {
        request_id_for("t", "j", "a"),
        request_id_for("t", "j", "b"),
        request_id_for("t", "k", "a"),
        # The same job and custom id under another tenant is another request.
        request_id_for("acme", "j", "a"),
        # Fields cannot run together: ("t", "j\x00a") is not ("t\x00j", "a").
        request_id_for("t", "ja", ""),
        request_id_for("tj", "a", ""),
    }
    assert len(ids) == 6
    assert str(uuid.UUID(request_id_for("t", "j", "a"))) == request_id_for("t", "j", "a")


def test_jobs_are_kept_per_tenant(tmp_path: Path) -> None:
    """The same --job under two tenants is two jobs: neither loads, lists nor cancels the other."""
    acme, other = JobStore(tmp_path, "acme"), JobStore(tmp_path, "other")

    def state(tenant: str) -> JobState:
        return JobState(
            job_id="j",
            input="in",
            output=f"{tenant}.jsonl",
            input_format="text",
            tenant_id=tenant,
            user_id="u",
        )

    acme.save(state("acme"))
    assert other.load("j") is None and other.list() == []
    other.save(state("other"))
    assert acme.load("j").output == "acme.jsonl" and other.load("j").output == "other.jsonl"  # type: ignore[union-attr]
    acme.request_cancel("j")
    assert acme.cancel_requested("j") and not other.cancel_requested("j")
    with pytest.raises(ValueError, match="belongs to tenant 'acme'"):
        other.save(state("acme"))
    with pytest.raises(ValueError, match="invalid tenant"):
        JobStore(tmp_path, "../acme")


def test_split_messages_needs_a_final_user_turn() -> None:
    with pytest.raises(InvalidInput):
        split_messages([{"role": "tool", "content": "x"}])
    system, history, question = split_messages(
        [{"role": "developer", "content": "s"}, {"role": "user", "content": "q"}]
    )
    assert (system, history, question) == ("s", [], "q")


def test_conversation_memory_is_bounded() -> None:
    conv = Conversations(max_conversations=2, max_turns=2)
    for i in range(3):
        conv.record("c1", f"q{i}", f"a{i}")
    assert [m.content for m in conv.history("c1")] == ["q1", "a1", "q2", "a2"]
    conv.record("c2", "x", "y")
    conv.record("c3", "x", "y")
    assert conv.history("c1") == [] and conv.history(None) == []


def _line(custom_id: object = "x", **body: object) -> str:
    body.setdefault("messages", [{"role": "user", "content": "q"}])
    return json.dumps({"custom_id": custom_id, "body": body})


def _build(item: BulkItem) -> ChatRequest:
    return build_request(item, request_id="r", tenant_id="t", user_id="u", job_id="j")


def test_hostile_lines_become_bad_lines_one_each_and_reading_goes_on(tmp_path: Path) -> None:
    """Each line an attacker (or a broken exporter) might write yields exactly one item; none
    raises out of the reader, and only the good one becomes a request."""
    longest = field_max_length(ChatRequest, "question")
    raw = [
        _line("good"),
        _line("part-number", messages=[{"role": "user", "content": [{"type": "text", "text": 5}]}]),
        _line("part-image", messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
        _line("part-str", messages=[{"role": "user", "content": ["just a string"]}]),
        _line("content-number", messages=[{"role": "user", "content": 42}]),
        _line("robot", messages=[{"role": "robot", "content": "beep"}]),
        _line("not-a-message", messages=["hello"]),
        _line("messages-object", messages={"role": "user"}),
        json.dumps({"custom_id": "no-body"}),
        json.dumps({"custom_id": "body-list", "body": []}),
        _line(12345),
        _line(None),
        "{not json",
        "[1, 2, 3]",
        "[" * 5000 + "]" * 5000,
        '{"custom_id": "surrogate", "body": {"messages": [{"role": "user", "content": "\\ud800"}]}}',
        _line("long-question", messages=[{"role": "user", "content": "q" * (longest + 1)}]),
        _line("m" * (CUSTOM_ID_MAX + 50)),
        _line("ctl\nid"),
        _line("max-tokens-text", max_tokens="many"),
        _line("max-tokens-zero", max_completion_tokens=-3),
        _line("temperature-huge", temperature=1e9),
        _line("model-number", model=7),
    ]
    path = tmp_path / "in.jsonl"
    path.write_bytes("\n".join(raw).encode() + b"\n\xff\xfe not utf-8 \xc3\n")
    items = list(read_items(path, "openai"))
    assert len(items) == len(raw) + 1
    requests, bad = [], []
    for item in items:
        if isinstance(item, BulkItem):
            try:
                requests.append(_build(item))
            except BadLine as e:
                bad.append(e)
        else:
            bad.append(item)
    # The body is checked by the gateway's protocol model: a non-string model is refused there too.
    assert [r.custom_id for r in requests] == ["good"]
    assert len(bad) == len(items) - 1
    assert all(len(b.custom_id) <= CUSTOM_ID_MAX and str(b) for b in bad)
    by_id = {b.custom_id: b for b in bad}
    assert by_id["part-number"].param == "messages.[0].content.[0]"
    assert by_id["content-number"].param == "messages.[0].content"
    assert by_id["robot"].param == "messages.[0].role"
    assert by_id["long-question"].param == "messages" and "at most" in str(by_id["long-question"])
    assert by_id["max-tokens-text"].param == "max_tokens"
    assert by_id["temperature-huge"].param == "temperature"
    assert by_id["ctl\nid"].param == "custom_id"
    assert by_id["model-number"].param == "model"
    assert by_id["messages-object"].param == "messages" and by_id["no-body"].param == "body"
    assert by_id[safe_custom_id("m" * (CUSTOM_ID_MAX + 50))].param == "custom_id"
    # The lines with no readable custom_id are named by their line number.
    assert {"line-11", "line-12", "line-13", "line-14", "line-15", "line-16", "line-24"} <= set(by_id)
    assert "not UTF-8" in str(by_id["line-24"]) and "not JSON" in str(by_id["line-15"])
    # Error lines carry no echo of the offending input.
    assert all("q" * 100 not in str(b) for b in bad)


def test_safe_custom_id_cuts_long_ids_to_distinct_stable_ones() -> None:
    assert safe_custom_id("short") == "short"
    a, b = "a" * 1000, "a" * 999 + "b"
    assert len(safe_custom_id(a)) == CUSTOM_ID_MAX == len(safe_custom_id(b))
    assert safe_custom_id(a) != safe_custom_id(b) and safe_custom_id(a) == safe_custom_id(a)
    assert safe_custom_id("x\udcff").encode("utf-8")  # a lone surrogate no longer breaks the writer


def test_error_lines_are_openai_batch_lines_with_the_cut_id() -> None:
    bad = BadLine("z" * 1000, "too long")
    line = json.loads(output_line(bad.custom_id, None, ("invalid_request", str(bad))))
    assert line["custom_id"] == safe_custom_id("z" * 1000) and line["response"] is None
    assert line["error"] == {"code": "invalid_request", "message": "too long"}


def test_csv_rows_that_are_not_utf8_are_bad_rows(tmp_path: Path) -> None:
    path = tmp_path / "q.csv"
    path.write_bytes(b"id,question\nok,fine?\nbad,caf\xe9?\n,\n")
    items = list(read_items(path, id_column="id"))
    assert isinstance(items[0], BulkItem) and items[0].question == "fine?"
    assert isinstance(items[1], BadLine) and items[1].custom_id == "bad" and "UTF-8" in str(items[1])
    assert len(items) == 2  # the empty row is skipped, as before
