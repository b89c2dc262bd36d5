"""Batched generation on llama.cpp's C API: one context holds up to `n_seq` sequences, prompts are
prefilled together and every decode step advances all live sequences with one `llama_decode` call.

llama-cpp-python's high-level `Llama` generates one sequence at a time; on a CPU a step over 16
sequences costs little more than a step over one, so batching multiplies throughput. Everything here
is synchronous and must run on one thread (the engine's own); the C calls release the GIL.
"""

from __future__ import annotations

import codecs
import ctypes
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import llama_cpp as C
import numpy as np

log = logging.getLogger(__name__)

_backend_lock = threading.Lock()
_backend_ready = False


def _init_backend() -> None:
    global _backend_ready
    with _backend_lock:
        if not _backend_ready:
            C.llama_backend_init()
            _silence_llama_logs()
            _backend_ready = True


@C.llama_log_callback
def _quiet(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    if level == 4 and text:  # GGML_LOG_LEVEL_ERROR
        log.error("llama.cpp: %s", text.decode("utf-8", "replace").rstrip())


def _silence_llama_logs() -> None:
    C.llama_log_set(_quiet, ctypes.c_void_p(0))


@dataclass
class SeqJob:
    """One sequence to generate: prompt tokens in, text and counts out."""

    prompt_tokens: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = ()
    on_text: Callable[[str], None] | None = None
    #: GBNF the output must match (structured output); None: free text.
    grammar: str | None = None
    #: Alternatives per token to report with each token's logprob; None: no logprobs.
    top_logprobs: int | None = None
    #: Asked before each decode step; True stops the sequence (finish reason "cancelled").
    cancelled: Callable[[], bool] | None = None
    # results
    text: str = ""
    completion_tokens: int = 0
    finish_reason: str = "length"
    #: Per generated token: (where its text starts in `text`, token id, logprob, [(id, logprob)]).
    logprobs: list[tuple[int, int, float, list[tuple[int, float]]]] = field(default_factory=list)
    decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace")
    )


class BatchDecoder:
    """Owns a llama.cpp model and one multi-sequence context."""

    def __init__(
        self,
        model_path: str,
        *,
        n_seq: int,
        n_ctx: int,
        n_threads: int | None = None,
        n_batch: int = 512,
        use_extra_bufts: bool = False,
    ) -> None:
        _init_backend()
        mparams = C.llama_model_default_params()
        # Extra buffer types (AMX, repacked weights) pick kernels by CPUID; in VMs that report AMX
        # without granting it they die with SIGILL. The plain CPU kernels run everywhere.
        mparams.use_extra_bufts = use_extra_bufts
        self.model = C.llama_model_load_from_file(model_path.encode(), mparams)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {model_path}")
        self.vocab = C.llama_model_get_vocab(self.model)
        self.n_ctx_train = int(C.llama_model_n_ctx_train(self.model))
        self.n_seq = n_seq
        self.n_batch = max(n_batch, n_seq)
        cparams = C.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = self.n_batch
        cparams.n_ubatch = self.n_batch
        cparams.n_seq_max = n_seq
        cparams.kv_unified = True  # sequences share one KV buffer: long and short prompts mix freely
        if n_threads:
            cparams.n_threads = n_threads
            cparams.n_threads_batch = n_threads
        self.ctx = C.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            C.llama_model_free(self.model)
            raise RuntimeError(f"llama.cpp could not create a context of {n_ctx} tokens")
        self.n_ctx = int(C.llama_n_ctx(self.ctx))
        self.memory = C.llama_get_memory(self.ctx)
        self.eos = int(C.llama_vocab_eos(self.vocab))
        self.add_bos = bool(C.llama_vocab_get_add_bos(self.vocab))
        self.bos = int(C.llama_vocab_bos(self.vocab))
        self.control_ids = frozenset(
            t for t in range(C.llama_vocab_n_tokens(self.vocab)) if C.llama_vocab_is_control(self.vocab, t)
        )
        self.n_vocab = int(C.llama_vocab_n_tokens(self.vocab))
        self._batch = C.llama_batch_init(self.n_batch, 0, 1)

    # --- text ⇄ tokens ------------------------------------------------------------------------
    def chat_template(self) -> str | None:
        raw = C.llama_model_chat_template(self.model, None)
        return raw.decode("utf-8") if raw else None

    def token_text(self, token: int) -> str:
        return self._piece(token).decode("utf-8", "replace")

    def token_bytes(self, token: int) -> bytes:
        return self._piece(token)

    def tokenize(self, text: str, *, add_special: bool = False, parse_special: bool = False) -> list[int]:
        """`parse_special` turns control-token markers in `text` into control tokens: only for the
        chat template's own text, never for content (a document could otherwise write its own
        `<|im_start|>system` turn)."""
        data = text.encode("utf-8")
        cap = len(data) + 16
        buf = (C.llama_token * cap)()
        n = C.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            cap = -n
            buf = (C.llama_token * cap)()
            n = C.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        return list(buf[:n])

    def _piece(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = C.llama_token_to_piece(self.vocab, token, buf, 64, 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = C.llama_token_to_piece(self.vocab, token, buf, -n, 0, False)
        return buf.raw[:n]

    # --- generation ---------------------------------------------------------------------------
    def generate(self, jobs: list[SeqJob]) -> None:
        """Run `jobs` (at most n_seq, total tokens within n_ctx) to completion, filling their results."""
        if not jobs:
            return
        if len(jobs) > self.n_seq:
            raise ValueError(f"{len(jobs)} sequences, the context holds {self.n_seq}")
        need = sum(len(j.prompt_tokens) + j.max_tokens for j in jobs)
        if need > self.n_ctx:
            raise ValueError(f"the batch needs {need} KV cells, the context has {self.n_ctx}")
        C.llama_memory_clear(self.memory, True)
        samplers: list[C.llama_sampler_p] = []
        try:
            for j in jobs:
                samplers.append(self._sampler(j))
            self._run(jobs, samplers)
        finally:
            for s in samplers:
                C.llama_sampler_free(s)
            C.llama_memory_clear(self.memory, True)

    def _run(self, jobs: list[SeqJob], samplers: list[C.llama_sampler_p]) -> None:
        # Prefill. Only the last decode call's logits survive, so every sequence's last prompt
        # token goes into the final call: first the other prompt tokens in chunks of n_batch.
        body: list[tuple[int, int, int, bool]] = []
        tails: list[tuple[int, int, int, bool]] = []
        for s, job in enumerate(jobs):
            toks = job.prompt_tokens
            if not toks:
                raise ValueError("an empty prompt")
            body.extend((t, p, s, False) for p, t in enumerate(toks[:-1]))
            tails.append((toks[-1], len(toks) - 1, s, True))
        chunks = [body[i : i + self.n_batch] for i in range(0, len(body), self.n_batch)]
        if chunks and len(chunks[-1]) + len(tails) <= self.n_batch:
            chunks[-1] = chunks[-1] + tails
        else:
            chunks.append(tails)
        for chunk in chunks:
            self._fill(chunk)
            self._decode()
        offset = len(chunks[-1]) - len(tails)
        out_index = {s: offset + s for s in range(len(jobs))}
        pos = [len(j.prompt_tokens) for j in jobs]
        live = list(range(len(jobs)))
        while live:
            step: list[tuple[int, int, int, bool]] = []
            for s in live:
                job = jobs[s]
                if self._cancelled(job):
                    continue
                token = int(C.llama_sampler_sample(samplers[s], self.ctx, out_index[s]))
                if job.top_logprobs is not None and not C.llama_vocab_is_eog(self.vocab, token):
                    self._record_logprob(job, token, out_index[s])
                if self._accept(job, token):
                    step.append((token, pos[s], s, True))
                    pos[s] += 1
            live = [s for _, _, s, _ in step]
            if not live:
                break
            self._fill(step)
            self._decode()
            out_index = {s: i for i, (_, _, s, _) in enumerate(step)}

    def _cancelled(self, job: SeqJob) -> bool:
        """Whether `job` was cancelled (then it is finished, with what it generated so far); a check
        that raises counts as not cancelled: cancelling is best-effort, generating is the job."""
        if job.cancelled is None:
            return False
        try:
            stop = bool(job.cancelled())
        except Exception:  # cancelling is best-effort
            log.exception("cancel check failed; generating on")
            return False
        if stop:
            self._emit(job, b"", final=True)
            job.finish_reason = "cancelled"
        return stop

    def _accept(self, job: SeqJob, token: int) -> bool:
        """Record `token` for `job`; False when the sequence is finished."""
        if C.llama_vocab_is_eog(self.vocab, token):
            self._emit(job, b"", final=True)
            job.finish_reason = "stop"
            return False
        job.completion_tokens += 1
        self._emit(job, self._piece(token), final=False)
        if job.stop:
            for stop in job.stop:
                cut = job.text.find(stop)
                if cut >= 0:
                    job.text = job.text[:cut]
                    # The tokens that wrote the stop sequence are not part of the answer either.
                    job.logprobs = [e for e in job.logprobs if e[0] < cut]
                    job.finish_reason = "stop"
                    return False
        if job.completion_tokens >= job.max_tokens:
            self._emit(job, b"", final=True)
            job.finish_reason = "length"
            return False
        return True

    def _record_logprob(self, job: SeqJob, token: int, index: int) -> None:
        """The model's log probability of `token` (from the raw logits: before temperature, top_p or
        a grammar reshape them, as vLLM reports them) and its `job.top_logprobs` likeliest rivals."""
        ptr = C.llama_get_logits_ith(self.ctx, index)
        logits = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).astype(np.float64)
        top = float(logits.max())
        logprobs = logits - (top + float(np.log(np.exp(logits - top).sum())))
        k = job.top_logprobs or 0
        best: list[tuple[int, float]] = []
        if k:
            ids = np.argpartition(-logprobs, k - 1)[:k]
            ids = ids[np.argsort(-logprobs[ids], kind="stable")]
            best = [(int(i), float(logprobs[i])) for i in ids]
        # Where this token's text will start: the text so far plus what the decoder still holds.
        job.logprobs.append((len(job.text), token, float(logprobs[token]), best))

    @staticmethod
    def _emit(job: SeqJob, data: bytes, *, final: bool) -> None:
        text = job.decoder.decode(data, final=final)
        if text:
            job.text += text
            if job.on_text is not None:
                job.on_text(text)

    def _sampler(self, job: SeqJob) -> C.llama_sampler_p:
        chain = C.llama_sampler_chain_init(C.llama_sampler_chain_default_params())
        if job.grammar is not None:
            # First in the chain: every later sampler sees only tokens the grammar allows.
            grammar = C.llama_sampler_init_grammar(self.vocab, job.grammar.encode(), b"root")
            if not grammar:
                C.llama_sampler_free(chain)
                raise ValueError("llama.cpp could not parse the response_format grammar")
            C.llama_sampler_chain_add(chain, grammar)
        if job.temperature <= 0.0:
            C.llama_sampler_chain_add(chain, C.llama_sampler_init_greedy())
        else:
            if job.top_p < 1.0:
                C.llama_sampler_chain_add(chain, C.llama_sampler_init_top_p(job.top_p, 1))
            C.llama_sampler_chain_add(chain, C.llama_sampler_init_temp(job.temperature))
            seed = job.seed if job.seed is not None else C.LLAMA_DEFAULT_SEED
            C.llama_sampler_chain_add(chain, C.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        return chain

    def _fill(self, items: list[tuple[int, int, int, bool]]) -> None:
        b = self._batch
        for i, (token, p, seq, logits) in enumerate(items):
            b.token[i] = token
            b.pos[i] = p
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = 1 if logits else 0
        b.n_tokens = len(items)

    def _decode(self) -> None:
        rc = C.llama_decode(self.ctx, self._batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with code {rc}")

    def close(self) -> None:
        if getattr(self, "_batch", None) is not None:
            C.llama_batch_free(self._batch)
            self._batch = None
        if getattr(self, "ctx", None):
            C.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            C.llama_model_free(self.model)
            self.model = None
