"""The one interface every generation backend implements, so the worker does not care which runs."""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from schemas import SamplingParams

Message = dict[str, str]
FinishReason = Literal["stop", "length", "error"]

#: Called from the engine (possibly on its own thread) with each new piece of text.
TokenCallback = Callable[[str], None]


@dataclass
class Generation:
    """One request in a micro-batch: a rendered prompt and how to sample it."""

    prompt: str
    sampling: SamplingParams
    request_id: str = ""
    on_token: TokenCallback | None = None


@dataclass
class Completion:
    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: FinishReason = "stop"
    error: str | None = None
    extra: dict[str, float] = field(default_factory=dict)


class EngineError(RuntimeError):
    """The engine could not run (load failure, crash); per-request failures are Completion.error."""


class Engine(abc.ABC):
    """A loaded model. `generate` takes a whole micro-batch so the backend can run it as one batch."""

    #: The served model name (what requests and route tables use).
    name: str
    #: Backend id: "llamacpp" or "vllm".
    backend: str
    #: Most requests one `generate` call should hold (the worker splits larger batches).
    max_batch: int = 32

    @property
    @abc.abstractmethod
    def context_window(self) -> int:
        """Tokens of prompt plus completion one sequence may hold."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Load the model (off the event loop)."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    def render(self, messages: list[Message]) -> str:
        """The model's chat template applied to `messages`, ending where the assistant answers."""

    @abc.abstractmethod
    def count_tokens(self, text: str) -> int:
        """Tokens of a rendered prompt (thread-safe; called off the event loop)."""

    @abc.abstractmethod
    async def generate(self, batch: list[Generation]) -> list[Completion]:
        """Generate every request of `batch`; one Completion per request, in order."""

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "backend": self.backend, "context_window": self.context_window}
