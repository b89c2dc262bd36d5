"""Resolves the Kafka broker's jars from Maven Central, once, into a cache folder outside git."""

from __future__ import annotations

import fcntl
import logging
import shutil
import subprocess
import time
from pathlib import Path

from infra.procs import ServiceError

log = logging.getLogger(__name__)

POM = Path(__file__).with_name("pom.xml")
_DONE = ".resolved"


def jar_dir(cache: Path, version: str) -> Path:
    return cache / "kafka" / version / "libs"


def ensure_jars(cache: Path, version: str) -> Path:
    """The folder holding every jar of Kafka `version`, resolving it with `mvn` when missing.

    A file lock makes concurrent callers (parallel test sessions, `ragbus up`) wait for one
    resolution instead of racing.
    """
    libs = jar_dir(cache, version)
    if (libs / _DONE).exists():
        return libs
    libs.parent.mkdir(parents=True, exist_ok=True)
    with open(libs.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (libs / _DONE).exists():
            return libs
        mvn = shutil.which("mvn")
        if mvn is None:
            raise ServiceError(
                "Maven (`mvn`) is not installed; it resolves the Kafka broker's jars "
                "(Debian: apt-get install maven), or set RAGBUS_KAFKA_BOOTSTRAP to use a running cluster"
            )
        if shutil.which("java") is None:
            raise ServiceError(
                "Java is not installed; the local Kafka broker needs Java 17+ "
                "(apt-get install openjdk-17-jre-headless)"
            )
        tmp = libs.with_name("libs.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        log_path = libs.parent / "mvn.log"
        started = time.monotonic()
        log.info("resolving Apache Kafka %s jars from Maven Central into %s", version, libs)
        with open(log_path, "w") as out:
            proc = subprocess.run(
                [
                    mvn,
                    "-B",
                    "-q",
                    "-f",
                    str(POM),
                    f"-Dkafka.version={version}",
                    "dependency:copy-dependencies",
                    "-DincludeScope=runtime",
                    f"-DoutputDirectory={tmp}",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                check=False,
            )
        if proc.returncode != 0 or not any(tmp.glob("kafka_2.13-*.jar")):
            raise ServiceError(f"mvn could not resolve Apache Kafka {version}", log_path)
        (tmp / _DONE).write_text(f"{time.time()}\n")
        shutil.rmtree(libs, ignore_errors=True)
        tmp.rename(libs)
        log.info("resolved %d jars in %.1f s", len(list(libs.glob("*.jar"))), time.monotonic() - started)
        return libs
