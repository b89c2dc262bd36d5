"""The ChatResponse events the worker publishes: answers and clear errors."""

from __future__ import annotations

import time
from datetime import datetime

from infra.kafka.codec import Output, encode
from schemas import (
    AnswerChoice,
    ChatResponse,
    Citation,
    EnrichedRequest,
    ErrorCode,
    ErrorInfo,
    StageTimings,
    Topics,
    Usage,
    limits,
)


def reply_topic(topics: Topics, enriched: EnrichedRequest) -> str:
    """The responses topic of the request's tenant. `*.enriched` is written only by ragbus's
    processors, which set its tenant from the topic the request came in on, so it is trusted."""
    return topics.tenant(enriched.tenant_id).responses(enriched.lane)


def ms_since(start: datetime) -> float:
    return max(0.0, (time.time() - start.timestamp()) * 1000.0)


def timings_for(
    enriched: EnrichedRequest,
    *,
    queue_ms: float | None,
    generate_ms: float | None,
) -> StageTimings:
    t = enriched.timings.model_copy()
    t.inference_queue_ms = None if queue_ms is None else round(queue_ms, 2)
    t.generate_ms = None if generate_ms is None else round(generate_ms, 2)
    t.total_ms = round(ms_since(enriched.request.created_at), 2)
    return t


def answer(
    enriched: EnrichedRequest,
    *,
    topics: Topics,
    model: str,
    text: str,
    citations: list[Citation],
    prompt_tokens: int,
    completion_tokens: int,
    finish_reason: str,
    cached: bool,
    queue_ms: float | None,
    generate_ms: float | None,
    choices: list[AnswerChoice] | None = None,
) -> Output:
    """The answer event; `choices` (every sample, the first being `text`) when the request asked
    for several or for logprobs."""
    req = enriched.request
    response = ChatResponse(
        **enriched.envelope(),  # type: ignore[arg-type]
        answer=text,
        citations=citations,
        model=model,
        usage=Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        ),
        timings=timings_for(enriched, queue_ms=queue_ms, generate_ms=generate_ms),
        finish_reason="length" if finish_reason == "length" else "stop",
        cached=cached,
        conversation_id=req.conversation_id,
        job_id=req.job_id,
        custom_id=req.custom_id,
        choices=choices or [],
    )
    return reply_topic(topics, enriched), encode(response)


def error(
    enriched: EnrichedRequest,
    *,
    topics: Topics,
    code: ErrorCode,
    message: str,
    model: str | None = None,
    queue_ms: float | None = None,
    generate_ms: float | None = None,
) -> Output:
    req = enriched.request
    response = ChatResponse(
        **enriched.envelope(),  # type: ignore[arg-type]
        model=model,
        finish_reason="error",
        error=ErrorInfo(code=code, message=message[:2000]),
        timings=timings_for(enriched, queue_ms=queue_ms, generate_ms=generate_ms),
        conversation_id=req.conversation_id,
        job_id=req.job_id,
        custom_id=req.custom_id,
    )
    return reply_topic(topics, enriched), encode(response)


def cancelled(
    enriched: EnrichedRequest,
    *,
    topics: Topics,
    reason: str,
    model: str | None = None,
    text: str = "",
    prompt_tokens: int = 0,
    completion_tokens: int = 0,
    queue_ms: float | None = None,
    generate_ms: float | None = None,
) -> Output:
    """The answer of a cancelled request: an error with code `cancelled` (so a reader of the
    contract before cancellation existed sees an error, not an answer), carrying what was generated
    until the cancel and its tokens, which were spent (usage, audit)."""
    req = enriched.request
    done = f"after {completion_tokens} generated tokens" if model is not None else "before it was generated"
    response = ChatResponse(
        **enriched.envelope(),  # type: ignore[arg-type]
        answer=text,
        model=model,
        usage=Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        ),
        finish_reason="error",
        error=ErrorInfo(
            code=ErrorCode.CANCELLED,
            message=limits.cut(f"the request was cancelled ({reason}) {done}", limits.ERROR_MESSAGE_MAX),
        ),
        timings=timings_for(enriched, queue_ms=queue_ms, generate_ms=generate_ms),
        conversation_id=req.conversation_id,
        job_id=req.job_id,
        custom_id=req.custom_id,
    )
    return reply_topic(topics, enriched), encode(response)
