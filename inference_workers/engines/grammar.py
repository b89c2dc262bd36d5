"""A request's `response_format` as a llama.cpp grammar (GBNF), so that what the model generates is
JSON of the requested shape: every token that would break it is masked out while sampling.

llama-cpp-python's JSON-Schema converter writes the grammar; two of its choices are changed here:
its string characters admit raw control characters (a newline inside a string), which strict JSON
parsers refuse, so they are excluded as llama.cpp's own converter does; and `json_object` is the
schema `{"type": "object"}` through the same converter, whose optional spaces are single (the stock
JSON grammar lets a small model pad with whitespace until it runs out of tokens).
"""

from __future__ import annotations

import json
from functools import lru_cache

from schemas import ResponseFormat

#: The converter's string character rule, and the same without raw control characters.
_LOOSE_CHAR = 'char ::= [^"\\\\] |'
_STRICT_CHAR = 'char ::= [^"\\\\\\x7F\\x00-\\x1F] |'

#: What `json_object` asks for, as a schema.
_ANY_OBJECT = {"type": "object"}


class GrammarError(ValueError):
    """A schema the grammar compiler cannot turn into a grammar (an unresolvable `$ref`, ...)."""


def grammar_for(fmt: ResponseFormat | None) -> str | None:
    """The GBNF text that constrains generation to `fmt`; None for free text. Raises GrammarError."""
    if fmt is None or fmt.type == "text":
        return None
    schema = fmt.json_schema if fmt.type == "json_schema" and fmt.json_schema is not None else _ANY_OBJECT
    return _compile(json.dumps(schema, sort_keys=True))


@lru_cache(maxsize=256)
def _compile(schema_json: str) -> str:
    """GBNF of a schema (as canonical JSON: the cache key); repeated schemas compile once."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        gbnf = json_schema_to_gbnf(schema_json)
    except RecursionError:
        raise GrammarError("the schema refers to itself too deeply to become a grammar") from None
    except Exception as e:  # noqa: BLE001 - the converter raises assertions, KeyErrors, ... on bad input
        raise GrammarError(
            f"the schema cannot become a grammar: {type(e).__name__}: {str(e)[:300]}"
        ) from None
    return gbnf.replace(_LOOSE_CHAR, _STRICT_CHAR)
