"""What the benchmarks share: settings for a throwaway deployment, and a ragbus component
(`ragbus <args>`) as a child process, as a deployment runs it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from infra.settings import Settings


def bench_settings(bootstrap: str, work: Path, client: dict[str, Any] | None = None) -> Settings:
    """A fresh topic prefix, home and Milvus Lite file under `work`, on the broker at `bootstrap`
    (`client`: its credentials, `tests.provision.KafkaService.client`)."""
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    return Settings(
        **(client or {}),
        kafka_bootstrap=bootstrap,
        topic_prefix=prefix,
        home=work / "home",
        milvus_uri=str(work / "milvus.db"),
        milvus_collection=f"c_{prefix}",
        instance_id=prefix,
        _env_file=None,  # type: ignore[call-arg]
    )


class ComponentProcess:
    def __init__(
        self, settings: Settings, args: list[str], log_path: Path, env: dict[str, str] | None = None
    ) -> None:
        """`env`: more RAGBUS_* settings for this component only (a bench's knob, e.g. threads)."""
        self.settings, self.args, self.log_path = settings, args, log_path
        self.extra_env = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        s = self.settings
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAGBUS_")}
        env.update(
            {
                "RAGBUS_KAFKA_BOOTSTRAP": s.bootstrap,
                "RAGBUS_TOPIC_PREFIX": s.topic_prefix,
                "RAGBUS_HOME": str(s.home),
                "RAGBUS_MILVUS_URI": s.milvus_target,
                "RAGBUS_MILVUS_COLLECTION": s.milvus_collection,
                "RAGBUS_INSTANCE_ID": f"{s.instance_id}-{self.args[0]}",
                "RAGBUS_LOG_LEVEL": "WARNING",
            }
        )
        # The broker's credentials (the bench broker is authenticated, like `ragbus up`'s).
        env["RAGBUS_KAFKA_SECURITY_PROTOCOL"] = s.kafka_security_protocol
        for name, value in (
            ("SASL_MECHANISM", s.kafka_sasl_mechanism),
            ("SASL_USERNAME", s.kafka_sasl_username),
            ("SASL_PASSWORD", s.kafka_sasl_password.get_secret_value() if s.kafka_sasl_password else None),
        ):
            if value:
                env[f"RAGBUS_KAFKA_{name}"] = value
        env.update(self.extra_env)
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cli.main", *self.args],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """SIGTERM (the component finishes and commits its batch), then wait; raises when it did
        not exit cleanly."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            code = proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise RuntimeError(f"`ragbus {' '.join(self.args)}` did not stop; see {self.log_path}") from None
        # uvicorn (the gateway) shuts down gracefully on SIGTERM and then re-raises the signal, so
        # the gateway's clean exit reads as -SIGTERM.
        clean = (0, -signal.SIGTERM) if self.args[0] == "gateway" else (0,)
        if code not in clean:
            raise RuntimeError(f"`ragbus {' '.join(self.args)}` exited with {code}; see {self.log_path}")
