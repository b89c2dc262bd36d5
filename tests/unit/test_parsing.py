"""Each supported content type becomes clean text with its structure (paragraphs, headings, list
items on lines of their own) and a title when the document has one."""

from __future__ import annotations

import time

import pytest

from processors.parsing import ParseError, parse, parse_content
from schemas import DocumentIngest
from tests.pdfgen import make_pdf


def test_plain_text_is_normalized() -> None:
    doc = parse_content("text/plain", text="Line  one\r\nline\ttwo\x00\n\n\n\nNext   paragraph  ")
    assert doc.text == "Line one\nline two\n\nNext paragraph"
    assert doc.title is None


def test_markdown_loses_markup_but_keeps_structure() -> None:
    source = """---
title: "Travel policy"
---
# Travel

Book **economy** flights via the [portal](https://travel.example.com).
Use `code` TRV-7 and see ![the map](map.png).

| Class | Allowed |
|-------|---------|
| Economy | yes |

```
literal block
```
- first item
- second *item*
"""
    doc = parse_content("text/markdown", text=source)
    assert doc.title == "Travel policy"
    assert doc.text.splitlines() == [
        "Travel",
        "",
        "Book economy flights via the portal.",
        "Use code TRV-7 and see the map.",
        "",
        "Class Allowed",
        "Economy yes",
        "",
        "literal block",
        "",
        "- first item",
        "- second item",
    ]


def test_markdown_title_falls_back_to_the_first_h1() -> None:
    assert parse_content("text/markdown", text="intro\n\n# Handbook\n\ntext").title == "Handbook"


def test_html_keeps_blocks_apart_and_inline_text_together() -> None:
    source = """<html><head><title>Office hours</title><style>p{color:red}</style></head>
    <body><nav>menu</nav><h1>Hours</h1><p>We open at <b>8:00</b> and close<br>at 18:00.</p>
    <script>alert(1)</script><ul><li>Mon</li><li>Tue</li></ul>
    <table><tr><td>Sat</td><td>closed</td></tr></table></body></html>"""
    doc = parse_content("text/html", text=source)
    assert doc.title == "Office hours"
    assert "alert" not in doc.text and "color" not in doc.text
    lines = [line for line in doc.text.splitlines() if line]
    assert lines == ["menu", "Hours", "We open at 8:00 and close", "at 18:00.", "Mon", "Tue", "Sat closed"]


def test_pdf_text_and_title_come_out() -> None:
    data = make_pdf([["Refunds take five days.", "Ask finance."], ["Second page."]], title="Refunds")
    doc = parse_content("application/pdf", data=data)
    assert doc.title == "Refunds"
    assert doc.pages == 2
    assert "Refunds take five days." in doc.text and "Second page." in doc.text


def test_broken_pdf_is_a_parse_error() -> None:
    with pytest.raises(ParseError, match="PDF"):
        parse_content("application/pdf", data=b"%PDF-1.4 this is not really a pdf")


def test_a_pdf_without_text_is_a_parse_error() -> None:
    with pytest.raises(ParseError, match="no extractable text"):
        parse_content("application/pdf", data=make_pdf([[]]))


def test_bytes_that_are_not_utf8_are_a_parse_error() -> None:
    with pytest.raises(ParseError, match="UTF-8"):
        parse_content("text/plain", data=b"\xff\xfe\xfa")


def test_parse_prefers_the_event_title_and_rejects_empty_documents() -> None:
    doc = DocumentIngest(
        tenant_id="t", doc_id="d", content_type="text/markdown", text="# H\n\nx", title="Given"
    )
    assert parse(doc).title == "Given"
    with pytest.raises(ParseError, match="no text"):
        parse(DocumentIngest(tenant_id="t", doc_id="d", text="  \n "))


def test_markdown_lists_quotes_entities_and_inline_html() -> None:
    source = """Handbook
========

Intro with a [ref link][r], snake_case_name, &amp; \\*stars\\*.

[r]: https://example.com

> Quoted text
> continues.

1. first
2. second
   - nested <b>bold</b>

<div class="note">A <i>raw</i> HTML block</div>
"""
    doc = parse_content("text/markdown", text=source)
    assert doc.title == "Handbook"
    assert doc.text.splitlines() == [
        "Handbook",
        "",
        "Intro with a ref link, snake_case_name, & *stars*.",
        "",
        "Quoted text",
        "continues.",
        "",
        "1. first",
        "2. second",
        "- nested bold",
        "",
        "A raw HTML block",
    ]


def test_html_with_a_head_left_open_keeps_its_body() -> None:
    doc = parse_content("text/html", text="<head><title>T</title><body><p>a &amp; b</p><h1>H <i>1</i></h1>")
    assert doc.title == "T"
    assert doc.text == "a & b\n\nH 1"
    assert parse_content("text/html", text="<p>x</p><h1>First <b>heading</b></h1><h1>2</h1>").title == (
        "First heading"
    )


# Inputs that made the old parsers (BeautifulSoup's tree, backtracking emphasis regexes) take
# tens of seconds; the streaming parsers take milliseconds. The bound asserted is loose (a slow
# shared CI machine), the time measured is printed (pytest -s).
BOMBS = {
    "html-div-nest-20000": ("text/html", "<div>" * 20_000 + "deep" + "</div>" * 20_000),
    "markdown-star-a-8000": ("text/markdown", "*a " * 8000),
    "html-unclosed-h1-and-divs": ("text/html", "<h1>" + "<div>x" * 20_000),
    "markdown-brackets": ("text/markdown", "[" * 20_000 + "a"),
    "markdown-quote-nest": ("text/markdown", ">" * 20_000 + " deep"),
}


@pytest.mark.parametrize("name", BOMBS)
def test_parser_bombs_parse_quickly(name: str) -> None:
    content_type, source = BOMBS[name]
    started = time.perf_counter()
    doc = parse_content(content_type, text=source)
    elapsed = time.perf_counter() - started
    print(f"{name}: {len(source):,} chars parsed in {elapsed * 1000:.0f} ms")
    assert elapsed < 5.0
    assert len(doc.title or "") <= 2048
