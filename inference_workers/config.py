"""Served models and the weighted route table, from settings or a models file.

Sources, first found wins: the file named by `llm_models_file` (TOML or JSON, re-read by a running
worker when it changes or on `ragbus models reload`), then the `llm_models` / `llm_routes` settings,
then one default model: the packaged SmolLM2-135M-Instruct on the CPU backend that runs here.

    # models.toml
    [[models]]
    name = "smollm2"
    backend = "llamacpp"            # llamacpp | vllm | auto
    model = "packaged:smollm2"      # GGUF path, HF model id, local HF folder, or packaged:smollm2

    [[models]]
    name = "smollm2-vllm"
    backend = "vllm"
    model = "packaged:smollm2"      # vllm: the folder `ragbus models prepare` wrote
    options = { dtype = "float32" } # any vLLM AsyncEngineArgs field

    [routes]                        # requests that name no model: weighted choice
    smollm2 = 90
    smollm2-vllm = 10
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from inference_workers.engines.installed import llamacpp_available
from infra.settings import Settings

DEFAULT_MODEL_NAME = "smollm2"
PACKAGED = "packaged:smollm2"

Backend = Literal["auto", "llamacpp", "vllm"]


class ConfigError(ValueError):
    """The models file or settings do not describe a valid set of models and routes."""


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:/@-]+$")
    backend: Backend = "auto"
    model: str = PACKAGED
    max_batch: int | None = Field(default=None, ge=1, le=1024)
    context_window: int | None = Field(default=None, ge=256)
    options: dict[str, Any] = Field(default_factory=dict)


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[ModelSpec] = Field(min_length=1)
    routes: dict[str, float] = Field(default_factory=dict)


@dataclass(frozen=True)
class ModelTable:
    """Models by name plus the weighted routes for requests that name none."""

    models: dict[str, ModelSpec]
    routes: tuple[tuple[str, float], ...]
    source: str = "default"
    fingerprint: str = field(default="", compare=False)

    def names(self) -> list[str]:
        return list(self.models)

    def route(self, requested: str | None, key: str) -> str | None:
        """The model for a request: the one it names (None when unknown), else a weighted choice
        that is a pure function of `key` (the request id), so a replayed request gets the same."""
        if requested:
            return requested if requested in self.models else None
        total = sum(w for _, w in self.routes)
        point = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64 * total
        for name, weight in self.routes:
            if point < weight:
                return name
            point -= weight
        return self.routes[-1][0]


def models_file(settings: Settings) -> Path | None:
    path = settings.llm_models_file
    if path is not None:
        return Path(path).expanduser()
    default = settings.home / "models.toml"
    return default if default.is_file() else None


def default_backend(settings: Settings) -> str:
    """`llm_backend=auto`: llama.cpp where it imports, else vLLM."""
    choice = settings.llm_backend
    if choice != "auto":
        return choice
    return "llamacpp" if llamacpp_available() else "vllm"


def load_table(settings: Settings) -> ModelTable:
    """The current models and routes; raises ConfigError with a readable reason."""
    path = models_file(settings)
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"llm_models_file {path} does not exist")
        try:
            raw = path.read_bytes()
            data = json.loads(raw) if path.suffix == ".json" else tomllib.loads(raw.decode())
            parsed = _File.model_validate(data)
        except (ValueError, ValidationError, OSError) as e:
            raise ConfigError(f"{path}: {e}") from None
        return _table(parsed.models, parsed.routes, str(path), settings)
    specs_raw: list[dict[str, Any]] = list(settings.llm_models)
    if specs_raw:
        try:
            specs = [ModelSpec.model_validate(s) for s in specs_raw]
        except ValidationError as e:
            raise ConfigError(f"llm_models: {e}") from None
        return _table(specs, dict(settings.llm_routes), "settings", settings)
    return _table([ModelSpec(name=DEFAULT_MODEL_NAME)], {}, "default", settings)


def _table(specs: list[ModelSpec], routes: dict[str, float], source: str, settings: Settings) -> ModelTable:
    models: dict[str, ModelSpec] = {}
    for spec in specs:
        if spec.name in models:
            raise ConfigError(f"{source}: model {spec.name!r} is defined twice")
        if spec.backend == "auto":
            spec = spec.model_copy(update={"backend": default_backend(settings)})
        models[spec.name] = spec
    for name, weight in routes.items():
        if name not in models:
            raise ConfigError(f"{source}: route to {name!r}, which is not a configured model")
        if weight < 0:
            raise ConfigError(f"{source}: route weight of {name!r} is negative")
    weighted = tuple((n, float(w)) for n, w in routes.items() if w > 0)
    if routes and not weighted:
        raise ConfigError(f"{source}: every route weight is zero")
    if not weighted:
        weighted = ((next(iter(models)), 1.0),)
    fingerprint = hashlib.sha256(
        json.dumps([[s.model_dump() for s in models.values()], weighted], sort_keys=True).encode()
    ).hexdigest()[:16]
    return ModelTable(models=models, routes=weighted, source=source, fingerprint=fingerprint)


def model_names(settings: Settings) -> list[str]:
    """Names of the configured models (for the gateway's /v1/models); empty when misconfigured."""
    try:
        return load_table(settings).names()
    except ConfigError:
        return []
