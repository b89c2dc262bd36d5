"""What a bulk job asks before each request goes out: the hook through which the gateway's Batch API
charges a batch's lines to its tenant's quotas (producers/gateway/batch_quotas.py). `ragbus bulk`
jobs run without one: the operator's own jobs are not metered.

The runner calls `admit` for a line once the line has a slot in the job's window; `admit` may wait
(a per-minute limit: the job then goes at the tenant's rate) and returns a hold, which the runner
passes to `settle` with the line's answer; None when the job was stopped while it waited. A line
that may not go at all (a monthly budget spent) raises `LineRefused`, and is answered with that
error in the job's output, the job going on."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from schemas import ChatRequest, ChatResponse


class LineRefused(Exception):
    """This line may not be sent: answered in the output as error `code` with the message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Admission(Protocol):
    async def admit(self, request: ChatRequest, stopped: Callable[[], bool]) -> Any | None:
        """A hold for `request` once it may go (waiting as long as it must, returning None as soon
        as `stopped()`); raises LineRefused for a line that may never go."""
        ...

    async def settle(self, hold: Any, response: ChatResponse) -> None:
        """The line's answer arrived: turn its hold into what it used. Never raises."""
        ...
