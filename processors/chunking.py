"""Token-aware chunking that keeps sentences whole.

The text is cut into units (sentences; headings and list items count as units of their own),
each unit's length is measured in the embedding model's tokens, and units are packed greedily
into chunks of at most `max_tokens`. Consecutive chunks share up to `overlap_tokens` of whole
sentences. A single sentence longer than a chunk is the only thing ever cut mid-sentence: into
token windows that overlap by `overlap_tokens`.

Chunk text is an exact slice of the document text, so offsets point back into the source.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable
from dataclasses import dataclass

Span = tuple[int, int]
#: Character span of each token of a text, in order (from the model's tokenizer).
Tokenize = Callable[[str], list[Span]]

#: Words that end with a period without ending the sentence.
_ABBREVIATIONS = frozenset(
    (
        *("e.g", "i.e", "etc", "vs", "mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr", "inc", "ltd"),
        *("co", "corp", "no", "nos", "fig", "figs", "approx", "dept", "est", "cf", "al", "resp"),
        *("ca", "min", "max", "sec", "art", "vol", "pp", "ed", "eds", "rev", "gen", "col", "lt"),
    )
)
_BOUNDARY = re.compile(r"[.!?\u2026]+[\"'\u201d\u2019)\]]*\s+")
_NEXT_STARTS_SENTENCE = re.compile(r"[\"'\u201c\u2018(\[]*[A-Z0-9\u00c0-\u00dd]")
_BLOCK_SPLIT = re.compile(r"\n[ \t]*\n")
_OWN_LINE = re.compile(r"\s*([-*+\u2022]\s|\d{1,3}[.)]\s|#{1,6}\s|\||>)")


@dataclass(frozen=True)
class Chunk:
    index: int
    text: str
    start: int
    end: int
    tokens: int


def sentence_spans(text: str) -> list[Span]:
    """Spans of the sentence-like units of `text`, whitespace trimmed, in order."""
    units: list[Span] = []
    for block_start, block_end in _split(text, _BLOCK_SPLIT, 0, len(text)):
        for line_start, line_end in _lines(text, block_start, block_end):
            units.extend(_sentences(text, line_start, line_end))
    return units


def _split(text: str, pattern: re.Pattern[str], start: int, end: int) -> list[Span]:
    spans, pos = [], start
    for m in pattern.finditer(text, start, end):
        spans.append((pos, m.start()))
        pos = m.end()
    spans.append((pos, end))
    return [s for s in (_trim(text, a, b) for a, b in spans) if s is not None]


def _trim(text: str, start: int, end: int) -> Span | None:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return (start, end) if end > start else None


def _lines(text: str, start: int, end: int) -> list[Span]:
    """A block's lines, joined where a line just continues the previous one's prose."""
    out: list[Span] = []
    pos = start
    while pos < end:
        nl = text.find("\n", pos, end)
        line_end = end if nl < 0 else nl
        own = _OWN_LINE.match(text, pos, line_end) is not None
        prev_own = bool(out) and _OWN_LINE.match(text, out[-1][0], out[-1][1]) is not None
        if out and not own and not prev_own:
            out[-1] = (out[-1][0], line_end)
        else:
            out.append((pos, line_end))
        pos = line_end + 1
    return [s for s in (_trim(text, a, b) for a, b in out) if s is not None]


def _sentences(text: str, start: int, end: int) -> list[Span]:
    spans, pos = [], start
    for m in _BOUNDARY.finditer(text, start, end):
        if m.end() >= end or not _NEXT_STARTS_SENTENCE.match(text, m.end(), end):
            continue
        if text[m.start()] == "." and _is_abbreviation(text, pos, m.start()):
            continue
        spans.append((pos, m.end()))
        pos = m.end()
    spans.append((pos, end))
    return [s for s in (_trim(text, a, b) for a, b in spans) if s is not None]


def _is_abbreviation(text: str, start: int, dot: int) -> bool:
    word_start = dot
    while word_start > start and not text[word_start - 1].isspace():
        word_start -= 1
    word = text[word_start:dot].lstrip("\"'([").lower()
    return word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha())


@dataclass
class _Unit:
    start: int
    end: int
    tokens: int


class Chunker:
    def __init__(self, max_tokens: int, overlap_tokens: int, *, max_chars: int = 8000) -> None:
        if max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if not 0 <= overlap_tokens < max_tokens:
            raise ValueError("overlap_tokens must be in [0, max_tokens)")
        self.max_tokens = max_tokens
        self.overlap_tokens = overlap_tokens
        #: Stored chunk text stays far below Milvus's VARCHAR limit even when the tokenizer maps
        #: long runs of characters to one unknown token.
        self.max_chars = max_chars

    def split(self, text: str, tokenize: Tokenize) -> list[Chunk]:
        token_spans = tokenize(text)
        starts = [s for s, _ in token_spans]

        def count(a: int, b: int) -> int:
            return bisect.bisect_left(starts, b) - bisect.bisect_left(starts, a)

        spans: list[Span] = []
        current: list[_Unit] = []
        fresh = False  # `current` holds something no emitted chunk has

        def emit() -> None:
            nonlocal fresh
            if current and fresh:
                spans.append((current[0].start, current[-1].end))
            fresh = False

        for start, end in sentence_spans(text):
            unit = _Unit(start, end, count(start, end))
            if unit.tokens > self.max_tokens or end - start > self.max_chars:
                emit()
                spans.extend(self._windows(text, token_spans, starts, unit))
                current = []
                continue
            if current and not self._fits(current, unit):
                emit()
                current = self._overlap(current)
                while current and not self._fits(current, unit):
                    current.pop(0)
            current.append(unit)
            fresh = True
        emit()
        return [
            Chunk(index=i, text=text[a:b], start=a, end=b, tokens=count(a, b))
            for i, (a, b) in enumerate(spans)
        ]

    def _fits(self, current: list[_Unit], unit: _Unit) -> bool:
        tokens = sum(u.tokens for u in current) + unit.tokens
        return tokens <= self.max_tokens and unit.end - current[0].start <= self.max_chars

    def _overlap(self, current: list[_Unit]) -> list[_Unit]:
        kept: list[_Unit] = []
        total = 0
        for unit in reversed(current):
            if total + unit.tokens > self.overlap_tokens:
                break
            kept.insert(0, unit)
            total += unit.tokens
        return kept

    def _windows(self, text: str, token_spans: list[Span], starts: list[int], unit: _Unit) -> list[Span]:
        """A sentence too long for one chunk, cut into overlapping token windows."""
        first = bisect.bisect_left(starts, unit.start)
        last = bisect.bisect_left(starts, unit.end)
        stride = self.max_tokens - self.overlap_tokens
        out: list[Span] = []
        i = first
        while i < last:
            j = min(i + self.max_tokens, last)
            a = unit.start if i == first else token_spans[i][0]
            b = unit.end if j == last else token_spans[j - 1][1]
            out.extend(self._by_chars(text, a, b))
            if j == last:
                break
            i += stride
        if first == last:  # characters the tokenizer ignores entirely
            out.extend(self._by_chars(text, unit.start, unit.end))
        return out

    def _by_chars(self, text: str, start: int, end: int) -> list[Span]:
        out = []
        for a in range(start, end, self.max_chars):
            trimmed = _trim(text, a, min(a + self.max_chars, end))
            if trimmed is not None:
                out.append(trimmed)
        return out
