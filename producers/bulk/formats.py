"""Input and output line formats of bulk jobs.

Input: the OpenAI Batch input format (`{"custom_id", "method", "url", "body": {...}}` per line,
each body a chat-completions request exactly as the gateway takes it), plain text (one question
per line), or one column of a CSV file. Output: the OpenAI Batch output format, one line per
custom_id.
"""

from __future__ import annotations

import csv
import hashlib
import json
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import orjson
from annotated_types import MaxLen
from pydantic import ValidationError

from producers.openai.convert import InvalidInput, parse_body, to_chat_request, to_choices
from producers.openai.protocol import ChatCompletionRequest
from producers.requests import build_chat_request
from schemas import ChatRequest, ChatResponse

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


class BadLine(InvalidInput):
    """An input line that cannot become a request; it is answered with an error line.

    `custom_id` is already cut to a safe length; `param` names the offending OpenAI field
    (`messages.[2].content`) when one is known."""

    def __init__(self, custom_id: str, message: str, param: str | None = None) -> None:
        super().__init__(message, param)
        self.custom_id = safe_custom_id(custom_id)


@dataclass
class BulkItem:
    """One request of a job: an OpenAI Batch line's body, or a question (text and CSV inputs)."""

    custom_id: str
    question: str = ""
    body: ChatCompletionRequest | None = None


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
    """One OpenAI Batch line; its body is validated by the same protocol model as the gateway's
    requests. Raises BadLine."""
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
    try:
        return BulkItem(custom_id=custom_id, body=parse_body(obj.get("body")))
    except InvalidInput as e:
        raise BadLine(custom_id, str(e), e.param) from None


def _has_control(text: str) -> bool:
    # What str.splitlines() would split on, or a terminal would act on.
    return any(unicodedata.category(c) == "Cc" or c in "\u2028\u2029" for c in text)


def build_request(
    item: BulkItem, *, request_id: str, tenant_id: str, user_id: str, job_id: str
) -> ChatRequest:
    """The bulk-lane ChatRequest of one item, made as the gateway makes its requests; a request
    the contract refuses (too long, bad sampling values, ...) becomes a BadLine, never an
    exception that ends the job."""
    if _has_control(item.custom_id):
        raise BadLine(
            item.custom_id, "custom_id must not contain control characters or line breaks", "custom_id"
        )
    envelope: dict[str, Any] = {
        "tenant_id": tenant_id,
        "user_id": user_id,
        "lane": "bulk",
        "request_id": request_id,
        "job_id": job_id,
        "custom_id": item.custom_id,
    }
    try:
        if item.body is not None:
            return to_chat_request(item.body, **envelope)
        try:
            return build_chat_request(item.question, **envelope)
        except ValidationError as e:
            raise InvalidInput.of_contract(e) from None
    except InvalidInput as e:
        raise BadLine(item.custom_id, str(e), e.param) from None


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
        "choices": [c.model_dump(mode="json") for c in to_choices(response)],
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
    return scan_output(path)[0]


def scan_output(path: Path) -> tuple[set[str], int]:
    """(custom_ids already in an output file, how many of those lines are errors); a torn last
    line (a crash mid-write) is cut off, so a resumed job appends after whole lines only."""
    done: set[str] = set()
    errors = 0
    if not path.exists():
        return done, errors
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
            errors += obj.get("error") is not None
            good_end += len(raw)
    if good_end != path.stat().st_size:
        with path.open("r+b") as f:
            f.truncate(good_end)
    return done, errors
