import json
from pathlib import Path

import pytest

from producers.bulk.formats import BadLine, answered_ids, count_items, output_line, read_items, split_messages
from producers.bulk.runner import request_id_for
from producers.client.conversations import Conversations
from schemas import ChatResponse, Citation, ErrorCode, ErrorInfo, Usage


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
    first = items[0]
    assert not isinstance(first, BadLine)
    assert (first.custom_id, first.question, first.system_prompt, first.model, first.max_tokens) == (
        "a",
        "what is ragbus?",
        "be brief",
        "m",
        20,
    )
    assert [m.role for m in first.history] == ["user", "assistant"]
    assert isinstance(items[1], BadLine) and "unsupported url" in str(items[1])
    assert isinstance(items[2], BadLine) and items[2].custom_id == "line-3"
    assert isinstance(items[3], BadLine) and "last message" in str(items[3])
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


def test_request_ids_are_stable_per_job_and_id() -> None:
    assert request_id_for("j", "a") == request_id_for("j", "a")
    assert len({request_id_for("j", "a"), request_id_for("j", "b"), request_id_for("k", "a")}) == 3


def test_split_messages_needs_a_final_user_turn() -> None:
    with pytest.raises(BadLine):
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
