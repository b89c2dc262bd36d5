"""Input and output line formats of bulk jobs.

Input: the OpenAI Batch input format (`{"custom_id", "method", "url", "body": {"messages": [...]}}`
per line), plain text (one question per line), or one column of a CSV file. Output: the OpenAI
Batch output format, one line per custom_id.
"""

from __future__ import annotations

import csv
import hashlib
import json
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson
from annotated_types import MaxLen
from pydantic import ValidationError

from schemas import ChatMessage, ChatRequest, ChatResponse

InputFormat = Literal["auto", "openai", "text", "csv"]


def field_max_length(model: type[Any], name: str) -> int:
    """A field's max_length as the contract declares it (never a second copy of the number)."""
    for rule in model.model_fields[name].metadata:
        if isinstance(rule, MaxLen):
            return int(rule.max_length)
    raise LookupError(f"{model.__name__}.{name} declares no max_length")


#: The longest custom_id the contract carries; longer ones are cut (with a hash) in error lines.
CUSTOM_ID_MAX = field_max_length(ChatRequest, "custom_id")


def safe_custom_id(custom_id: str) -> str:
    """`custom_id` as it may appear in an output line: at most CUSTOM_ID_MAX characters (an
    over-long id keeps its head plus a hash of the whole, so two long ids stay distinct and a
    resumed job recognises the line) and encodable as UTF-8."""
    text = custom_id.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(text) <= CUSTOM_ID_MAX:
        return text
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    return f"{text[: CUSTOM_ID_MAX - len(digest) - 1]}~{digest}"


class BadLine(ValueError):
    """An input line that cannot become a request; it is answered with an error line.

    `custom_id` is already cut to a safe length; `param` names the offending OpenAI field
    (`messages.[2].content`) when one is known."""

    def __init__(self, custom_id: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.custom_id = safe_custom_id(custom_id)
        self.param = param


@dataclass
class BulkItem:
    custom_id: str
    question: str
    history: list[ChatMessage] = field(default_factory=list)
    system_prompt: str | None = None
    model: str | None = None
    max_tokens: Any = None
    temperature: Any = None


def detect_format(path: Path) -> InputFormat:
    if path.suffix.lower() == ".csv":
        return "csv"
    # Only the first non-blank character matters; undecodable bytes become error lines later.
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                return "openai" if line.lstrip().startswith("{") else "text"
    return "text"


def parse_openai_line(line: str | bytes, number: int) -> BulkItem:
    # orjson, not json: it refuses lone surrogates ("\ud800", which no UTF-8 encoder accepts
    # later) and bounds nesting depth instead of recursing until RecursionError.
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError as e:
        raise BadLine(f"line-{number}", f"line {number} is not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise BadLine(f"line-{number}", f"line {number} is not a JSON object")
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise BadLine(f"line-{number}", f"line {number} has no custom_id (a non-empty string)", "custom_id")
    url = obj.get("url", "/v1/chat/completions")
    if url != "/v1/chat/completions":
        raise BadLine(custom_id, f"unsupported url {str(url)[:80]!r}: only /v1/chat/completions", "url")
    body = obj.get("body")
    messages = body.get("messages") if isinstance(body, dict) else None
    if not isinstance(body, dict) or not isinstance(messages, list) or not messages:
        raise BadLine(custom_id, "body.messages is missing or empty", "messages")
    system, history, question = split_messages(messages, custom_id)
    model = body.get("model")
    return BulkItem(
        custom_id=custom_id,
        question=question,
        history=history,
        system_prompt=system,
        model=model if isinstance(model, str) else None,
        max_tokens=body.get("max_tokens") or body.get("max_completion_tokens"),
        temperature=body.get("temperature"),
    )


def _text_of(content: Any, where: str, custom_id: str) -> str:
    """A message's content as text: a string, or a list of `{"type": "text", "text": str}` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts: list[str] = []
        for j, part in enumerate(content):
            text = part.get("text") if isinstance(part, dict) else None
            if not isinstance(part, dict) or part.get("type", "text") != "text" or not isinstance(text, str):
                raise BadLine(
                    custom_id,
                    f'{where}.[{j}]: only text parts are supported, as {{"type": "text", "text": "..."}}',
                    f"{where}.[{j}]",
                )
            texts.append(text)
        return "".join(texts)
    raise BadLine(custom_id, f"{where}: must be a string or a list of text parts", where)


def split_messages(messages: list[Any], custom_id: str = "") -> tuple[str | None, list[ChatMessage], str]:
    """OpenAI messages → (system prompt, history, question = the last user message)."""
    system_parts: list[str] = []
    turns: list[ChatMessage] = []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if not isinstance(role, str) or role not in ("system", "developer", "user", "assistant"):
            raise BadLine(
                custom_id,
                f"messages.[{i}]: unsupported message; role is one of system, developer, user, assistant",
                f"messages.[{i}].role",
            )
        content = _text_of(m.get("content"), f"messages.[{i}].content", custom_id)
        if role in ("system", "developer"):
            system_parts.append(content)
            continue
        try:
            turns.append(ChatMessage(role=role, content=content))  # type: ignore[arg-type]
        except ValidationError as e:
            raise BadLine(custom_id, describe(e, f"messages.[{i}]."), f"messages.[{i}].content") from None
    if not turns or turns[-1].role != "user":
        raise BadLine(custom_id, "the last message must come from the user", "messages")
    return ("\n".join(system_parts) or None), turns[:-1], turns[-1].content


#: Where each ChatRequest field comes from in an OpenAI chat-completions request.
_OPENAI_FIELD = {
    "question": "messages",
    "history": "messages",
    "system_prompt": "messages",
    "model": "model",
    "custom_id": "custom_id",
    "metadata": "user",
    "client_ip": "X-Forwarded-For",
}


def loc_path(loc: Sequence[int | str]) -> str:
    """A validation error's location as OpenAI writes it: `("messages", 0, "content")` →
    `messages.[0].content`."""
    return ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in loc)


def openai_param(loc: Sequence[int | str]) -> str:
    """The OpenAI request field a ChatRequest validation error points at: `("sampling",
    "max_tokens")` → `max_tokens`, `("question",)` → `messages`."""
    if not loc:
        return "body"
    if loc[0] == "sampling" and len(loc) > 1:
        return str(loc[1])
    return _OPENAI_FIELD.get(str(loc[0]), str(loc[0]))


_WHAT = {
    "question": "the last user message",
    "history": "the messages before the last user message",
    "system_prompt": "the system messages together",
}


def describe(err: ValidationError, prefix: str = "", limit: int = 3) -> str:
    """A validation error in a few words per problem, naming fields and never echoing the input."""
    parts = []
    for e in err.errors()[:limit]:
        loc = e.get("loc", ())
        head, path = (str(loc[0]) if loc else ""), loc_path(loc)
        if prefix:
            where = prefix + path
        else:
            where = _WHAT.get(head) or (openai_param(loc) if head == "sampling" else path) or "request"
        parts.append(f"{where}: {e.get('msg')}")
    more = err.error_count() - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def _has_control(text: str) -> bool:
    # What str.splitlines() would split on, or a terminal would act on.
    return any(unicodedata.category(c) == "Cc" or c in "\u2028\u2029" for c in text)


def build_request(
    item: BulkItem, *, request_id: str, tenant_id: str, user_id: str, job_id: str
) -> ChatRequest:
    """The bulk-lane ChatRequest of one item; the contract model is the validator, so an item it
    refuses (too long, bad sampling values, ...) becomes a BadLine, never an exception that ends
    the job."""
    if _has_control(item.custom_id):
        raise BadLine(
            item.custom_id, "custom_id must not contain control characters or line breaks", "custom_id"
        )
    sampling = {"max_tokens": item.max_tokens, "temperature": item.temperature}
    try:
        return ChatRequest(
            request_id=request_id,
            tenant_id=tenant_id,
            user_id=user_id,
            lane="bulk",
            question=item.question,
            history=item.history,
            system_prompt=item.system_prompt,
            model=item.model if item.model not in (None, "ragbus") else None,
            sampling={k: v for k, v in sampling.items() if v is not None},
            job_id=job_id,
            custom_id=item.custom_id,
        )
    except ValidationError as e:
        first = e.errors()[0].get("loc", ()) if e.error_count() else ()
        raise BadLine(item.custom_id, describe(e), openai_param(first)) from None


def _lines(f: Any) -> Iterator[tuple[int, str | BadLine]]:
    """Numbered non-blank lines of a binary file; a line that is not UTF-8 becomes a BadLine."""
    for n, raw in enumerate(f, start=1):
        if not raw.strip():
            continue
        try:
            yield n, raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield n, BadLine(f"line-{n}", f"line {n} is not UTF-8 text ({e.reason} at byte {e.start})")


def read_items(
    path: Path, fmt: InputFormat = "auto", *, column: str | None = None, id_column: str | None = None
) -> Iterator[BulkItem | BadLine]:
    """Stream the items of an input file (never the whole file in memory); a line that cannot
    become a request is yielded as a BadLine, so the job answers it with an error line and goes on."""
    fmt = detect_format(path) if fmt == "auto" else fmt
    if fmt == "csv":
        yield from _csv_items(path, column, id_column)
        return
    with path.open("rb") as f:
        for n, line in _lines(f):
            if isinstance(line, BadLine):
                yield line
            elif fmt == "openai":
                try:
                    yield parse_openai_line(line, n)
                except BadLine as bad:
                    yield bad
            else:
                yield BulkItem(custom_id=f"line-{n}", question=line.strip())


def _csv_items(path: Path, column: str | None, id_column: str | None) -> Iterator[BulkItem | BadLine]:
    # surrogateescape: a row with bytes that are not UTF-8 is reported as that row's error.
    with path.open(encoding="utf-8", errors="surrogateescape", newline="") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        col = column or ("question" if "question" in fields else (fields[0] if fields else None))
        if col not in fields:
            raise ValueError(f"column {col!r} is not in {path.name} ({', '.join(fields)})")
        for n, row in enumerate(reader, start=1):
            cid = (row.get(id_column) if id_column else None) or f"row-{n}"
            text = (row.get(col) or "").strip()
            if not _utf8(cid) or not _utf8(text):
                yield BadLine(cid, f"row {n} is not UTF-8 text")
            elif text:
                yield BulkItem(custom_id=cid, question=text)


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def count_items(path: Path) -> int:
    """Non-empty lines (CSV: data rows); cheap enough for a progress bar's total."""
    n = 0
    with path.open("rb") as f:
        for line in f:
            if line.strip():
                n += 1
    return max(0, n - 1) if path.suffix.lower() == ".csv" else n


def output_line(custom_id: str, response: ChatResponse | None, error: tuple[str, str] | None = None) -> str:
    """One OpenAI Batch output line."""
    if response is not None and response.error is not None:
        error = (response.error.code.value, response.error.message)
    if error is not None:
        rid = response.request_id if response is not None else None
        out: dict[str, Any] = {
            "id": f"batch_req_{rid or custom_id}",
            "custom_id": custom_id,
            "response": None,
            "error": {"code": error[0], "message": error[1]},
        }
        return json.dumps(out, ensure_ascii=False)
    assert response is not None
    body = {
        "id": f"chatcmpl-{response.request_id}",
        "object": "chat.completion",
        "created": int(response.created_at.timestamp()),
        "model": response.model or "ragbus",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": response.answer},
                "finish_reason": response.finish_reason or "stop",
            }
        ],
        "usage": {
            "prompt_tokens": response.usage.prompt_tokens,
            "completion_tokens": response.usage.completion_tokens,
            "total_tokens": response.usage.total_tokens,
        },
        "ragbus": {
            "citations": [c.model_dump(mode="json") for c in response.citations],
            "cached": response.cached,
            "timings": response.timings.model_dump(mode="json", exclude_none=True),
        },
    }
    line = {
        "id": f"batch_req_{response.request_id}",
        "custom_id": custom_id,
        "response": {"status_code": 200, "request_id": response.request_id, "body": body},
        "error": None,
    }
    return json.dumps(line, ensure_ascii=False)


def answered_ids(path: Path) -> set[str]:
    """custom_ids already in an output file; a torn last line (crash mid-write) is cut off."""
    done: set[str] = set()
    if not path.exists():
        return done
    good_end = 0
    with path.open("rb") as f:
        for raw in f:
            try:
                obj = json.loads(raw)
            except ValueError:
                break
            if not raw.endswith(b"\n"):
                break
            done.add(obj["custom_id"])
            good_end += len(raw)
    if good_end != path.stat().st_size:
        with path.open("r+b") as f:
            f.truncate(good_end)
    return done
