"""Documents to plain text: plain text, Markdown, HTML (beautifulsoup4) and PDF (pypdf).

The output keeps the structure the chunker uses: paragraphs separated by a blank line,
headings and list items on lines of their own.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

from schemas import DocumentIngest


class ParseError(ValueError):
    """The document's bytes cannot be turned into text."""


@dataclass(frozen=True)
class ParsedDocument:
    text: str
    title: str | None = None
    pages: int | None = None


def parse(doc: DocumentIngest) -> ParsedDocument:
    """The text (and a title, when the document has one) of an upsert event."""
    parsed = parse_content(doc.content_type, text=doc.text, data=doc.data)
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


def normalize(text: str) -> str:
    """Unix newlines, no control characters, single spaces inside lines, at most one blank line."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\x00", "")
    text = "".join(ch for ch in text if ch in "\n\t" or ch >= " " or ch == "\u00a0")
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return _MANY_BLANKS.sub("\n\n", "\n".join(lines)).strip()


# --- Markdown ----------------------------------------------------------------------------------

_FRONT_MATTER = re.compile(r"\A---\n(.*?)\n---\n", re.S)
_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_SETEXT = re.compile(r"^\s{0,3}(=+|-+)\s*$")
_IMAGE = re.compile(r"!\[([^\]]*)\]\([^)]*\)")
_LINK = re.compile(r"\[([^\]]+)\]\([^)]*\)")
_REF_LINK = re.compile(r"\[([^\]]+)\]\[[^\]]*\]")
_LINK_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s+\S+.*$")
_EMPHASIS = re.compile(r"(\*\*|__|\*|_|~~)(?=\S)(.+?)(?<=\S)\1")
_CODE = re.compile(r"`([^`]*)`")
_TABLE_RULE = re.compile(r"^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$")
_HTML_TAG = re.compile(r"</?[A-Za-z][^>]*>")
_BLOCKQUOTE = re.compile(r"^\s{0,3}>\s?")
_HRULE = re.compile(r"^\s{0,3}([-*_])(\s*\1){2,}\s*$")


def parse_markdown(source: str) -> ParsedDocument:
    source = source.replace("\r\n", "\n").replace("\r", "\n")
    title: str | None = None
    front = _FRONT_MATTER.match(source)
    if front:
        for line in front.group(1).split("\n"):
            key, _, value = line.partition(":")
            if key.strip().lower() == "title" and value.strip():
                title = value.strip().strip("\"'")
        source = source[front.end() :]
    out: list[str] = []
    in_fence = False
    for line in source.split("\n"):
        if _FENCE.match(line):
            in_fence = not in_fence
            out.append("")
            continue
        if in_fence:
            out.append(line)
            continue
        if _LINK_DEF.match(line) or ("|" in line and _TABLE_RULE.match(line)):
            continue
        if _HRULE.match(line):
            out.append("")
            continue
        if _SETEXT.match(line) and out and out[-1].strip():
            if title is None and line.strip().startswith("="):
                title = out[-1].strip()
            out.insert(len(out) - 1, "")  # the previous line was a heading: keep it a block of its own
            out.append("")
            continue
        heading = _HEADING.match(line)
        if heading:
            text = _inline(heading.group(2))
            if title is None and len(heading.group(1)) == 1:
                title = text
            out.extend(["", text, ""])
            continue
        line = _BLOCKQUOTE.sub("", line)
        if line.lstrip().startswith("|"):
            line = " ".join(cell.strip() for cell in line.strip().strip("|").split("|"))
        out.append(_inline(line))
    return ParsedDocument(normalize("\n".join(out)), title)


def _inline(text: str) -> str:
    text = _IMAGE.sub(r"\1", text)
    text = _LINK.sub(r"\1", text)
    text = _REF_LINK.sub(r"\1", text)
    text = _CODE.sub(r"\1", text)
    for _ in range(2):  # nested emphasis, e.g. ***bold italic***
        text = _EMPHASIS.sub(r"\2", text)
    return _HTML_TAG.sub("", text)


# --- HTML --------------------------------------------------------------------------------------

_DROP = ("script", "style", "noscript", "template", "svg", "canvas", "iframe", "head")
_BLOCK = (
    "address", "article", "aside", "blockquote", "dd", "details", "div", "dl", "dt", "fieldset",
    "figcaption", "figure", "footer", "form", "h1", "h2", "h3", "h4", "h5", "h6", "header", "hr",
    "li", "main", "nav", "ol", "p", "pre", "section", "summary", "table", "tr", "ul", "caption",
)  # fmt: skip


def parse_html(source: str) -> ParsedDocument:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(source, "html.parser")
    title: str | None = None
    if soup.title and soup.title.get_text(strip=True):
        title = soup.title.get_text(" ", strip=True)
    else:
        h1 = soup.find("h1")
        if h1 is not None and h1.get_text(strip=True):
            title = h1.get_text(" ", strip=True)
    for tag in soup.find_all(_DROP):
        tag.decompose()
    for br in soup.find_all("br"):
        br.replace_with("\n")
    for cell in soup.find_all(("td", "th")):
        cell.insert_after(" ")
    for block in soup.find_all(_BLOCK):
        block.insert_before("\n\n")
        block.insert_after("\n\n")
    return ParsedDocument(normalize(soup.get_text()), title)


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
