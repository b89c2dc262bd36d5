"""Chunking keeps sentences whole, respects the token budget and overlaps by whole sentences.
Tokens here are words (a stand-in for the model's tokenizer, which the integration tests use)."""

from __future__ import annotations

import itertools
import re

import pytest

from processors.chunking import Chunker, sentence_spans


def words(text: str) -> list[tuple[int, int]]:
    return [m.span() for m in re.finditer(r"\S+", text)]


def sentences(text: str) -> list[str]:
    return [text[a:b] for a, b in sentence_spans(text)]


def test_sentences_split_on_terminal_punctuation_but_not_abbreviations() -> None:
    text = "Dr. Smith arrived at 9 a.m. on Monday. He met e.g. Jane! Did it work? Yes.\n\nNew paragraph here"
    assert sentences(text) == [
        "Dr. Smith arrived at 9 a.m. on Monday.",
        "He met e.g. Jane!",
        "Did it work?",
        "Yes.",
        "New paragraph here",
    ]


def test_list_items_and_headings_are_units_of_their_own() -> None:
    text = "Leave policy\n- Annual leave is 25 days\n- Sick leave is unlimited\n# Travel\nBook early"
    assert sentences(text) == [
        "Leave policy",
        "- Annual leave is 25 days",
        "- Sick leave is unlimited",
        "# Travel",
        "Book early",
    ]


def test_wrapped_prose_lines_stay_one_sentence() -> None:
    text = "This sentence was wrapped\nover two lines by a PDF. The next one"
    assert sentences(text) == ["This sentence was wrapped\nover two lines by a PDF.", "The next one"]


def test_chunks_respect_the_budget_and_keep_sentences_whole() -> None:
    units = [f"Sentence {i} has exactly six words." for i in range(20)]
    text = " ".join(units)
    chunks = Chunker(max_tokens=20, overlap_tokens=6).split(text, words)
    assert len(chunks) > 3
    for chunk in chunks:
        assert chunk.tokens <= 20
        assert chunk.text == text[chunk.start : chunk.end]
        # every chunk is a run of whole sentences
        assert chunk.text.startswith("Sentence ") and chunk.text.endswith(".")
    # consecutive chunks share exactly one whole sentence (6 tokens of overlap)
    for a, b in itertools.pairwise(chunks):
        last_of_a = a.text.rsplit("Sentence ", 1)[1]
        assert b.text.startswith("Sentence " + last_of_a)
    # nothing is lost: every sentence is in some chunk
    assert all(any(u in c.text for c in chunks) for u in units)
    assert [c.index for c in chunks] == list(range(len(chunks)))


def test_without_overlap_chunks_partition_the_sentences() -> None:
    text = " ".join(f"Item {i} is here." for i in range(12))
    chunks = Chunker(max_tokens=8, overlap_tokens=0).split(text, words)
    assert " ".join(c.text for c in chunks) == text
    assert all(c.tokens == 8 for c in chunks)


def test_a_sentence_longer_than_a_chunk_is_cut_into_overlapping_windows() -> None:
    long = " ".join(f"W{i}" for i in range(50)) + "."
    text = f"Short one. {long} Short two."
    chunks = Chunker(max_tokens=20, overlap_tokens=5).split(text, words)
    assert chunks[0].text == "Short one."
    windows = [c for c in chunks if c.text.startswith("W")]
    assert [c.tokens for c in windows] == [20, 20, 20]
    assert windows[0].text.split()[-5:] == windows[1].text.split()[:5]
    assert windows[-1].text.endswith("W49.")
    assert chunks[-1].text == "Short two."


def test_max_chars_bounds_chunks_the_tokenizer_sees_as_few_tokens() -> None:
    text = "x" * 250 + " end."
    chunks = Chunker(max_tokens=10, overlap_tokens=0, max_chars=100).split(text, lambda t: [(0, len(t))])
    assert all(len(c.text) <= 100 for c in chunks)
    assert "".join(c.text for c in chunks).replace(" ", "") == text.replace(" ", "")


def test_empty_text_gives_no_chunks() -> None:
    assert Chunker(10, 2).split("  \n\n ", words) == []


def test_overlap_must_be_smaller_than_the_chunk() -> None:
    with pytest.raises(ValueError):
        Chunker(10, 10)
