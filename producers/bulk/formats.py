"""Input and output line formats of bulk jobs.

Input: the OpenAI Batch input format (`{"custom_id", "method", "url", "body": {"messages": [...]}}`
per line), plain text (one question per line), or one column of a CSV file. Output: the OpenAI
Batch output format, one line per custom_id.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from schemas import ChatMessage, ChatResponse

InputFormat = Literal["auto", "openai", "text", "csv"]


class BadLine(ValueError):
    """An input line that cannot become a request; it is answered with an error line."""

    def __init__(self, custom_id: str, message: str) -> None:
        super().__init__(message)
        self.custom_id = custom_id


@dataclass
class BulkItem:
    custom_id: str
    question: str
    history: list[ChatMessage] = field(default_factory=list)
    system_prompt: str | None = None
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None


def detect_format(path: Path) -> InputFormat:
    if path.suffix.lower() == ".csv":
        return "csv"
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                return "openai" if line.lstrip().startswith("{") else "text"
    return "text"


def parse_openai_line(line: str, number: int) -> BulkItem:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadLine(f"line-{number}", f"line {number} is not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise BadLine(f"line-{number}", f"line {number} is not a JSON object")
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise BadLine(f"line-{number}", f"line {number} has no custom_id")
    url = obj.get("url", "/v1/chat/completions")
    if url != "/v1/chat/completions":
        raise BadLine(custom_id, f"unsupported url {url!r}: only /v1/chat/completions")
    body = obj.get("body")
    messages = body.get("messages") if isinstance(body, dict) else None
    if not isinstance(messages, list) or not messages:
        raise BadLine(custom_id, "body.messages is missing or empty")
    system, history, question = split_messages(messages, custom_id)
    return BulkItem(
        custom_id=custom_id,
        question=question,
        history=history,
        system_prompt=system,
        model=body.get("model") if isinstance(body.get("model"), str) else None,
        max_tokens=body.get("max_tokens") or body.get("max_completion_tokens"),
        temperature=body.get("temperature"),
    )


def split_messages(messages: list[Any], custom_id: str = "") -> tuple[str | None, list[ChatMessage], str]:
    """OpenAI messages → (system prompt, history, question = the last user message)."""
    system_parts: list[str] = []
    turns: list[ChatMessage] = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise BadLine(custom_id, f"unsupported message {str(m)[:80]!r}")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            raise BadLine(custom_id, "message content must be text")
        if m["role"] in ("system", "developer"):
            system_parts.append(content)
        else:
            turns.append(ChatMessage(role=m["role"], content=content))
    if not turns or turns[-1].role != "user":
        raise BadLine(custom_id, "the last message must come from the user")
    return ("\n".join(system_parts) or None), turns[:-1], turns[-1].content


def read_items(
    path: Path, fmt: InputFormat = "auto", *, column: str | None = None, id_column: str | None = None
) -> Iterator[BulkItem | BadLine]:
    """Stream the items of an input file (never the whole file in memory)."""
    fmt = detect_format(path) if fmt == "auto" else fmt
    with path.open(encoding="utf-8", newline="") as f:
        if fmt == "csv":
            reader = csv.DictReader(f)
            fields = reader.fieldnames or []
            col = column or ("question" if "question" in fields else (fields[0] if fields else None))
            if col not in fields:
                raise ValueError(f"column {col!r} is not in {path.name} ({', '.join(fields)})")
            for n, row in enumerate(reader, start=1):
                cid = row.get(id_column) if id_column else None
                text = (row.get(col) or "").strip()
                if text:
                    yield BulkItem(custom_id=cid or f"row-{n}", question=text)
            return
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            if fmt == "openai":
                try:
                    yield parse_openai_line(line, n)
                except BadLine as bad:
                    yield bad
            else:
                yield BulkItem(custom_id=f"line-{n}", question=line.strip())


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
