"""Prompt building and citations (pure logic: a word-count tokenizer and a plain-text template)."""

from __future__ import annotations

import pytest

from inference_workers.prompt import (
    DEFAULT_SYSTEM_PROMPT,
    ContextOverflow,
    build_prompt,
    citations_for,
    messages_for,
)
from schemas import ChatMessage, ChatRequest, EnrichedRequest, RetrievedChunk, SamplingParams


def render(messages: list[dict[str, str]]) -> str:
    return "\n".join(f"<{m['role']}> {m['content']}" for m in messages) + "\n<assistant>"


def count(text: str) -> int:
    return len(text.split())


def chunk(i: int, score: float, words: int = 20) -> RetrievedChunk:
    return RetrievedChunk(chunk_id=f"c{i}", doc_id=f"d{i}", text=" ".join([f"w{i}"] * words), score=score)


def request(question: str = "What is it?", *, max_tokens: int = 10, history: int = 0) -> ChatRequest:
    turns = [
        ChatMessage(role="user" if t % 2 == 0 else "assistant", content=" ".join([f"h{t}"] * 10))
        for t in range(history)
    ]
    return ChatRequest(
        tenant_id="t", question=question, history=turns, sampling=SamplingParams(max_tokens=max_tokens)
    )


def enriched(req: ChatRequest, chunks: list[RetrievedChunk]) -> EnrichedRequest:
    return EnrichedRequest(**req.envelope(), request=req, chunks=chunks)


def test_context_is_numbered_in_retrieval_order_with_system_and_history() -> None:
    req = request(history=2)
    built = build_prompt(
        enriched(req, [chunk(1, 0.9), chunk(2, 0.5)]), render=render, count=count, context_window=500
    )
    assert built.text.startswith(f"<system> {DEFAULT_SYSTEM_PROMPT}")
    assert "[1] w1" in built.text and "[2] w2" in built.text
    assert built.text.index("h0") < built.text.index("h1") < built.text.index("Question: What is it?")
    assert built.tokens == count(built.text) and built.room == 500 - built.tokens
    assert (built.dropped_chunks, built.dropped_history) == (0, 0)


def test_lowest_scored_chunks_go_first_then_oldest_history() -> None:
    chunks = [chunk(1, 0.5), chunk(2, 0.9), chunk(3, 0.1), chunk(4, 0.7)]
    req = request(history=4, max_tokens=10)
    full = build_prompt(enriched(req, chunks), render=render, count=count, context_window=10_000)
    # room for all but about two chunks
    window = full.tokens + 10 - 35
    built = build_prompt(enriched(req, chunks), render=render, count=count, context_window=window)
    assert [c.chunk_id for c in built.chunks] == ["c2", "c4"]  # c3 (0.1) then c1 (0.5) dropped
    assert "[1] w2" in built.text and "[2] w4" in built.text  # renumbered, retrieval order kept
    assert built.dropped_history == 0 and built.tokens + 10 <= window

    bare = build_prompt(enriched(req, []), render=render, count=count, context_window=10_000)
    built = build_prompt(enriched(req, chunks), render=render, count=count, context_window=bare.tokens - 15)
    assert built.chunks == [] and built.dropped_history >= 2
    assert "h3" in built.text and "h0" not in built.text  # the newest turns survive


def test_a_question_that_alone_does_not_fit_is_a_context_overflow() -> None:
    req = request(" ".join(["why"] * 300), max_tokens=10)
    with pytest.raises(ContextOverflow, match="context window is 256"):
        build_prompt(enriched(req, [chunk(1, 0.9)]), render=render, count=count, context_window=256)


def test_a_tight_fit_shrinks_the_room_instead_of_failing() -> None:
    req = request(max_tokens=200)
    bare = build_prompt(enriched(req, []), render=render, count=count, context_window=10_000)
    built = build_prompt(enriched(req, []), render=render, count=count, context_window=bare.tokens + 50)
    assert built.room == 50


def test_no_context_uses_the_plain_system_prompt_and_a_custom_one_wins() -> None:
    msgs = messages_for("Hi?", system_prompt=None, chunks=[], history=[])
    assert msgs[-1] == {"role": "user", "content": "Hi?"} and "context" not in msgs[0]["content"].lower()
    msgs = messages_for("Hi?", system_prompt="Be terse.", chunks=[chunk(1, 0.3)], history=[])
    assert msgs[0]["content"] == "Be terse." and "[1] w1" in msgs[-1]["content"]


def test_citations_follow_the_markers_or_list_every_chunk() -> None:
    chunks = [chunk(1, 0.9), chunk(2, 0.8), chunk(3, 0.7)]
    cited = citations_for("It is blue [2], per [3] and [9].", chunks)
    assert [(c.index, c.chunk_id) for c in cited] == [(2, "c2"), (3, "c3")]
    assert [c.index for c in citations_for("It is blue.", chunks)] == [1, 2, 3]
    assert citations_for("anything", []) == []
