"""How every long-running component runs, written once: logs labelled with the component,
telemetry, SIGINT/SIGTERM turned into a stop event the component drains on, and the event loop.

The CLI only parses arguments and hands its component's `serve(stop)` coroutine here (the way
quix-streams' Application owns signals and shutdown), so the processors, the worker and the audit
sink cannot drift apart in how they start and stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Iterable

from infra.logs import setup_logging
from infra.settings import Settings
from infra.telemetry import setup_telemetry

Serve = Callable[[asyncio.Event], Awaitable[None]]


def run_component(name: str, settings: Settings, serve: Serve, *, quiet: Iterable[str] = ()) -> None:
    """Run `serve(stop)` until it returns; `stop` is set on SIGINT or SIGTERM.

    `quiet` names loggers kept at WARNING or above (libraries that log per batch at INFO).
    """
    setup_logging(settings.log_level, component=name)
    for noisy in quiet:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    setup_telemetry(settings, name)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        await serve(stop)

    asyncio.run(main())
