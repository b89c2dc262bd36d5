"""Models and routes: sources, validation, weighted and deterministic routing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from inference_workers.config import DEFAULT_MODEL_NAME, ConfigError, load_table, model_names
from infra.settings import Settings


def settings(tmp_path: Path, **kw: object) -> Settings:
    return Settings(home=tmp_path, llm_backend="llamacpp", _env_file=None, **kw)  # type: ignore[call-arg]


def test_default_is_the_packaged_model(tmp_path: Path) -> None:
    table = load_table(settings(tmp_path))
    assert table.names() == [DEFAULT_MODEL_NAME] and table.source == "default"
    assert table.models[DEFAULT_MODEL_NAME].backend == "llamacpp"
    assert table.route(None, "any") == DEFAULT_MODEL_NAME


def test_weighted_routes_split_like_the_weights_and_repeat_per_request(tmp_path: Path) -> None:
    s = settings(
        tmp_path,
        llm_models=[{"name": "stable"}, {"name": "canary", "backend": "vllm", "model": "org/m"}],
        llm_routes={"stable": 90, "canary": 10},
    )
    table = load_table(s)
    picks = [table.route(None, f"request-{i}") for i in range(5000)]
    share = picks.count("canary") / len(picks)
    assert 0.08 < share < 0.12
    assert all(table.route(None, f"request-{i}") == picks[i] for i in range(100))  # a replay routes alike
    assert table.route("stable", "x") == "stable" and table.route("nope", "x") is None


def test_models_file_wins_and_is_validated(tmp_path: Path) -> None:
    path = tmp_path / "models.toml"
    path.write_text('[[models]]\nname = "a"\n[[models]]\nname = "b"\n[routes]\nb = 1\n')
    s = settings(tmp_path, llm_models=[{"name": "ignored"}])
    table = load_table(s)  # <home>/models.toml is found by default
    assert table.names() == ["a", "b"] and table.route(None, "r") == "b" and table.source == str(path)
    assert model_names(s) == ["a", "b"]

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"models": [{"name": "a"}], "routes": {"zzz": 1}}))
    with pytest.raises(ConfigError, match="zzz"):
        load_table(settings(tmp_path, llm_models_file=bad))
    assert model_names(settings(tmp_path, llm_models_file=bad)) == []
    bad.write_text(json.dumps({"models": [{"name": "a"}, {"name": "a"}]}))
    with pytest.raises(ConfigError, match="twice"):
        load_table(settings(tmp_path, llm_models_file=bad))
    bad.write_text(json.dumps({"models": [{"name": "a", "backend": "tpu"}]}))
    with pytest.raises(ConfigError):
        load_table(settings(tmp_path, llm_models_file=bad))


def test_fingerprint_changes_with_the_table(tmp_path: Path) -> None:
    a = load_table(settings(tmp_path, llm_models=[{"name": "a"}, {"name": "b"}], llm_routes={"a": 1}))
    b = load_table(settings(tmp_path, llm_models=[{"name": "a"}, {"name": "b"}], llm_routes={"b": 1}))
    c = load_table(settings(tmp_path, llm_models=[{"name": "a"}, {"name": "b"}], llm_routes={"a": 1}))
    assert a.fingerprint != b.fingerprint and a.fingerprint == c.fingerprint
