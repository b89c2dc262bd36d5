"""The one place a ChatRequest is made: the chat client, bulk jobs and the gateway all build
theirs here, so every request is validated by the contract the same way and carries the same
defaults (the route table picks the model, the deadline follows the caller's timeout)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any

from schemas import ChatMessage, ChatRequest, Lane, RetrievalOptions, SamplingParams, new_id, utcnow

#: Model names that mean "whichever model the route table picks" (`ragbus` is what /v1/models lists).
DEFAULT_MODEL_NAMES = frozenset({"", "ragbus"})


def build_chat_request(
    question: str,
    *,
    tenant_id: str,
    user_id: str,
    lane: Lane = "chat",
    request_id: str | None = None,
    history: Sequence[ChatMessage] = (),
    system_prompt: str | None = None,
    conversation_id: str | None = None,
    model: str | None = None,
    stream: bool = False,
    sampling: Mapping[str, Any] | None = None,
    top_k: int | None = None,
    timeout: float | None = None,
    client_ip: str | None = None,
    job_id: str | None = None,
    custom_id: str | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> ChatRequest:
    """A validated ChatRequest. `sampling` values left None take the contract's defaults; with a
    `timeout`, the request carries a deadline, so the pipeline answers deadline_exceeded rather
    than work on a question nobody awaits any more.

    Raises pydantic's ValidationError when the contract refuses a value (a field too long,
    sampling out of bounds); callers turn it into their own error (a 400, an error line)."""
    # Built through the constructors, never assigned afterwards: the constructors validate.
    chosen = SamplingParams(**{k: v for k, v in (sampling or {}).items() if v is not None})
    return ChatRequest(
        request_id=request_id or new_id(),
        tenant_id=tenant_id,
        user_id=user_id,
        lane=lane,
        question=question,
        history=list(history),
        system_prompt=system_prompt,
        conversation_id=conversation_id,
        model=None if model is None or model in DEFAULT_MODEL_NAMES else model,
        stream=stream,
        sampling=chosen,
        retrieval=RetrievalOptions(top_k=top_k),
        deadline=utcnow() + timedelta(seconds=timeout) if timeout else None,
        client_ip=client_ip,
        job_id=job_id,
        custom_id=custom_id,
        metadata=dict(metadata or {}),
    )
