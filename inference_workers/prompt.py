"""Prompt building: system prompt, retrieved context numbered [1], [2], … for citations, the
conversation history and the question, rendered with the model's chat template and cut to fit its
context window.

What gives way when it does not fit, in order: the lowest-scored context chunks, then the oldest
history turns. A question that does not fit even alone is a `context_overflow` error (never a
request the engine would choke on).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from schemas import ChatMessage, Citation, EnrichedRequest, RetrievedChunk

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful assistant. Answer the question using the numbered context passages. "
    "Cite the passages you use like [1]. If the context does not contain the answer, say so."
)
NO_CONTEXT_SYSTEM_PROMPT = "You are a helpful assistant. Answer the question concisely."

#: A completion needs at least this many tokens of room to be worth starting.
MIN_COMPLETION_TOKENS = 16


class ContextOverflow(ValueError):
    """The question (with the system prompt) alone does not fit the model's context window."""


@dataclass
class BuiltPrompt:
    text: str
    tokens: int
    chunks: list[RetrievedChunk] = field(default_factory=list)
    dropped_chunks: int = 0
    dropped_history: int = 0
    #: Completion tokens the prompt leaves room for (may be below the requested max_tokens).
    room: int = 0


Render = Callable[[list[dict[str, str]]], str]
Count = Callable[[str], int]


def context_block(chunks: list[RetrievedChunk]) -> str:
    lines = []
    for i, chunk in enumerate(chunks, start=1):
        title = f" ({chunk.title})" if chunk.title else ""
        lines.append(f"[{i}]{title} {chunk.text.strip()}")
    return "\n".join(lines)


def messages_for(
    question: str,
    *,
    system_prompt: str | None,
    chunks: list[RetrievedChunk],
    history: list[ChatMessage],
) -> list[dict[str, str]]:
    system = system_prompt or (DEFAULT_SYSTEM_PROMPT if chunks else NO_CONTEXT_SYSTEM_PROMPT)
    messages = [{"role": "system", "content": system}]
    messages.extend({"role": m.role, "content": m.content} for m in history if m.role != "system")
    user = f"Context:\n{context_block(chunks)}\n\nQuestion: {question}" if chunks else question
    messages.append({"role": "user", "content": user})
    return messages


def build_prompt(
    enriched: EnrichedRequest, *, render: Render, count: Count, context_window: int
) -> BuiltPrompt:
    """The rendered prompt that fits `context_window` with room for the requested completion."""
    req = enriched.request
    want = req.sampling.max_tokens
    # Highest score first decides what survives; the survivors keep their retrieval order.
    order = sorted(range(len(enriched.chunks)), key=lambda i: enriched.chunks[i].score, reverse=True)
    keep_chunks = len(order)
    history = list(req.history)
    keep_history = len(history)

    def attempt() -> tuple[str, int, list[RetrievedChunk]]:
        kept = sorted(order[:keep_chunks])
        chunks = [enriched.chunks[i] for i in kept]
        text = render(
            messages_for(
                req.question,
                system_prompt=req.system_prompt,
                chunks=chunks,
                history=history[len(history) - keep_history :],
            )
        )
        return text, count(text), chunks

    text, tokens, chunks = attempt()
    while tokens + want > context_window and (keep_chunks or keep_history):
        if keep_chunks:
            keep_chunks -= 1
        else:
            keep_history -= 1
        text, tokens, chunks = attempt()
    room = context_window - tokens
    if room < min(want, MIN_COMPLETION_TOKENS):
        raise ContextOverflow(
            f"the question needs {tokens} prompt tokens; the model's context window is {context_window} "
            f"tokens, leaving no room for an answer even without context and history"
        )
    return BuiltPrompt(
        text=text,
        tokens=tokens,
        chunks=chunks,
        dropped_chunks=len(order) - keep_chunks,
        dropped_history=len(history) - keep_history,
        room=room,
    )


_MARKER = re.compile(r"\[(\d{1,3})\]")


def citations_for(answer: str, chunks: list[RetrievedChunk]) -> list[Citation]:
    """The chunks the answer cites with [n]; when it cites none, every chunk it was given."""
    cited = sorted({int(m) for m in _MARKER.findall(answer) if 1 <= int(m) <= len(chunks)})
    indexes = cited or list(range(1, len(chunks) + 1))
    return [
        Citation(
            index=i,
            doc_id=chunks[i - 1].doc_id,
            chunk_id=chunks[i - 1].chunk_id,
            source=chunks[i - 1].source,
            title=chunks[i - 1].title,
            score=chunks[i - 1].score,
        )
        for i in indexes
    ]
