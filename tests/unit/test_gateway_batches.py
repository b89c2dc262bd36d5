"""Pure parts of the Files and Batch API: multipart parsing from disk, batch validation, splitting
results into output and error files, the request body's checks, ids and paths, and the bulk
runner's output scan and job opening (which `ragbus bulk` and batches share)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from infra.settings import Settings
from producers.bulk.formats import answered_ids, scan_output
from producers.bulk.runner import open_job
from producers.bulk.state import JobStore
from producers.gateway.app import create_app
from producers.gateway.auth import ApiKeys, Principal
from producers.gateway.batches import (
    expire_unanswered,
    file_path,
    result_file_id,
    split_results,
    validate_input,
)
from producers.gateway.multipart import MultipartError, boundary_of, parse_file, parse_parts
from producers.openai.batches import CreateBatchRequest
from schemas import limits

BOUNDARY = b"xYzZY"


def _form(*parts: tuple[str, str | None, bytes]) -> bytes:
    out = b""
    for name, filename, content in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += b"--" + BOUNDARY + b"\r\n"
        out += f"Content-Disposition: {disposition}\r\n".encode()
        if filename:
            out += b"Content-Type: application/octet-stream\r\n"
        out += b"\r\n" + content + b"\r\n"
    return out + b"--" + BOUNDARY + b"--\r\n"


def test_multipart_parts_are_found_by_their_byte_ranges(tmp_path: Path) -> None:
    payload = b'{"custom_id": "a"}\r\n--not-the-boundary\r\n'
    body = _form(("purpose", None, b"batch"), ("file", "in.jsonl", payload))
    spooled = tmp_path / "body"
    spooled.write_bytes(body)
    parts = {p.name: p for p in parse_file(spooled, BOUNDARY)}
    assert body[parts["purpose"].start : parts["purpose"].end] == b"batch"
    assert parts["file"].filename == "in.jsonl"
    assert body[parts["file"].start : parts["file"].end] == payload


@pytest.mark.parametrize(
    "body",
    [
        b"no boundary at all",
        b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="a"\r\n\r\nunterminated',
        b"--" + BOUNDARY + b"\r\nno header end",
        b"--" + BOUNDARY + b"\r\nContent-Disposition: attachment\r\n\r\nx\r\n--" + BOUNDARY + b"--",
        b"--" + BOUNDARY + b"\r\nBad Header Line\r\n\r\nx\r\n--" + BOUNDARY + b"--",
    ],
)
def test_malformed_multipart_bodies_are_refused_in_words(body: bytes) -> None:
    with pytest.raises(MultipartError):
        parse_parts(body, BOUNDARY)


def test_the_boundary_comes_from_a_multipart_content_type_only() -> None:
    assert boundary_of("multipart/form-data; boundary=abc") == b"abc"
    assert boundary_of('multipart/form-data; boundary="a b"') == b"a b"
    for bad in ("application/json", "multipart/form-data", "multipart/form-data; boundary=" + "x" * 71):
        with pytest.raises(MultipartError):
            boundary_of(bad)


def _write(path: Path, *lines: str) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_validation_counts_requests_and_fails_a_batch_only_for_what_breaks_it(tmp_path: Path) -> None:
    good = _write(tmp_path / "good.jsonl", '{"custom_id": "a", "body": 1}', "", '{"custom_id": "b"}')
    assert validate_input(good) == (2, [])  # a bad body is the runner's (an error line), not validation's

    bad = _write(tmp_path / "bad.jsonl", '{"custom_id": "a"}', "not json", "[1]", '{"custom_id": "a"}')
    total, errors = validate_input(bad)
    assert total == 4
    assert [(e.code, e.line) for e in errors] == [
        ("invalid_json_line", 2),
        ("missing_required_parameter", 3),
        ("duplicate_custom_id", 4),
    ]
    many = _write(tmp_path / "many.jsonl", *(f'{{"custom_id": "{i}"}}' for i in range(4)))
    assert [e.code for e in validate_input(many, max_requests=3)[1]] == ["too_many_requests"]
    empty = _write(tmp_path / "empty.jsonl", "", "  ")
    assert [e.code for e in validate_input(empty)[1]] == ["empty_file"]


def test_results_split_into_output_and_error_files_the_same_way_twice(tmp_path: Path) -> None:
    ok = {"custom_id": "a", "response": {"status_code": 200}, "error": None}
    err = {"custom_id": "b", "response": None, "error": {"code": "invalid_request", "message": "x"}}
    results = _write(
        tmp_path / "r.jsonl", json.dumps(ok), json.dumps(err), json.dumps({**ok, "custom_id": "c"})
    )
    out, errs = tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    for _ in range(2):
        assert split_results(results, out, errs) == (2, 1)
        assert [json.loads(x)["custom_id"] for x in out.read_text().splitlines()] == ["a", "c"]
        assert [json.loads(x)["custom_id"] for x in errs.read_text().splitlines()] == ["b"]
    only_ok = _write(tmp_path / "r2.jsonl", json.dumps(ok))
    assert split_results(only_ok, out, errs) == (1, 0)
    assert not errs.exists()  # no error file when there is no error
    assert split_results(tmp_path / "missing.jsonl", out, errs) == (0, 0)
    assert not out.exists()


def test_an_expired_batchs_unanswered_lines_become_batch_expired_errors_once(tmp_path: Path) -> None:
    """Each input custom_id without a result line gets one `batch_expired` error line; answered ones
    and lines without a custom_id get none; a torn last line is cut first; a second run adds none."""
    source = _write(
        tmp_path / "in.jsonl",
        json.dumps({"custom_id": "a", "body": {}}),
        json.dumps({"custom_id": "b", "body": {}}),
        "not json",
        json.dumps({"no_id": 1}),
        json.dumps({"custom_id": "c", "body": {}}),
    )
    ok = {"custom_id": "a", "response": {"status_code": 200}, "error": None}
    results = tmp_path / "r.jsonl"
    results.write_text(json.dumps(ok) + "\n" + '{"custom_id": "b", "resp')  # b's line torn by a crash
    for expected in (2, 0):
        assert expire_unanswered(source, results) == expected
    rows = [json.loads(x) for x in results.read_text().splitlines()]
    assert [r["custom_id"] for r in rows] == ["a", "b", "c"]
    assert [r["error"]["code"] for r in rows[1:]] == ["batch_expired", "batch_expired"]
    assert rows[1]["response"] is None and "completion window" in rows[1]["error"]["message"]
    assert split_results(results, tmp_path / "out.jsonl", tmp_path / "err.jsonl") == (1, 2)
    assert expire_unanswered(tmp_path / "deleted.jsonl", results) == 0


def test_the_create_body_takes_openais_fields_and_refuses_others() -> None:
    body = {"input_file_id": "file-1", "endpoint": "/v1/chat/completions", "completion_window": "24h"}
    assert CreateBatchRequest.model_validate({**body, "metadata": {"k": "v"}}).metadata == {"k": "v"}
    for bad in (
        {**body, "endpoint": "/v1/embeddings"},
        {**body, "completion_window": "1h"},
        {**body, "extra": 1},
        {**body, "metadata": {str(i): "v" for i in range(limits.BATCH_METADATA_KEYS_MAX + 1)}},
        {**body, "metadata": {"k": "v" * (limits.BATCH_METADATA_VALUE_MAX + 1)}},
    ):
        with pytest.raises(ValidationError):
            CreateBatchRequest.model_validate(bad)


def test_file_ids_map_to_paths_under_the_tenants_folder_only(tmp_path: Path) -> None:
    assert file_path(tmp_path, "acme", "file-abc123") == tmp_path / "files" / "acme" / "file-abc123.jsonl"
    for bad in ("../etc/passwd", "file-../x", "file-", "batch_1", "file-ä"):
        with pytest.raises(ValueError):
            file_path(tmp_path, "acme", bad)
    assert result_file_id("batch_1", "output") == result_file_id("batch_1", "output")
    assert result_file_id("batch_1", "output") != result_file_id("batch_1", "error")
    assert result_file_id("batch_1", "output") != result_file_id("batch_2", "output")


def test_the_output_scan_counts_errors_and_cuts_a_torn_last_line(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    lines = [
        json.dumps({"custom_id": "a", "error": None}),
        json.dumps({"custom_id": "b", "error": {"code": "x"}}),
    ]
    out.write_text("\n".join(lines) + '\n{"custom_id": "c", "err')
    assert scan_output(out) == ({"a", "b"}, 1)
    assert out.read_text() == "\n".join(lines) + "\n"
    assert answered_ids(out) == {"a", "b"}


def test_open_job_creates_then_resumes_and_refuses_another_output(tmp_path: Path) -> None:
    store = JobStore(tmp_path, "acme")
    source = _write(tmp_path / "in.jsonl", '{"custom_id": "a"}', '{"custom_id": "b"}')
    state, resumed = open_job(
        store, "batch_1", input=source, output=tmp_path / "o.jsonl", fmt="auto", user="u"
    )
    assert not resumed and state.total == 2 and state.input_format == "openai" and state.tenant_id == "acme"
    store.save(state)
    again, resumed = open_job(
        store, "batch_1", input=source, output=tmp_path / "o.jsonl", fmt="auto", user="u"
    )
    assert resumed and again.created_at == state.created_at
    with pytest.raises(ValueError, match="writes to"):
        open_job(store, "batch_1", input=source, output=tmp_path / "other.jsonl", fmt="auto", user="u")


KEY = "sk-unit"


def _client(**overrides: object) -> httpx.AsyncClient:
    settings = Settings(_env_file=None, gateway_batch_file_max_bytes=2048, **overrides)  # type: ignore[call-arg]
    keys = ApiKeys({hashlib.sha256(KEY.encode()).hexdigest(): Principal("acme", "alice")})
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(settings, keys)), base_url="http://gw"
    )


async def test_uploads_have_their_own_cap_and_the_api_says_how_to_turn_it_on() -> None:
    auth = {"authorization": f"Bearer {KEY}"}
    async with _client() as http:
        # Over the file cap (plus form overhead): 413 before the key or the form is looked at.
        big = b"x" * (2048 + 64 * 1024 + 1)
        r = await http.post(
            "/v1/files", content=big, headers={"content-type": "multipart/form-data; boundary=b"}
        )
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        # Without the setting the routes answer 404 naming it (no lifespan ran: batches are off).
        r = await http.get("/v1/batches", headers=auth)
        assert r.status_code == 404 and "RAGBUS_GATEWAY_BATCHES" in r.json()["error"]["message"]
        r = await http.get("/v1/batches")
        assert r.status_code == 401


def test_the_openapi_document_lists_the_routes_statuses_and_never_422() -> None:
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    spec = create_app(settings, ApiKeys({})).openapi()
    for path in ("/v1/files", "/v1/files/{file_id}", "/v1/files/{file_id}/content", "/v1/batches"):
        for operation in spec["paths"][path].values():
            assert {"200", "401", "404"} <= set(operation["responses"]) and "422" not in operation[
                "responses"
            ]
    assert "409" in spec["paths"]["/v1/files/{file_id}"]["delete"]["responses"]
    assert "multipart/form-data" in spec["paths"]["/v1/files"]["post"]["requestBody"]["content"]


def test_stale_upload_spools_are_removed_and_fresh_ones_kept(tmp_path: Path) -> None:
    import os

    from producers.gateway.batches import clean_incoming

    incoming = tmp_path / "files" / ".incoming"
    incoming.mkdir(parents=True)
    old, fresh = incoming / "old", incoming / "fresh"
    old.write_bytes(b"x")
    fresh.write_bytes(b"y")
    os.utime(old, (0, 0))
    clean_incoming(tmp_path)
    assert not old.exists() and fresh.exists()
    clean_incoming(tmp_path / "nowhere")  # no folder yet: nothing to do
