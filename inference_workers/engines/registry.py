"""Build an engine from a model entry, and say which backends this machine can run."""

from __future__ import annotations

from pathlib import Path

from inference_workers.config import PACKAGED, ModelSpec
from inference_workers.engines.base import Engine, EngineError
from inference_workers.engines.installed import llamacpp_available, vllm_installed
from infra.settings import Settings


def vllm_model_path(spec: ModelSpec, settings: Settings) -> str:
    """What vLLM loads for `spec.model`: the prepared folder for packaged models, else as given."""
    if spec.model == PACKAGED:
        from inference_workers.prepare import prepared_dir

        path = prepared_dir(settings)
        if not (path / "config.json").is_file():
            raise EngineError(
                f"model {spec.name!r} (vllm, {PACKAGED}) is not prepared: run `ragbus models prepare`"
            )
        return str(path)
    if spec.model.startswith("packaged:"):
        raise EngineError(f"{spec.model} is not a packaged model")
    local = Path(spec.model).expanduser()
    return str(local) if local.exists() else spec.model


def build_engine(spec: ModelSpec, settings: Settings) -> Engine:
    max_batch = spec.max_batch or settings.llm_max_batch
    window = spec.context_window or settings.llm_context_window
    if spec.backend == "llamacpp":
        if not llamacpp_available():
            raise EngineError("the llamacpp backend needs llama-cpp-python (pip install 'ragbus[llamacpp]')")
        from inference_workers.engines.llamacpp import LlamaCppEngine

        allowed = {"n_threads", "kv_cells", "use_extra_bufts"}
        unknown = set(spec.options) - allowed
        if unknown:
            raise EngineError(
                f"{spec.name}: unknown llamacpp options {sorted(unknown)}; known: {sorted(allowed)}"
            )
        return LlamaCppEngine(
            spec.name, spec.model, max_batch=max_batch, context_window=window, **spec.options
        )
    if spec.backend == "vllm":
        from inference_workers.engines.vllm import VllmEngine

        return VllmEngine(
            spec.name,
            vllm_model_path(spec, settings),
            max_batch=max_batch,
            context_window=window,
            options=spec.options,
        )
    raise EngineError(f"{spec.name}: unknown backend {spec.backend!r}")


def loadable(spec: ModelSpec, settings: Settings) -> tuple[bool, str]:
    """Whether `spec` can be loaded here (without loading it), and why not."""
    try:
        if spec.backend == "llamacpp":
            if not llamacpp_available():
                return False, "llama-cpp-python is not installed"
            from inference_workers.engines.llamacpp import resolve_gguf

            return True, str(resolve_gguf(spec.model))
        if spec.backend == "vllm":
            if not vllm_installed():
                return False, "vLLM is not installed in this environment"
            return True, vllm_model_path(spec, settings)
    except EngineError as e:
        return False, str(e)
    return False, f"unknown backend {spec.backend}"
