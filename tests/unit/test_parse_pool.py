"""The parse pool gives what in-process parsing gives, and holds its budget: a document that takes
longer than the deadline fails with parse_timeout and its worker process is killed and replaced,
one that yields too much text or needs too much memory fails with too_large, and none of that
holds up the documents parsed next to it. Real worker processes, real documents."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator

import pytest

from processors.parse_pool import ParsePool, ParseTimeout, ParseTooLarge
from processors.parsing import ParseError, parse_content
from schemas import DocumentIngest
from tests.pdfgen import make_pdf

HANDBOOK = "# Handbook\n\nBook **economy** flights via the [portal](https://x.example).\n\n- one\n- two\n"


def slow_markdown() -> str:
    """A real document that takes markdown-it-py far longer than the test deadlines (a table of
    5,000 columns and 100 rows: 500,000 cells, ~30 s in-process)."""
    cols = 5000
    return "|a" * cols + "\n" + "|-" * cols + "\n" + ("|x" * cols + "\n") * 100


def pool(**overrides: float) -> ParsePool:
    options: dict = {"workers": 2, "timeout_s": 10.0, "memory_mb": 1024, "max_text_chars": 1_000_000}
    options.update(overrides)
    return ParsePool(**options)


@pytest.fixture
async def parser() -> AsyncIterator[ParsePool]:
    p = pool(timeout_s=1.0)
    await p.start()
    try:
        yield p
    finally:
        await p.close()


async def test_the_pool_parses_like_the_process_does(parser: ParsePool) -> None:
    pdf = make_pdf([["Refunds take five days."]], title="Refunds")
    for content_type, text, data in [
        ("text/markdown", HANDBOOK, None),
        ("text/html", "<title>T</title><p>a<br>b</p>", None),
        ("text/plain", "caf\u00e9 \ud800 lone surrogate", None),
        ("text/plain", None, "caf\u00e9".encode()),
        ("application/pdf", None, pdf),
    ]:
        assert await parser.parse_content(content_type, text=text, data=data) == parse_content(
            content_type, text=text, data=data
        )
    doc = DocumentIngest(
        tenant_id="t", doc_id="d", content_type="text/markdown", text=HANDBOOK, title="Given"
    )
    assert (await parser.parse(doc)).title == "Given"


async def test_unreadable_documents_are_parse_errors(parser: ParsePool) -> None:
    with pytest.raises(ParseError, match="not a readable PDF"):
        await parser.parse_content("application/pdf", data=b"%PDF-1.7 garbage")
    with pytest.raises(ParseError, match="UTF-8"):
        await parser.parse_content("text/plain", data=b"\xff\xfe\xfa")
    with pytest.raises(ParseError, match="no text"):
        await parser.parse(DocumentIngest(tenant_id="t", doc_id="d", text=" \n "))
    assert parser.timeouts == 0 and parser.replaced == 0


async def test_a_document_over_the_deadline_is_killed_and_the_next_one_parses(parser: ParsePool) -> None:
    before = set(parser.pids)
    started = time.perf_counter()
    with pytest.raises(ParseTimeout, match=r"^parse_timeout: ") as info:
        await parser.parse_content("text/markdown", text=slow_markdown())
    print(f"timed out after {time.perf_counter() - started:.2f} s (deadline 1 s)")
    assert info.value.error_class == "parse_timeout"
    assert parser.timeouts == 1
    # The worker that was parsing is gone; the pool is back to two workers and parses on.
    assert (await parser.parse_content("text/markdown", text=HANDBOOK)).title == "Handbook"
    for _ in range(300):  # the replacement starts in the background
        if len(parser.pids) == 2:
            break
        await asyncio.sleep(0.1)
    assert len(parser.pids) == 2 and len(set(parser.pids) - before) == 1


async def test_a_slow_document_holds_up_no_other(parser: ParsePool) -> None:
    finished: list[str] = []

    async def parse(name: str, text: str) -> None:
        with contextlib.suppress(ParseTimeout):
            await parser.parse_content("text/markdown", text=text)
        finished.append(name)

    await asyncio.gather(parse("slow", slow_markdown()), parse("normal", HANDBOOK), parse("next", HANDBOOK))
    assert finished == ["normal", "next", "slow"]


async def test_a_document_beyond_the_text_or_memory_budget_is_too_large() -> None:
    small = pool(workers=1, memory_mb=200, max_text_chars=100_000_000)
    try:
        # 21 MB of two-letter lines: 7 million line objects (~350 MB) while normalizing.
        with pytest.raises(ParseTooLarge, match="more memory") as info:
            await small.parse_content("text/plain", text="ab\n" * 7_000_000)
        assert info.value.error_class == "too_large"
        assert (await small.parse_content("text/plain", text="fine")).text == "fine"
        assert small.replaced == 1  # the worker that ran out of memory was not reused
    finally:
        await small.close()
    capped = pool(workers=1, max_text_chars=1000)
    try:
        with pytest.raises(ParseTooLarge, match="over the limit of 1,000"):
            await capped.parse_content("text/plain", text="word " * 1000)
        assert capped.replaced == 0
    finally:
        await capped.close()


async def test_a_worker_that_dies_is_replaced(parser: ParsePool) -> None:
    for pid in parser.pids:
        os.kill(pid, signal.SIGKILL)
    await asyncio.sleep(0.2)
    assert (await parser.parse_content("text/plain", text="still here")).text == "still here"


async def test_closing_stops_every_worker() -> None:
    p = pool()
    await p.start()
    pids = p.pids
    assert len(pids) == 2
    await p.close()
    assert p.pids == []
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


async def test_pool_overhead_per_document() -> None:
    """Not a threshold test: prints what a document costs through the pool versus in-process."""
    docs = [
        f"# Doc {i}\n\nParagraph {i} with **some** text and a [link](u).\n\n- a\n- b\n" for i in range(200)
    ]
    p = pool()
    await p.start()
    try:
        started = time.perf_counter()
        for text in docs:
            parse_content("text/markdown", text=text)
        local = time.perf_counter() - started
        started = time.perf_counter()
        for text in docs:
            await p.parse_content("text/markdown", text=text)
        sequential = time.perf_counter() - started
        started = time.perf_counter()
        await asyncio.gather(*(p.parse_content("text/markdown", text=text) for text in docs))
        concurrent = time.perf_counter() - started
    finally:
        await p.close()
    print(
        f"200 small Markdown documents: in-process {local * 1000:.0f} ms, pool one at a time "
        f"{sequential * 1000:.0f} ms, pool all at once {concurrent * 1000:.0f} ms "
        f"(+{(sequential - local) / 200 * 1000:.2f} ms per document one at a time)"
    )
    assert p.timeouts == 0
