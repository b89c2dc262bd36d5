"""Several models served at once: which engine answers a request, and reloading that table.

A request that names a model gets that model (or an `unknown_model` error); one that names none is
routed by the weighted route table (e.g. 90/10 for a canary), deterministically by request id so a
replay after a crash goes to the same model. A reload loads the new engines first, then swaps the
table between two batches; engines that left the table close once their last batch finished, so no
request in flight is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from inference_workers.config import ModelSpec, ModelTable, load_table
from inference_workers.engines.base import Engine
from inference_workers.engines.registry import build_engine
from infra.settings import Settings

log = logging.getLogger(__name__)

EngineFactory = Callable[[ModelSpec, Settings], Engine]


@dataclass
class ReloadResult:
    changed: bool
    added: list[str]
    removed: list[str]
    replaced: list[str]
    source: str


class Router:
    def __init__(
        self,
        settings: Settings,
        *,
        factory: EngineFactory = build_engine,
        loader: Callable[[Settings], ModelTable] = load_table,
        shared: dict[str, Engine] | None = None,
    ) -> None:
        """`shared`: engines started by the caller (e.g. a test session), used for models of the
        same name and backend and never closed here."""
        self.settings = settings
        self._factory = factory
        self._loader = loader
        self._shared = dict(shared or {})
        self.table: ModelTable | None = None
        self.engines: dict[str, Engine] = {}
        self._specs: dict[str, ModelSpec] = {}
        self._users: dict[int, int] = {}
        self._retired: list[Engine] = []
        self._reload_lock = asyncio.Lock()

    async def start(self) -> None:
        await self.reload()

    async def close(self) -> None:
        for engine in [*self.engines.values(), *self._retired]:
            await self._close(engine)
        self.engines.clear()
        self._retired.clear()

    def route(self, requested: str | None, request_id: str) -> tuple[str, Engine] | None:
        """The (model name, engine) for a request; None when it names an unknown model."""
        assert self.table is not None, "Router.start() first"
        name = self.table.route(requested, request_id)
        if name is None or name not in self.engines:
            return None
        return name, self.engines[name]

    @contextlib.asynccontextmanager
    async def using(self, engine: Engine) -> AsyncIterator[Engine]:
        """Hold `engine` open for a batch (a reload retires it only after)."""
        key = id(engine)
        self._users[key] = self._users.get(key, 0) + 1
        try:
            yield engine
        finally:
            self._users[key] -= 1
            if self._users[key] == 0:
                del self._users[key]
                if engine in self._retired:
                    self._retired.remove(engine)
                    await self._close(engine)

    async def reload(self, guard: asyncio.Lock | None = None) -> ReloadResult:
        """Re-read the models and routes; start new engines, then swap them in while holding
        `guard` (the worker's batch lock: the swap waits for the batch in flight)."""
        async with self._reload_lock:
            table = self._loader(self.settings)
            if self.table is not None and table.fingerprint == self.table.fingerprint:
                return ReloadResult(False, [], [], [], table.source)
            keep = {n: e for n, e in self.engines.items() if self._specs.get(n) == table.models.get(n)}
            fresh: dict[str, Engine] = {}
            try:
                for name, spec in table.models.items():
                    if name in keep:
                        continue
                    engine = self._engine_for(spec)
                    await engine.start()
                    fresh[name] = engine
            except BaseException:
                for engine in fresh.values():
                    await self._close(engine)
                raise
            async with guard if guard is not None else contextlib.AsyncExitStack():
                old = self.engines
                self.engines = {**keep, **fresh}
                self._specs = dict(table.models)
                previous, self.table = self.table, table
                gone = [e for n, e in old.items() if n not in keep]
                for engine in gone:
                    if self._users.get(id(engine)):
                        self._retired.append(engine)  # closed when its batch ends
                    else:
                        await self._close(engine)
            result = ReloadResult(
                changed=True,
                added=[n for n in fresh if n not in old],
                removed=[n for n in old if n not in table.models],
                replaced=[n for n in fresh if n in old],
                source=table.source,
            )
            if previous is not None:
                log.info(
                    "models reloaded from %s: routes %s; added %s, removed %s, replaced %s",
                    table.source,
                    dict(table.routes),
                    result.added,
                    result.removed,
                    result.replaced,
                )
            else:
                log.info("models from %s: %s; routes %s", table.source, table.names(), dict(table.routes))
            return result

    def _engine_for(self, spec: ModelSpec) -> Engine:
        shared = self._shared.get(spec.name)
        if shared is not None and shared.backend == spec.backend:
            return shared
        return self._factory(spec, self.settings)

    async def _close(self, engine: Engine) -> None:
        if engine in self._shared.values():
            return
        try:
            await engine.close()
        except Exception:
            log.exception("closing engine %s failed", engine.name)
