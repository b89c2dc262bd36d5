"""POST /v1/embeddings, served in the gateway's own process with the processors' embedding model.

In-process rather than over the bus: an embedding is one short CPU call with nothing to retrieve
and nothing to audit, so a round trip through Kafka would only add latency. The vectors are the
processors' own: the gateway is handed the same loader (`processors.embedding.Embedder`, composed
in cli/ — components do not import each other), so the same model, normalization and truncation
give the same numbers.

The model loads on the first request, on a worker thread (seconds; the event loop keeps serving
chat meanwhile), and every tokenize + encode runs on one thread of its own, one call at a time:
the CPU is the bottleneck and a fast tokenizer is not safe to share between threads.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np
from pydantic import ValidationError

from producers.openai.convert import InvalidInput, common_param, describe
from producers.openai.protocol import Embedding, EmbeddingList, EmbeddingRequest, EmbeddingUsage
from schemas import limits

log = logging.getLogger(__name__)

#: The name every gateway serves its embedding model under, besides the model's own name.
EMBEDDING_ALIAS = "ragbus-embed"
#: Inputs per request.
MAX_INPUTS = limits.EMBEDDING_INPUTS_MAX
#: Characters per input: the contract's bound on a question, the longest text the processors embed.
MAX_INPUT_CHARS = limits.QUESTION_MAX


class TextEmbedder(Protocol):
    """What the gateway needs of processors.embedding.Embedder."""

    name: str
    model: Any  # a SentenceTransformer: its `tokenizer` and `max_seq_length`

    @property
    def dimension(self) -> int: ...

    def encode_now(self, texts: Sequence[str]) -> np.ndarray: ...


class ModelUnavailable(RuntimeError):
    """The embedding model could not be loaded (logged with its cause; the next request retries)."""


class EmbeddingService:
    """Lazily loaded model + the one thread that runs it."""

    def __init__(self, load: Callable[[], TextEmbedder], model_name: str) -> None:
        self._load = load
        self.model_name = model_name
        self.names = [model_name, EMBEDDING_ALIAS]
        self._embedder: TextEmbedder | None = None
        self._loading = asyncio.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gateway-embed")

    async def embedder(self) -> TextEmbedder:
        if self._embedder is None:
            async with self._loading:
                if self._embedder is None:
                    loop = asyncio.get_running_loop()
                    try:
                        self._embedder = await loop.run_in_executor(self._executor, self._load)
                    except Exception as e:
                        log.error(
                            "embedding model %s failed to load: %s: %s", self.model_name, type(e).__name__, e
                        )
                        raise ModelUnavailable(self.model_name) from e
        return self._embedder

    async def embed(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """(normalized float32 vectors, tokens the model read) for `texts`."""
        embedder = await self.embedder()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, _encode, embedder, texts)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _encode(embedder: TextEmbedder, texts: list[str]) -> tuple[np.ndarray, int]:
    # Tokens as the model reads them: cut at its window (what the processors' encode does too),
    # its [CLS]/[SEP] included.
    model = embedder.model
    encoded = model.tokenizer(texts, truncation=True, max_length=int(model.max_seq_length), verbose=False)
    tokens = sum(len(ids) for ids in encoded["input_ids"])
    return embedder.encode_now(texts), tokens


def parse_request(data: Any) -> EmbeddingRequest:
    """A decoded JSON body as an EmbeddingRequest with `input` a list of texts; raises InvalidInput."""
    if not isinstance(data, dict):
        raise InvalidInput("the body must be a JSON object", "body")
    unknown = [k for k in data if k not in EmbeddingRequest.model_fields]
    if unknown:
        raise InvalidInput(
            f"`{unknown[0][:64]}` is not a parameter of embeddings ragbus knows; remove it",
            unknown[0][:64],
            "unknown_parameter",
        )
    try:
        request = EmbeddingRequest.model_validate(data)
    except ValidationError as e:
        raise InvalidInput(describe(e), common_param([x.get("loc", ()) for x in e.errors()])) from None
    request.input = input_texts(request.input)
    return request


def input_texts(value: Any) -> list[str]:
    """`input` as a list of texts: a string or a list of strings; token arrays are refused."""
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not texts:
        raise InvalidInput("`input` must be a string or a non-empty list of strings", "input")
    if any(isinstance(t, int | list) for t in texts):
        raise InvalidInput(
            "`input` as token ids is not supported: send the text (a string or a list of strings)",
            "input",
            "unsupported_parameter",
        )
    if not all(isinstance(t, str) for t in texts):
        raise InvalidInput("`input` must be a string or a list of strings", "input")
    if len(texts) > MAX_INPUTS:
        raise InvalidInput(f"`input` has {len(texts)} texts; send at most {MAX_INPUTS} per request", "input")
    for i, text in enumerate(texts):
        if not text:
            raise InvalidInput(f"`input` [{i}] is empty", "input")
        if len(text) > MAX_INPUT_CHARS:
            raise InvalidInput(
                f"`input` [{i}] is {len(text)} characters; each text is at most {MAX_INPUT_CHARS}", "input"
            )
    return texts


def check_dimensions(request: EmbeddingRequest, dimension: int) -> None:
    if request.dimensions is not None and request.dimensions != dimension:
        raise InvalidInput(
            f"`dimensions` is not supported: the model's vectors have {dimension} dimensions "
            f"(send {dimension} or leave it out)",
            "dimensions",
            "unsupported_parameter",
        )


def to_response(request: EmbeddingRequest, model: str, vectors: np.ndarray, tokens: int) -> EmbeddingList:
    data = []
    for i, vector in enumerate(vectors):
        if request.encoding_format == "base64":
            value: list[float] | str = base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
        else:
            value = vector.tolist()
        data.append(Embedding(index=i, embedding=value))
    return EmbeddingList(
        data=data, model=model, usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens)
    )
