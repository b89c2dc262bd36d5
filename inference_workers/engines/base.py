"""The one interface every generation backend implements, so the worker does not care which runs.

Backends supply the chat template and a tokenizer that can be told whether to parse special
tokens; what all of them share (`render` to token ids, `count_tokens`, `Generation.prompt_ids`)
lives here, so that no backend can tokenize a document's text as control tokens.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from inference_workers.prompt import EncodedPrompt, encode_chat
from schemas import SamplingParams, TokenLogprob

Message = dict[str, str]
#: "cancelled": the request was cancelled while it generated (`Generation.cancelled`); the text and
#: tokens are what was generated until then.
FinishReason = Literal["stop", "length", "error", "cancelled"]

#: Called from the engine (possibly on its own thread) with each new piece of text.
TokenCallback = Callable[[str], None]
#: Asked by the engine (possibly on its own thread) between decode steps: True once the request is
#: cancelled, and the engine then stops its sequences (finish reason "cancelled"). Must be cheap.
CancelCheck = Callable[[], bool]


@dataclass
class Generation:
    """One request in a micro-batch: a rendered prompt and how to sample it.

    The engine runs `prompt_ids`, never re-tokenizes `prompt`: only the ids know which tokens are
    the template's markers and which are text. They default to the ids an `EncodedPrompt` (what
    `Engine.render` returns) carries; a plain string without ids is refused.
    """

    prompt: str
    sampling: SamplingParams
    request_id: str = ""
    on_token: TokenCallback | None = None
    prompt_ids: list[int] | None = None
    cancelled: CancelCheck | None = None

    def __post_init__(self) -> None:
        if self.prompt_ids is None:
            if not isinstance(self.prompt, EncodedPrompt):
                raise TypeError(
                    "Generation needs token ids: pass a prompt from Engine.render (or build_prompt) "
                    "or prompt_ids; a plain string would let its text become control tokens"
                )
            self.prompt_ids = self.prompt.token_ids


@dataclass
class Completion:
    """One request's answer: its first sample here, the others (`sampling.n` > 1) in `more`."""

    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: FinishReason = "stop"
    error: str | None = None
    extra: dict[str, float] = field(default_factory=dict)
    #: Each generated token's logprob, when `sampling.logprobs` asked for them.
    logprobs: list[TokenLogprob] | None = None
    #: Samples 2..n of the same prompt (their prompt_tokens are 0: the prompt is counted once).
    more: list[Completion] = field(default_factory=list)

    @property
    def samples(self) -> list[Completion]:
        return [self, *self.more]


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
    def apply_template(self, messages: list[Message]) -> str:
        """The model's chat template applied to `messages`, ending where the assistant answers."""

    @abc.abstractmethod
    def tokenize(self, text: str, special: bool) -> list[int]:
        """Token ids of `text`, no BOS added; `special` lets its control-token markers become control
        tokens (for the template's own text only). Thread-safe; called off the event loop."""

    def prefix_ids(self) -> list[int]:
        """Ids every prompt starts with that the template does not write (a BOS the model wants)."""
        return []

    def control_ids(self) -> frozenset[int]:
        """Control token ids; content that tokenizes to one is refused (defence in depth)."""
        return frozenset()

    def render(self, messages: list[Message]) -> EncodedPrompt:
        """`messages` in the chat template, with the ids the engine runs: content stays text."""
        return encode_chat(
            messages,
            template=self.apply_template,
            tokenize=self.tokenize,
            prefix=self.prefix_ids(),
            control_ids=self.control_ids(),
        )

    def count_tokens(self, text: str) -> int:
        """Tokens of a rendered prompt (its ids), or of a piece of content tokenized as text."""
        if isinstance(text, EncodedPrompt):
            return len(text.token_ids)
        return len(self.tokenize(text, False))

    @abc.abstractmethod
    async def generate(self, batch: list[Generation]) -> list[Completion]:
        """Generate every request of `batch`; one Completion per request, in order."""

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "backend": self.backend, "context_window": self.context_window}
