"""The vLLM backend with the real SmolLM2 (the packaged GGUF converted by `ragbus models prepare`),
on vLLM's CPU build or a GPU. Runs where vLLM is installed, e.g. the environment that
`infra/bootstrap vllm-cpu` builds: `.venv-vllm/bin/python -m pytest -m vllm`."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from inference_workers.engines.registry import vllm_installed

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(
        not vllm_installed(),
        reason="vLLM is not installed here (GPU: pip install vllm; CPU: infra/bootstrap vllm-cpu)",
    ),
]

from inference_workers.engines.base import Generation  # noqa: E402
from inference_workers.engines.vllm import VllmEngine  # noqa: E402
from inference_workers.prepare import prepare_packaged  # noqa: E402
from inference_workers.prompt import build_prompt  # noqa: E402
from inference_workers.router import Router  # noqa: E402
from inference_workers.worker.service import InferenceWorker  # noqa: E402
from infra.settings import Settings  # noqa: E402
from tests.conftest import CACHE  # noqa: E402
from tests.helpers import wait_for  # noqa: E402
from tests.integration.inference_support import CASES, answered, enriched, feed, running  # noqa: E402

NAME = "smollm2-vllm"


@pytest.fixture(scope="module")
async def engine() -> AsyncIterator[VllmEngine]:
    cache = CACHE / "vllm"
    for k, v in {
        "VLLM_CPU_KVCACHE_SPACE": "2",
        "VLLM_CACHE_ROOT": str(cache),
        "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
    }.items():
        os.environ.setdefault(k, v)
    # The conversion is cached between sessions under the test cache (~35 s the first time).
    folder: Path = prepare_packaged(Settings(home=CACHE, _env_file=None))  # type: ignore[call-arg]
    eng = VllmEngine(NAME, str(folder), max_batch=8, context_window=2048)
    await eng.start()
    yield eng
    await eng.close()


async def test_vllm_engine_answers_a_batch_from_context(engine: VllmEngine) -> None:
    streamed: list[str] = []
    gens = []
    for i, (q, passage, _) in enumerate(CASES):
        ev = enriched(q, passage, max_tokens=32)
        built = build_prompt(
            ev, render=engine.render, count=engine.count_tokens, context_window=engine.context_window
        )
        gens.append(
            Generation(built.text, ev.request.sampling, ev.request_id, streamed.append if i == 0 else None)
        )
    results = await engine.generate(gens)
    for (_, _, expected), r in zip(CASES, results, strict=True):
        assert r.error is None and expected.lower() in r.text.lower(), r.text
        assert r.prompt_tokens > 50 and 0 < r.completion_tokens <= 32
    assert "".join(streamed) == results[0].text
    assert engine.context_window == 2048


async def test_worker_on_vllm_through_kafka(settings: Settings, engine: VllmEngine) -> None:
    s = settings.model_copy(update={"llm_models": [{"name": NAME, "backend": "vllm"}], "llm_max_batch": 8})
    events = [enriched(q, p, lane="bulk" if i else "chat") for i, (q, p, _) in enumerate(CASES)]
    await feed(settings, events)
    worker = InferenceWorker(s, router=Router(s, shared={NAME: engine}))
    async with running(worker):
        got = await wait_for(
            lambda: answered(settings, {e.request_id for e in events}), timeout=180, what="answers"
        )
    for ev, (_, _, expected) in zip(events, CASES, strict=True):
        (r,) = got[ev.request_id]
        assert r.ok and r.model == NAME and expected.lower() in r.answer.lower(), r.answer
        assert r.usage.completion_tokens > 0 and r.timings.generate_ms
