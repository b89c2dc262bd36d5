"""ragbus components (processors, worker, audit sink, gateway) run as background processes of the
local deployment: `ragbus start` / `ragbus stop`, shown by `ragbus status`.

Each runs its own `ragbus <command>` in a new session, with a pid file under `<home>/run/` and a log
under `<home>/logs/`, so it survives the terminal that started it.

A component may run as several instances (`ragbus start worker --instances 2`). Each instance is a
numbered slot with its own pid file and log, and its own stable `RAGBUS_INSTANCE_ID`
(`<host or RAGBUS_INSTANCE_ID>-<slot>`), from which its transactional id is derived: a slot that
is restarted after a crash fences its predecessor's open transaction at once, instead of leaving
every read_committed reader of the partitions it wrote waiting for the transaction timeout.
"""

from __future__ import annotations

import os
import re
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from infra.procs import OwnedProcess, ServiceError, tail
from infra.settings import Settings


@dataclass(frozen=True)
class Component:
    name: str
    args: tuple[str, ...]
    description: str
    #: Settings (field names) holding secrets only this component uses; the others never see them.
    secrets: frozenset[str] = frozenset()


#: Secret settings that belong to one component each: the audit keys and the Postgres DSNs are the
#: audit sink's, but the gateway's own DSN (readers are CLI commands, run in the user's own
#: environment, not components).
_OWNED_SECRETS = frozenset(
    {"audit_encryption_keys", "audit_key_file", "pg_dsn", "pg_sink_dsn", "pg_reader_dsn", "pg_gateway_dsn"}
)


#: The pipeline's long-running parts, in start order (consumers of a stage before its producers).
COMPONENTS: tuple[Component, ...] = (
    Component(
        "sink",
        ("sink", "run"),
        "audit sink: every ragbus topic into Postgres",
        frozenset({"audit_encryption_keys", "audit_key_file", "pg_dsn", "pg_sink_dsn"}),
    ),
    Component("worker", ("worker", "run"), "inference worker: enriched requests → answers"),
    Component("processors", ("processors", "run"), "ingestion and retrieval processors"),
    Component("gateway", ("gateway",), "OpenAI-compatible HTTP gateway", frozenset({"pg_gateway_dsn"})),
)
BY_NAME = {c.name: c for c in COMPONENTS}


def component_env(component: Component, base: dict[str, str]) -> dict[str, str]:
    """The environment `component` runs with: `base` without the variables of secrets owned by
    other components (`RAGBUS_<FIELD>`, matched as pydantic-settings does, case-insensitively), so
    a worker or the gateway never holds the audit encryption keys or a database password."""
    foreign = {f"RAGBUS_{name}".upper() for name in _OWNED_SECRETS - component.secrets}
    return {k: v for k, v in base.items() if k.upper() not in foreign}


#: Components that may run as several instances on one host (the gateway binds one port; run more
#: gateways on other ports or hosts behind a load balancer).
SCALABLE = frozenset({"worker", "processors", "sink"})


def instance_id_for(settings: Settings, slot: int) -> str:
    """The stable identity of instance `slot` on this host (or of RAGBUS_INSTANCE_ID, e.g. a pod)."""
    return f"{settings.instance_id or socket.gethostname()}-{slot}"


class Background(OwnedProcess):
    """One instance slot of a component run in the background."""

    #: A stop reaches the component's own children too (e.g. an engine process).
    stop_group = True
    stop_timeout = 30.0

    def __init__(self, settings: Settings, component: Component, slot: int = 0) -> None:
        self.settings = settings
        self.component = component
        self.slot = slot
        #: `worker` for slot 0 (the paths a single instance always had), `worker-1` and so on.
        self.name = component.name if slot == 0 else f"{component.name}-{slot}"
        self.pid_path = settings.home / "run" / f"{self.name}.pid"
        self.log_path = settings.home / "logs" / f"{self.name}.log"
        self.label = self.name

    def start(self, *extra: str, env: dict[str, str] | None = None, settle: float = 3.0) -> int:
        if (pid := self.pid) is not None:
            return pid
        child_env = component_env(self.component, dict(os.environ if env is None else env))
        child_env["RAGBUS_INSTANCE_ID"] = instance_id_for(self.settings, self.slot)
        child_env.setdefault("HF_HUB_OFFLINE", "1")
        child_env.setdefault("TOKENIZERS_PARALLELISM", "false")
        child_env.setdefault("PYTHONUNBUFFERED", "1")
        proc = self._spawn([sys.executable, "-m", "cli.main", *self.component.args, *extra], env=child_env)
        deadline = time.monotonic() + settle
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self.pid_path.unlink(missing_ok=True)
                raise ServiceError(
                    f"{self.name} exited at start-up:\n{tail(self.log_path, 12)}", self.log_path
                )
            time.sleep(0.1)
        return proc.pid


def _components(names: list[str] | None) -> list[Component]:
    wanted = names or [c.name for c in COMPONENTS]
    unknown = [n for n in wanted if n not in BY_NAME]
    if unknown:
        raise ServiceError(f"unknown component(s) {', '.join(unknown)}; known: {', '.join(BY_NAME)}")
    return [BY_NAME[n] for n in wanted]


def slots_of(settings: Settings, component: Component) -> list[int]:
    """The slots of `component` with a pid file (slot 0 always, so a stopped one is shown too)."""
    found = {0}
    pattern = re.compile(rf"^{re.escape(component.name)}-(\d+)\.pid$")
    run = settings.home / "run"
    if run.is_dir():
        for path in run.iterdir():
            if m := pattern.match(path.name):
                found.add(int(m.group(1)))
    return sorted(found)


def backgrounds(
    settings: Settings, names: list[str] | None = None, instances: int | None = None
) -> list[Background]:
    """The instances of the named components (default all): slots 0..instances-1, or, without
    `instances`, every slot that has a pid file (what `stop` and `status` look at)."""
    out = []
    for component in _components(names):
        slots = range(instances) if instances is not None else slots_of(settings, component)
        out += [Background(settings, component, slot) for slot in slots]
    return out


def log_of(settings: Settings, name: str) -> Path:
    return settings.home / "logs" / f"{name}.log"
