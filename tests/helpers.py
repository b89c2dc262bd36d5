"""Helpers shared by integration tests: read a topic to its end, wait for conditions."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from infra.kafka.clients import make_consumer, topic_partitions
from infra.kafka.codec import decode_record
from infra.procs import free_port
from infra.settings import Settings
from schemas import EventBase

E = TypeVar("E", bound=EventBase)


async def read_topic(settings: Settings, topic: str, *, timeout: float = 10.0) -> list[Any]:
    """Every committed record of `topic`, from the beginning to its current end."""
    consumer = make_consumer(settings, group_id=None, fetch_max_wait_ms=100)
    await consumer.start()
    try:
        try:
            tps = await topic_partitions(settings, consumer, [topic])
        except LookupError:
            return []  # a topic nobody has created holds no records
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        out: list[Any] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            positions = [await consumer.position(tp) for tp in tps]
            if all(pos >= ends[tp] for pos, tp in zip(positions, tps, strict=True)):
                break
            batch = await consumer.getmany(*tps, timeout_ms=200)
            for recs in batch.values():
                out.extend(recs)
        return sorted(out, key=lambda r: (r.partition, r.offset))
    finally:
        await consumer.stop()


async def read_events(settings: Settings, topic: str, model: type[E], *, timeout: float = 10.0) -> list[E]:
    return [
        decode_record(r, model, max_bytes=1 << 30) for r in await read_topic(settings, topic, timeout=timeout)
    ]


async def wait_for(
    check: Callable[[], Awaitable[Any]],
    *,
    timeout: float = 60.0,
    interval: float = 0.25,
    what: str = "condition",
) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


def env_for(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment that makes a child process build the same Settings (RAGBUS_* variables)."""
    from pydantic import SecretStr

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAGBUS_")}
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if value is None:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        elif isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, dict | list):
            value = json.dumps(value)
        env[f"RAGBUS_{name.upper()}"] = str(value)
    env.update(extra)
    return env


def spawn(args: list[str], settings: Settings, log_path: Any, **extra_env: str) -> Any:
    """Start `ragbus <args>` as a child process (its own process group) logging to `log_path`.

    SIGINT is reset to its default in the child: a test run started in the background by a
    non-interactive shell (as a CI script may be) inherits SIGINT ignored, and Python then never
    turns the tests' SIGINT into the KeyboardInterrupt a user's Ctrl-C gives."""
    import signal
    import subprocess
    import sys

    out = open(log_path, "ab")  # noqa: SIM115 - closed with the process by the caller's kill/wait
    return subprocess.Popen(
        [sys.executable, "-m", "cli.main", *args],
        env=env_for(settings, **extra_env),
        stdout=out,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


async def run_ragbus(settings: Settings, *args: str, timeout: float = 300) -> tuple[int, str, str]:
    """Run `ragbus <args>` as a child process without blocking the event loop: (code, out, err)."""
    import sys

    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cli.main",
        *args,
        env=env_for(settings),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@contextlib.asynccontextmanager
async def serve_app(app: Any) -> AsyncIterator[str]:
    """Serve an ASGI app with uvicorn on a free loopback port for the block; its base URL."""
    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    for _ in range(300):
        if server.started or task.done():
            break
        await asyncio.sleep(0.1)
    assert server.started, "the app did not start"
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)


def stack_env(home: Any, *, drop: tuple[str, ...] = (), **extra: str) -> dict[str, str]:
    """The environment for a `ragbus up` of its own: this process's variables less RAGBUS_* (and
    `drop`), a home of its own and free ports, so it never meets the session's services."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAGBUS_") and k not in drop}
    env.update(
        RAGBUS_HOME=str(home),
        RAGBUS_KAFKA_PORT=str(free_port()),
        RAGBUS_KAFKA_CONTROLLER_PORT=str(free_port()),
        RAGBUS_PG_PORT=str(free_port()),
        RAGBUS_KAFKA_HEAP="512m",
        COLUMNS="200",
    )
    env.update(extra)
    return env
