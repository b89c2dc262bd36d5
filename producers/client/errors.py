"""Exceptions of the chat client."""

from __future__ import annotations

from schemas import ChatResponse


class ChatTimeout(TimeoutError):
    """No answer arrived in time; a late answer is dropped."""

    def __init__(self, request_id: str, timeout: float) -> None:
        super().__init__(f"no answer to request {request_id} within {timeout:g} s")
        self.request_id = request_id
        self.timeout = timeout


class ChatError(RuntimeError):
    """The pipeline answered with an error (invalid request, deadline, unknown model, ...)."""

    def __init__(self, response: ChatResponse) -> None:
        assert response.error is not None
        super().__init__(f"{response.error.code.value}: {response.error.message}")
        self.response = response
        self.code = response.error.code
