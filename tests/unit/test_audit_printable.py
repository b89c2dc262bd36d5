"""`ragbus audit` never hands a terminal the control sequences that audit rows may carry."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime

import pytest
from rich.console import Console

from cli.audit import audit_table, printable
from cli.common import print_json
from sinks.audit.query import AuditEntry


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("plain text, ünïcödé, 日本語", "plain text, ünïcödé, 日本語"),
        ("keeps\nnewlines\tand tabs", "keeps\nnewlines\tand tabs"),
        ("\x1b[31mred\x1b[0m", "red"),
        ("\x1b[2J\x1b[1;1Hcleared", "cleared"),
        ("\x1b]0;owned title\x07after", "after"),
        ("\x1b]8;;https://evil.example\x1b\\link\x1b]8;;\x1b\\", "link"),
        ("\x9b31mC1 CSI", "C1 CSI"),
        ("bell\x07 back\x08space \rreturn del\x7f nul\x00", "bell backspace return del nul"),
        ("\x1bPdevice control\x1b\\x", "x"),
        ("\x1b7saved\x1b8", "saved"),
        ("\x85next line\x9c", "next line"),
        ("lone ESC at the end\x1b", "lone ESC at the end"),
    ],
)
def test_printable_strips_what_a_terminal_acts_on(raw: str, shown: str) -> None:
    assert printable(raw) == shown


def _entry(**text: str) -> AuditEntry:
    fields: dict[str, object] = {
        "id": 1,
        "created_at": datetime(2026, 12, 1, tzinfo=UTC),
        "action_type": "QUERY",
        "topic": "ragbus.chat.requests",
        "partition": 0,
        "offset": 7,
        "event_type": "chat.request",
        "event_id": "e",
        "request_id": "r",
        "tenant_id": "acme",
        "user_id": "u",
        "ip_address": None,
        "trace_id": None,
        "model": None,
        "prompt_tokens": None,
        "completion_tokens": None,
        "key_id": None,
        "error": None,
        "payload": {"question": "what?"},
    }
    fields.update(text)
    return AuditEntry(**fields)  # type: ignore[arg-type]


HOSTILE = "\x1b[2J\x1b]0;pwned\x07\x1b[31m[bold]red[/bold]\x9b1A\rover"


def test_the_table_has_no_control_characters_but_keeps_the_text() -> None:
    entry = _entry(
        user_id=HOSTILE,
        action_type="QUERY\x1b[5m",
        payload={"question": HOSTILE},
    )
    out = io.StringIO()
    # No terminal styling of its own, so every control byte in the output would be the row's.
    Console(file=out, width=400, force_terminal=False, color_system=None).print(
        audit_table([entry], "ragbus")
    )
    text = out.getvalue()
    assert not any((ord(c) < 32 and c not in "\n") or 0x7F <= ord(c) <= 0x9F for c in text), repr(text)
    assert "[bold]red[/bold]over" in text  # markup shown as text, not interpreted


def test_json_output_escapes_control_characters(capsys: pytest.CaptureFixture[str]) -> None:
    entry = _entry(payload={"question": HOSTILE})
    print_json([entry.as_dict()])
    out = capsys.readouterr().out
    assert not any((ord(c) < 32 and c not in "\n") or 0x7F <= ord(c) <= 0x9F for c in out), repr(out)
    assert json.loads(out)[0]["payload"]["question"] == HOSTILE  # the exact text survives
