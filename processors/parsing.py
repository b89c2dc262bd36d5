"""Documents to plain text: plain text, Markdown (markdown-it-py), HTML (the standard library's
streaming `html.parser`) and PDF (pypdf).

The output keeps the structure the chunker uses: paragraphs separated by a blank line,
headings and list items on lines of their own.

Every byte parsed here is untrusted, so each parser is one whose work grows linearly with its
input: markdown-it-py (a maintained CommonMark parser, no backtracking regexes) and a
`HTMLParser` subclass that never builds a tree (a 20,000-deep `<div>` nest costs what 20,000
siblings cost). Whatever still escapes that (a PDF that makes pypdf loop, an input we have not
thought of) is bounded by the parse pool (processors/parse_pool.py), which runs these functions
in worker processes it kills at a deadline.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from html.parser import HTMLParser
from typing import TYPE_CHECKING

from schemas import DocumentIngest

if TYPE_CHECKING:
    from markdown_it import MarkdownIt
    from markdown_it.token import Token


class ParseError(ValueError):
    """The document's bytes cannot be turned into text."""


@dataclass(frozen=True)
class ParsedDocument:
    text: str
    title: str | None = None
    pages: int | None = None


def parse(doc: DocumentIngest) -> ParsedDocument:
    """The text (and a title, when the document has one) of an upsert event."""
    return finish(doc, parse_content(doc.content_type, text=doc.text, data=doc.data))


def finish(doc: DocumentIngest, parsed: ParsedDocument) -> ParsedDocument:
    """The event's own title wins over the document's; a document without text is an error."""
    title = doc.title or parsed.title
    if not parsed.text.strip():
        raise ParseError(f"{doc.content_type} document has no text")
    return ParsedDocument(parsed.text, title.strip() if title else None, parsed.pages)


def parse_content(content_type: str, *, text: str | None = None, data: bytes | None = None) -> ParsedDocument:
    if content_type == "application/pdf":
        if data is None:
            raise ParseError("a PDF comes as bytes (`data`)")
        return parse_pdf(data)
    source = text if text is not None else _decode(data or b"")
    if content_type == "text/html":
        return parse_html(source)
    if content_type == "text/markdown":
        return parse_markdown(source)
    if content_type == "text/plain":
        return ParsedDocument(normalize(source))
    raise ParseError(f"unsupported content type {content_type!r}")


def _decode(data: bytes) -> str:
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ParseError(f"not UTF-8 text (byte {e.start}: {e.reason})") from None


_SPACES = re.compile(r"[ \t\f\v\u00a0]+")
_MANY_BLANKS = re.compile(r"\n{3,}")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f]")


def normalize(text: str) -> str:
    """Unix newlines, no control characters, single spaces inside lines, at most one blank line."""
    text = _CONTROL.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return _MANY_BLANKS.sub("\n\n", "\n".join(lines)).strip()


# --- Markdown ----------------------------------------------------------------------------------

_FRONT_MATTER = re.compile(r"\A---\n(.*?)\n---\n", re.S)
_markdown_parser: MarkdownIt | None = None


def _markdown() -> MarkdownIt:
    """CommonMark plus GFM tables and strikethrough; built once per process (a few ms)."""
    global _markdown_parser
    if _markdown_parser is None:
        from markdown_it import MarkdownIt

        # maxNesting bounds how deep blocks and inline markup nest; deeper content is kept as
        # plain text (inline) or dropped (blocks nested more than 32 deep: no real document).
        _markdown_parser = MarkdownIt("commonmark", {"maxNesting": 32}).enable(["table", "strikethrough"])
    return _markdown_parser


def parse_markdown(source: str) -> ParsedDocument:
    source = source.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
    title: str | None = None
    front = _FRONT_MATTER.match(source)
    if front:
        for line in front.group(1).split("\n"):
            key, _, value = line.partition(":")
            if key.strip().lower() == "title" and value.strip():
                title = value.strip().strip("\"'")
        source = source[front.end() :]
    out = _MarkdownText()
    out.render(_markdown().parse(source))
    return ParsedDocument(normalize("\n".join(out.lines)), title or out.first_h1)


class _MarkdownText:
    """Markdown tokens to lines: "" between blocks, a list item's marker in front of its text,
    a table row per line with its cells separated by spaces."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.first_h1: str | None = None
        self._marker: str | None = None  # the marker of a list item whose text is still to come
        self._lists = 0  # list nesting depth
        self._heading: str | None = None  # "h1".."h6" inside a heading
        self._cells: list[str] | None = None  # inside a table row

    def render(self, tokens: Sequence[Token]) -> None:
        for tok in tokens:
            kind = tok.type
            if kind == "inline":
                self._inline(inline_text(tok.children or ()))
            elif kind == "heading_open":
                self._heading = tok.tag
                self.lines.append("")
            elif kind == "heading_close":
                self._heading = None
                self.lines.append("")
            elif kind == "paragraph_close" and not tok.hidden:  # hidden: a tight list's item
                self.lines.append("")
            elif kind in ("bullet_list_open", "ordered_list_open"):
                if self._lists == 0:
                    self.lines.append("")
                self._lists += 1
            elif kind in ("bullet_list_close", "ordered_list_close"):
                self._lists -= 1
                if self._lists == 0:
                    self.lines.append("")
            elif kind == "list_item_open":
                self._marker = f"{tok.info}{tok.markup} " if tok.info else f"{tok.markup} "
            elif kind == "list_item_close":
                self._marker = None
            elif kind in ("fence", "code_block"):
                self._block(tok.content)
            elif kind == "html_block":
                self._block(parse_html(tok.content).text)
            elif kind == "tr_open":
                self._cells = []
            elif kind == "tr_close":
                self._emit(" ".join(c for c in self._cells or () if c))
                self._cells = None
            elif kind in ("hr", "table_open", "table_close", "blockquote_open", "blockquote_close"):
                self.lines.append("")

    def _inline(self, text: str) -> None:
        if self._cells is not None:
            self._cells.append(text.strip())
            return
        if self._heading == "h1" and self.first_h1 is None and text.strip():
            self.first_h1 = " ".join(text.split())
        self._emit(text)

    def _block(self, text: str) -> None:
        self.lines.append("")
        self._emit(text.rstrip("\n"))
        self.lines.append("")

    def _emit(self, text: str) -> None:
        if self._marker is not None:
            text, self._marker = self._marker + text, None
        self.lines.append(text)


def inline_text(children: Sequence[Token]) -> str:
    """The text of inline tokens: markup, link targets and inline HTML tags dropped, an image's
    alt text kept, line breaks kept as newlines."""
    parts: list[str] = []
    for tok in children:
        kind = tok.type
        if kind in ("text", "text_special", "code_inline"):
            parts.append(tok.content)
        elif kind in ("softbreak", "hardbreak"):
            parts.append("\n")
        elif kind == "image":
            parts.append(inline_text(tok.children or ()))
    return "".join(parts)


# --- HTML --------------------------------------------------------------------------------------

_DROP = frozenset(("script", "style", "noscript", "template", "svg", "canvas", "iframe", "head"))
_BLOCK = frozenset((
    "address", "article", "aside", "blockquote", "dd", "details", "div", "dl", "dt", "fieldset",
    "figcaption", "figure", "footer", "form", "h1", "h2", "h3", "h4", "h5", "h6", "header", "hr",
    "li", "main", "nav", "ol", "p", "pre", "section", "summary", "table", "tr", "ul", "caption",
))  # fmt: skip
_TITLE_CHARS = 2048  # more than any title index keeps (Milvus stores 1,024 bytes)


class _HtmlText(HTMLParser):
    """Text of an HTML document in one pass over its tags, keeping no tree: block elements
    become blank lines, `<br>` a newline, table cells are separated by a space, and the content
    of `_DROP` elements (scripts, styles, the head) is skipped. Collects the first `<title>` and
    the first `<h1>` for the document's title."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.title: list[str] = []
        self.h1: list[str] = []
        self._open_drops: dict[str, int] = {}  # open elements whose content is skipped, by tag
        self._dropping = 0
        self._in_title = self._title_done = False
        self._h1_depth = 0
        self._h1_done = False
        self._title_chars = self._h1_chars = 0  # collected so far (titles stop at _TITLE_CHARS)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _DROP:
            self._open_drops[tag] = self._open_drops.get(tag, 0) + 1
            self._dropping += 1
        elif tag == "body" and self._open_drops.get("head"):  # a head left open ends at the body
            self._dropping -= self._open_drops.pop("head")
        if tag == "title" and not self._title_done:
            self._in_title = True
        elif tag == "h1" and not self._h1_done:
            self._h1_depth += 1
        if self._dropping:
            return
        if tag == "br":
            self.parts.append("\n")
        elif tag in _BLOCK:
            self.parts.append("\n\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in _DROP:
            if self._open_drops.get(tag):
                self._open_drops[tag] -= 1
                self._dropping -= 1
            return
        if tag == "title" and self._in_title:
            self._in_title = False
            self._title_done = any(s.strip() for s in self.title)
        elif tag == "h1" and self._h1_depth:
            self._h1_depth -= 1
            self._h1_done = self._h1_depth == 0
        if self._dropping:
            return
        if tag in _BLOCK:
            self.parts.append("\n\n")
        elif tag in ("td", "th"):
            self.parts.append(" ")

    def handle_data(self, data: str) -> None:
        if self._in_title and self._title_chars < _TITLE_CHARS:
            self.title.append(data)
            self._title_chars += len(data)
        if self._h1_depth and self._h1_chars < _TITLE_CHARS:
            self.h1.append(data)
            self._h1_chars += len(data)
        if not self._dropping:
            self.parts.append(data)


def parse_html(source: str) -> ParsedDocument:
    extractor = _HtmlText()
    extractor.feed(source)
    extractor.close()
    title = " ".join(" ".join(extractor.title).split()) or " ".join(" ".join(extractor.h1).split())
    return ParsedDocument(normalize("".join(extractor.parts)), title[:_TITLE_CHARS] or None)


# --- PDF ---------------------------------------------------------------------------------------


def parse_pdf(data: bytes) -> ParsedDocument:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise ParseError("the PDF is encrypted with a password")
        pages = [page.extract_text() or "" for page in reader.pages]
        meta = reader.metadata
        title = meta.title if meta is not None and meta.title else None
    except ParseError:
        raise
    except (PdfReadError, ValueError, KeyError, TypeError, OSError) as e:
        raise ParseError(f"not a readable PDF: {type(e).__name__}: {e}") from None
    text = normalize("\n\n".join(pages))
    if not text:
        raise ParseError(f"the PDF has no extractable text ({len(pages)} pages; scanned images?)")
    return ParsedDocument(text, str(title) if title else None, len(pages))
