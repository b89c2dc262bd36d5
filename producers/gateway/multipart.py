"""`multipart/form-data` bodies (POST /v1/files), parsed from a file on disk, never from memory.

Why not the framework's form parser: it needs a package ragbus does not ship, and it would hold an
upload (up to the file limit, 200 MiB) in memory or in its own temporary files. Here the gateway
spools the body to disk as it arrives (counting bytes against the cap), then this module finds
the parts by their boundary in a memory map of the spool and names each part's byte range, so the
file part is copied to its place without ever being read into Python objects.
"""

from __future__ import annotations

import mmap
import os
import re
from dataclasses import dataclass
from email.message import Message
from pathlib import Path

#: The most header bytes one part may carry (a part's Content-Disposition and Content-Type).
PART_HEADERS_MAX = 8192
#: Parts a form may hold (OpenAI's form has two: `purpose` and `file`).
PARTS_MAX = 16


class MultipartError(ValueError):
    """The body is not a well-formed multipart/form-data body; the message says what is wrong."""


@dataclass(frozen=True)
class Part:
    name: str
    filename: str | None
    content_type: str | None
    #: The part's content: bytes [start, end) of the body.
    start: int
    end: int


def boundary_of(content_type: str) -> bytes:
    """The boundary of a `multipart/form-data; boundary=...` Content-Type (raises MultipartError)."""
    msg = Message()
    msg["content-type"] = content_type
    if msg.get_content_type() != "multipart/form-data":
        raise MultipartError("send the file as multipart/form-data (fields `file` and `purpose`)")
    boundary = msg.get_param("boundary")
    if not isinstance(boundary, str) or not 1 <= len(boundary) <= 70:
        raise MultipartError("the multipart/form-data Content-Type has no valid boundary")
    return boundary.encode("latin-1")


def _headers(raw: bytes) -> Message:
    msg = Message()
    for line in raw.decode("utf-8", "replace").split("\r\n"):
        name, sep, value = line.partition(":")
        if not sep or not re.fullmatch(r"[A-Za-z0-9-]+", name):
            raise MultipartError(f"a multipart part has a malformed header line {line[:60]!r}")
        msg[name.strip()] = value.strip()
    return msg


def parse_parts(data: bytes | mmap.mmap, boundary: bytes) -> list[Part]:
    """The parts of a multipart body held in `data` (bytes or a memory map)."""
    delimiter = b"--" + boundary
    pos = data.find(delimiter)
    if pos < 0:
        raise MultipartError("the body holds no multipart boundary")
    parts: list[Part] = []
    while True:
        pos += len(delimiter)
        if data[pos : pos + 2] == b"--":
            return parts
        if data[pos : pos + 2] != b"\r\n":
            raise MultipartError("a multipart boundary is not followed by a line break")
        head_end = data.find(b"\r\n\r\n", pos + 2, pos + 2 + PART_HEADERS_MAX)
        if head_end < 0:
            raise MultipartError(f"a multipart part has no end of headers within {PART_HEADERS_MAX} bytes")
        headers = _headers(bytes(data[pos + 2 : head_end]))
        start = head_end + 4
        end = data.find(b"\r\n" + delimiter, start)
        if end < 0:
            raise MultipartError("the multipart body ends before its closing boundary")
        disposition = headers.get("content-disposition", "")
        if not disposition.lower().startswith("form-data"):
            raise MultipartError("a multipart part is not form-data")
        name = headers.get_param("name", header="content-disposition")
        filename = headers.get_param("filename", header="content-disposition")
        if not isinstance(name, str):
            raise MultipartError("a multipart part has no name")
        parts.append(
            Part(
                name=name,
                filename=filename if isinstance(filename, str) else None,
                content_type=headers.get("content-type"),
                start=start,
                end=end,
            )
        )
        if len(parts) > PARTS_MAX:
            raise MultipartError(f"the form has more than {PARTS_MAX} parts")
        pos = end + 2


def parse_file(path: Path, boundary: bytes) -> list[Part]:
    """The parts of the multipart body spooled at `path` (blocking: call it off the event loop)."""
    if path.stat().st_size == 0:
        raise MultipartError("the body is empty")
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return parse_parts(data, boundary)


def copy_range(src: Path, start: int, end: int, dest: Path) -> None:
    """Copy bytes [start, end) of `src` to `dest` (blocking), durably: written, fsynced, renamed."""
    tmp = dest.with_suffix(dest.suffix + ".tmp")
    with src.open("rb") as fin, tmp.open("wb") as fout:
        fin.seek(start)
        left = end - start
        while left > 0:
            chunk = fin.read(min(left, 1 << 20))
            if not chunk:
                raise OSError(f"{src} ended early")
            fout.write(chunk)
            left -= len(chunk)
        fout.flush()
        os.fsync(fout.fileno())
    tmp.replace(dest)


def read_range(src: Path, start: int, end: int, limit: int) -> bytes:
    """Bytes [start, end) of `src`, at most `limit` of them (a small form field such as `purpose`)."""
    with src.open("rb") as f:
        f.seek(start)
        return f.read(min(end - start, limit))
