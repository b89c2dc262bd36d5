"""Parsing under a deadline and a memory budget that no document can escape.

A parser is a lot of code running over untrusted bytes: one input that makes it loop, recurse or
allocate without end must cost that one document, not the ingestion of every other. A thread
cannot be stopped, so parsing runs in a small pool of long-lived worker processes (`python -m
processors.parse_pool`), each fed one document at a time over its stdin/stdout pipes. A worker
that has not answered by the deadline is killed (SIGKILL) and replaced, and the document fails
with `ParseTimeout`; a worker runs under an address-space limit (RLIMIT_AS), so a document that
would take the host's memory fails with `ParseTooLarge` instead.

Workers are long-lived because starting one costs an interpreter and its imports (~0.3-0.7 s):
far more than parsing a typical document, which over the pipes costs about a millisecond more
than parsing in-process. The pool has as many workers as documents may be parsed at once;
a caller beyond that waits for a free worker, which takes at most one deadline.

Wire format, both directions: an 8-byte header (two big-endian uint32: the JSON part's length,
the body's length), a JSON object, then the body bytes. Requests carry the content type and
whether the body is the event's `text` (UTF-8, lone surrogates passed through) or its `data`;
replies carry the parsed document or the error, never anything the parent executes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import struct
import sys
import time
from pathlib import Path
from typing import Any

from processors.parsing import ParsedDocument, ParseError, finish, parse_content
from schemas import DocumentIngest

log = logging.getLogger(__name__)

_HEADER = struct.Struct(">II")
#: The project root, so that `python -m processors.parse_pool` finds this package in a worker.
_ROOT = str(Path(__file__).resolve().parent.parent)
#: How long a new worker may take to start and say it is ready.
_START_TIMEOUT_S = 60.0


class ParseTimeout(Exception):
    """The parser did not finish within the deadline; its worker process was killed."""

    #: The dead letter's `error_class` (infra/kafka/dlq.py reads the attribute).
    error_class = "parse_timeout"


class ParseTooLarge(ParseError):
    """Parsing the document needs more memory, or yields more text, than the budget allows."""

    error_class = "too_large"


class ParsePoolError(RuntimeError):
    """The pool cannot start its worker processes (or was closed)."""


class _Worker:
    """One worker process and its pipes."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        assert proc.stdin is not None and proc.stdout is not None
        self.stdin = proc.stdin
        self.stdout = proc.stdout

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    async def send(self, header: dict[str, Any], body: bytes) -> None:
        head = json.dumps(header).encode()
        self.stdin.write(_HEADER.pack(len(head), len(body)) + head)
        self.stdin.write(body)
        await self.stdin.drain()

    async def receive(self) -> tuple[dict[str, Any], bytes]:
        head_len, body_len = _HEADER.unpack(await self.stdout.readexactly(_HEADER.size))
        header = json.loads(await self.stdout.readexactly(head_len))
        body = await self.stdout.readexactly(body_len) if body_len else b""
        return header, body

    def kill(self) -> None:
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()

    async def reap(self) -> int | None:
        """Kill the process (when it still runs) and wait for it, so no zombie is left."""
        self.kill()
        with contextlib.suppress(Exception):
            return await asyncio.wait_for(self.proc.wait(), 10)
        return self.proc.returncode


class ParsePool:
    """`workers` parser processes, each document parsed within `timeout_s` and `memory_mb`."""

    def __init__(
        self, *, workers: int, timeout_s: float, memory_mb: int, max_text_chars: int, python: str = ""
    ) -> None:
        if workers < 1:
            raise ValueError("a parse pool needs at least one worker")
        self.workers = workers
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self.max_text_chars = max_text_chars
        self.python = python or sys.executable
        #: Workers killed at the deadline, workers lost otherwise (crashed, over the memory limit).
        self.timeouts = 0
        self.replaced = 0
        self._idle: asyncio.Queue[_Worker | None] = asyncio.Queue()  # None: the pool closed
        self._all: set[_Worker] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._start_lock = asyncio.Lock()
        self._started = False
        self._closed = False

    @property
    def pids(self) -> list[int]:
        """The worker processes running now."""
        return sorted(w.proc.pid for w in self._all if w.alive)

    async def start(self) -> None:
        """Start the workers (once; `parse` calls this itself). Raises ParsePoolError when a
        worker cannot start."""
        async with self._start_lock:
            if self._closed:
                raise ParsePoolError("the parse pool is closed")
            if self._started:
                return
            started = time.perf_counter()
            spawned = await asyncio.gather(
                *(self._spawn() for _ in range(self.workers)), return_exceptions=True
            )
            failures = [w for w in spawned if isinstance(w, BaseException)]
            for worker in spawned:
                if isinstance(worker, _Worker):
                    self._idle.put_nowait(worker)
            if failures:
                await self.close()
                raise ParsePoolError(f"cannot start the parser processes: {failures[0]}") from failures[0]
            self._started = True
            log.info(
                "parse pool: %d workers in %.2f s (deadline %.1f s, %d MB each)",
                self.workers,
                time.perf_counter() - started,
                self.timeout_s,
                self.memory_mb,
            )

    async def parse(self, doc: DocumentIngest) -> ParsedDocument:
        """The text and title of an upsert event, as `processors.parsing.parse` gives them."""
        return finish(doc, await self.parse_content(doc.content_type, text=doc.text, data=doc.data))

    async def parse_content(
        self, content_type: str, *, text: str | None = None, data: bytes | None = None
    ) -> ParsedDocument:
        """`processors.parsing.parse_content` in a worker. Raises ParseError (the document is
        unreadable), ParseTimeout or ParseTooLarge (it broke the budget)."""
        if not self._started:
            await self.start()
        if text is not None:
            header: dict[str, Any] = {"content_type": content_type, "body": "text"}
            body = text.encode("utf-8", "surrogatepass")
        else:
            header = {"content_type": content_type, "body": "data" if data is not None else "none"}
            body = data or b""
        worker = await self._acquire()
        keep = False
        try:
            try:
                async with asyncio.timeout(self.timeout_s):
                    await worker.send(header, body)
                    reply, out = await worker.receive()
            except TimeoutError:
                self.timeouts += 1
                log.warning(
                    "parse pool: worker %d still parsing a %s document of %d bytes after %.1f s: killed",
                    worker.proc.pid,
                    content_type,
                    len(body),
                    self.timeout_s,
                )
                raise ParseTimeout(
                    f"parse_timeout: the {content_type} document was not parsed within {self.timeout_s:g} s "
                    "(RAGBUS_PARSE_TIMEOUT_S); its parser was stopped"
                ) from None
            except (asyncio.IncompleteReadError, ConnectionError, BrokenPipeError) as e:
                code = await worker.reap()
                raise ParseError(
                    f"the parser process died while parsing this {content_type} document "
                    f"({_exit_reason(code)}; {type(e).__name__})"
                ) from None
            keep = not reply.get("retire", False)
            return self._result(reply, out)
        finally:
            if keep:
                self._idle.put_nowait(worker)
            else:
                self._replace(worker)

    def _result(self, reply: dict[str, Any], out: bytes) -> ParsedDocument:
        if not reply.get("ok"):
            message = str(reply.get("error") or "the parser failed")
            if reply.get("error_class") == ParseTooLarge.error_class:
                raise ParseTooLarge(message)
            raise ParseError(message)
        text = out.decode("utf-8", "surrogatepass")
        if len(text) > self.max_text_chars:
            raise ParseTooLarge(
                f"the document's text is {len(text):,} characters, over the limit of "
                f"{self.max_text_chars:,} (RAGBUS_PARSE_MAX_TEXT_CHARS)"
            )
        title = reply.get("title")
        pages = reply.get("pages")
        return ParsedDocument(
            text, title if isinstance(title, str) else None, pages if isinstance(pages, int) else None
        )

    async def close(self) -> None:
        """Stop every worker (idle ones end at the end of their stdin; busy ones are killed)."""
        self._closed = True
        self._idle.put_nowait(None)  # wakes whoever waits for a worker
        for task in list(self._tasks):
            task.cancel()
        workers = list(self._all)
        for worker in workers:
            with contextlib.suppress(Exception):
                worker.stdin.close()
        await asyncio.gather(*(self._stop(w) for w in workers), return_exceptions=True)
        self._all.clear()

    async def _stop(self, worker: _Worker) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(worker.proc.wait(), 2)
        await worker.reap()

    async def _acquire(self) -> _Worker:
        while True:
            worker = await self._idle.get()
            if worker is None or self._closed:
                self._idle.put_nowait(None)  # for the next one waiting
                raise ParsePoolError("the parse pool is closed")
            if worker.alive:
                return worker
            self._replace(worker)  # died while idle (e.g. killed from outside): not this document's fault

    def _replace(self, worker: _Worker) -> None:
        """Kill `worker` and start another in its place, in the background."""
        worker.kill()
        self._all.discard(worker)
        self.replaced += 1
        if self._closed:
            return
        task = asyncio.create_task(self._respawn(worker), name="parse-pool-respawn")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _respawn(self, old: _Worker) -> None:
        await old.reap()
        delay = 0.5
        while not self._closed:
            try:
                self._idle.put_nowait(await self._spawn())
                return
            except Exception:
                log.exception("parse pool: cannot start a parser process; retrying in %.1f s", delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    async def _spawn(self) -> _Worker:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, env.get("PYTHONPATH", "")) if p)
        proc = await asyncio.create_subprocess_exec(
            self.python,
            "-m",
            "processors.parse_pool",
            str(self.memory_mb),
            str(self.max_text_chars),
            str(os.getpid()),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
            start_new_session=True,  # a Ctrl-C meant for the service is the service's to pass on
        )
        worker = _Worker(proc)
        self._all.add(worker)
        try:
            reply, _ = await asyncio.wait_for(worker.receive(), _START_TIMEOUT_S)
        except (TimeoutError, asyncio.IncompleteReadError, ValueError) as e:
            code = await worker.reap()
            self._all.discard(worker)
            raise ParsePoolError(f"a parser process did not start ({_exit_reason(code)}): {e!r}") from None
        if not reply.get("ready"):
            await worker.reap()
            self._all.discard(worker)
            raise ParsePoolError(f"a parser process did not start: {reply}")
        if self._closed:
            await worker.reap()
            raise ParsePoolError("the parse pool is closed")
        return worker


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


# --- the worker process ------------------------------------------------------------------------


def _limit_memory(memory_mb: int) -> None:
    """Cap this process's address space, so an allocation beyond it is a MemoryError here."""
    if memory_mb <= 0:
        return
    try:
        import resource

        limit = memory_mb * 1024 * 1024
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ImportError, ValueError, OSError) as e:  # not on this platform: the deadline still holds
        print(f"parse worker: no memory limit ({e})", file=sys.stderr)


def _read_exact(stream: Any, size: int) -> bytes | None:
    data = stream.read(size)
    if len(data) < size:
        return None
    return data


def _die_with(parent: int) -> None:
    """Linux: be killed when the pool's process dies, even in the middle of a parse that never
    ends (otherwise the end of stdin is only noticed between documents)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError) as e:
        print(f"parse worker: not tied to its parent's life ({e})", file=sys.stderr)
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(0)


def _handle(header: dict[str, Any], body: bytes, max_text_chars: int) -> tuple[dict[str, Any], bytes]:
    content_type = str(header.get("content_type"))
    kind = header.get("body")
    text = body.decode("utf-8", "surrogatepass") if kind == "text" else None
    data = body if kind == "data" else None
    try:
        parsed = parse_content(content_type, text=text, data=data)
    except ParseError as e:
        return {"ok": False, "error": str(e)}, b""
    except MemoryError:
        return {
            "ok": False,
            "error_class": ParseTooLarge.error_class,
            "error": "parsing the document needs more memory than the parser's budget "
            "(RAGBUS_PARSE_MEMORY_MB)",
            "retire": True,  # the heap may be in a sorry state: start a fresh worker
        }, b""
    except RecursionError:
        return {"ok": False, "error": "the document nests too deeply to parse"}, b""
    except Exception as e:  # noqa: BLE001 - a parser bug on one document is that document's error
        return {"ok": False, "error": f"parsing failed: {type(e).__name__}: {e}"[:2000]}, b""
    if max_text_chars and len(parsed.text) > max_text_chars:
        return {
            "ok": False,
            "error_class": ParseTooLarge.error_class,
            "error": f"the document's text is {len(parsed.text):,} characters, over the limit of "
            f"{max_text_chars:,} (RAGBUS_PARSE_MAX_TEXT_CHARS)",
        }, b""
    reply = {"ok": True, "title": parsed.title, "pages": parsed.pages}
    return reply, parsed.text.encode("utf-8", "surrogatepass")


def serve(memory_mb: int, max_text_chars: int, parent: int) -> None:
    """Answer parse requests on stdin/stdout until stdin ends (the pool closed or its process died)."""
    _die_with(parent)
    logging.basicConfig(level=logging.WARNING, format=f"parse worker {os.getpid()}: %(name)s: %(message)s")
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # a stray print must not corrupt the replies
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the pool stops its workers itself
    from processors.parsing import _markdown

    _markdown()  # the first Markdown document should not pay for the imports
    _limit_memory(memory_mb)

    def reply(header: dict[str, Any], body: bytes = b"") -> None:
        head = json.dumps(header).encode()
        stdout.write(_HEADER.pack(len(head), len(body)) + head + body)
        stdout.flush()

    reply({"ready": True, "pid": os.getpid()})
    while True:
        raw = _read_exact(stdin, _HEADER.size)
        if raw is None:
            return
        head_len, body_len = _HEADER.unpack(raw)
        head = _read_exact(stdin, head_len)
        body = _read_exact(stdin, body_len) if body_len else b""
        if head is None or body is None:
            return
        header, out = _handle(json.loads(head), body, max_text_chars)
        reply(header, out)
        if header.get("retire"):
            return


if __name__ == "__main__":
    memory, chars, parent_pid = (int(arg) for arg in sys.argv[1:4])
    serve(memory, chars, parent_pid)
