"""Which inference backends this Python environment can import (without importing them: each is
heavy, and vLLM cannot share the main virtual environment)."""

from __future__ import annotations

import importlib.util


def llamacpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None
