"""The built wheel is the product: installed (not editable) into a fresh virtual environment, with
the source tree out of reach, `ragbus up`, `smoke`, `status` and `down` work. This catches data
files the product reads at run time (the broker's log4j2 config, the jar list, migrations, schemas,
demo samples) missing from the package, and product code importing test-only modules.

Offline and quick: the wheel is built without build isolation from a copy of the sources, installed
without dependencies, and the dependencies are those of the interpreter running this test, made
visible to the fresh environment by a `.pth` file.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

from infra.kafka.jars import ensure_jars
from infra.settings import Settings
from schemas.topics import Topics
from tests.conftest import CACHE
from tests.helpers import stack_env

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ["schemas", "infra", "producers", "processors", "inference_workers", "sinks", "cli"]
#: Files read at run time that a wheel must carry (see [tool.setuptools.package-data]).
DATA_FILES = [
    "infra/kafka/log4j2.properties",
    "infra/kafka/pom.xml",
    "schemas/json/topics.json",
    "producers/samples/questions.jsonl",
    "producers/samples/docs/it-helpdesk.md",
]

#: Where the installed product finds its modules and the data files it reads at run time.
PROBE = """
import infra, schemas
from cli.demo import SAMPLES
from infra.kafka.broker import LOG4J2
from infra.kafka.jars import POM
from infra.postgres.migrations import MIGRATIONS_DIR
from schemas.export import JSON_DIR
print(infra.__file__, schemas.__file__, LOG4J2, POM, next(MIGRATIONS_DIR.glob("*.sql")), JSON_DIR, SAMPLES)
"""

#: What `ragbus up` declares: the shared topics and those of the tenant `default`.
UP_TOPICS = len(Topics("ragbus").all()) + len(Topics("ragbus").tenant("default").all())


def _run(cmd: list[str | Path], *, timeout: float, **kw: object) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, check=False, **kw
    )  # type: ignore[call-overload]
    assert out.returncode == 0, f"{cmd} exited {out.returncode}:\n{out.stdout}\n{out.stderr}"
    return out


def _build_wheel(tmp_path: Path) -> Path:
    """Build from a copy of exactly what the package is made of, leaving the checkout untouched."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, src / pkg, ignore=ignore)
    dist = tmp_path / "dist"
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist, src],
        timeout=300,
    )
    (wheel,) = dist.glob("ragbus-*.whl")
    return wheel


def _fresh_venv(tmp_path: Path, wheel: Path) -> Path:
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], timeout=120)
    python = venv / "bin" / "python"
    _run(
        [sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel],
        timeout=300,
    )
    site = Path(
        _run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], timeout=60
        ).stdout.strip()
    )
    # The running interpreter's dependencies, after the fresh site-packages on sys.path.
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "_ragbus_test_deps.pth").write_text("".join(f"{d}\n" for d in sorted(deps)))
    return venv


def test_wheel_runs_the_stack_from_a_fresh_environment(tmp_path: Path) -> None:
    started = time.monotonic()
    wheel = _build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [f for f in DATA_FILES if f not in names]
    assert not missing, f"the wheel lacks run-time data files: {missing}"
    assert any(n.startswith("infra/postgres/migrations/") and n.endswith(".sql") for n in names)
    assert not any(n.startswith("tests/") or n.endswith("/provision.py") for n in names)

    venv = _fresh_venv(tmp_path, wheel)
    work = tmp_path / "cwd"
    work.mkdir()
    home = tmp_path / "home"
    home.mkdir()
    # The broker's jars, resolved once for all test sessions: this test is about packaging, not Maven.
    ensure_jars(CACHE, Settings().kafka_version)
    (home / "kafka").symlink_to(CACHE / "kafka", target_is_directory=True)
    env = stack_env(home, drop=("PYTHONPATH",))

    where = _run([venv / "bin" / "python", "-c", PROBE], timeout=60, cwd=work, env=env).stdout.split()
    site = venv.resolve() / "lib"
    assert len(where) == 7 and all(Path(p).resolve().is_relative_to(site) for p in where), where
    assert all(Path(p).exists() for p in where), where

    ragbus = venv / "bin" / "ragbus"
    try:
        up = _run([ragbus, "up"], timeout=300, cwd=work, env=env)
        assert f"topics: {UP_TOPICS} created" in up.stdout, up.stdout
        smoke = _run([ragbus, "smoke"], timeout=180, cwd=work, env=env)
        assert "Traceback" not in smoke.stdout + smoke.stderr
        status = _run([ragbus, "status"], timeout=120, cwd=work, env=env)
        assert "consumer groups" in status.stdout, status.stdout
    finally:
        down = subprocess.run(
            [str(ragbus), "down"], capture_output=True, text=True, timeout=120, cwd=work, env=env, check=False
        )
    assert down.returncode == 0, down.stdout + down.stderr
    assert "local stack stopped" in down.stdout
    print(f"wheel build + install + up + smoke + status + down: {time.monotonic() - started:.1f} s")
