"""Encryption at rest of the sensitive fields of audit payloads (AES-256-GCM).

Only the fields that carry user content are sealed — the prompt (question, history, system
prompt), the retrieved context (chunk texts), the answer (and streamed tokens), document bodies
and the raw bytes of dead letters and undecodable records — so ids, tenants, token counts and
timings stay queryable. A sealed field becomes `{"$enc": base64(nonce ‖ ciphertext ‖ tag)}`;
its plaintext is the field's JSON, and the associated data binds it to its record and path
(`topic/partition/offset/path`), so a ciphertext copied to another row or field does not decrypt.

Keys: `RAGBUS_AUDIT_ENCRYPTION_KEYS="k2:<base64 32 bytes>,k1:<...>"` and/or a key file
(`RAGBUS_AUDIT_KEY_FILE`, same pairs, one per line or comma-separated, `#` comments). The first
key encrypts; every listed key decrypts, so rotation is: put the new key first, keep the old ones.
The row's `key_id` column names the key that sealed it.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

if TYPE_CHECKING:
    from infra.settings import Settings

ENC = "$enc"
NONCE_BYTES = 12
_KEY_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")

#: Event type → paths of its sensitive fields (`*` walks every item of a list).
SENSITIVE: dict[str, tuple[str, ...]] = {
    "chat.request": ("question", "history", "system_prompt"),
    "chat.enriched": ("request.question", "request.history", "request.system_prompt", "chunks.*.text"),
    "chat.response": ("answer",),
    "chat.token": ("text",),
    "docs.ingest": ("text", "data"),
    "dead_letter": ("original_value",),
    #: The payload the sink writes for bytes that are not an event.
    "raw": ("raw_b64",),
}


class KeyConfigError(ValueError):
    """A key list that cannot be used (the message never contains key material)."""


@dataclass(frozen=True)
class Keyring:
    #: key id → 32-byte key, in priority order (the first encrypts).
    keys: dict[str, bytes]

    @property
    def primary(self) -> str:
        return next(iter(self.keys))

    @classmethod
    def parse(cls, *sources: str) -> Keyring:
        keys: dict[str, bytes] = {}
        for text in sources:
            for key_id, key in _pairs(text):
                keys.setdefault(key_id, key)
        if not keys:
            raise KeyConfigError("no audit encryption keys found")
        return cls(keys)

    @classmethod
    def from_settings(cls, settings: Settings) -> Keyring | None:
        """The configured keys, or None when encryption is off (no keys configured)."""
        sources = []
        if settings.audit_encryption_keys is not None:
            sources.append(settings.audit_encryption_keys.get_secret_value())
        if settings.audit_key_file is not None:
            try:
                sources.append(Path(settings.audit_key_file).read_text())
            except OSError as e:
                raise KeyConfigError(
                    f"cannot read the audit key file {settings.audit_key_file}: {e}"
                ) from None
        if not any(s.strip() for s in sources):
            return None
        return cls.parse(*sources)

    def encrypt(self, plaintext: bytes, aad: bytes) -> str:
        nonce = os.urandom(NONCE_BYTES)
        sealed = AESGCM(self.keys[self.primary]).encrypt(nonce, plaintext, aad)
        return base64.b64encode(nonce + sealed).decode("ascii")

    def decrypt(self, key_id: str, token: str, aad: bytes) -> bytes:
        key = self.keys.get(key_id)
        if key is None:
            raise LookupError(f"key {key_id!r} is not configured")
        try:
            raw = base64.b64decode(token, validate=True)
            return AESGCM(key).decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], aad)
        except (InvalidTag, binascii.Error, ValueError):
            raise ValueError(f"ciphertext does not verify with key {key_id!r}") from None


def _pairs(text: str) -> Iterable[tuple[str, bytes]]:
    for line in text.splitlines():
        line = line.split("#", 1)[0]
        for item in line.split(","):
            item = item.strip()
            if not item:
                continue
            key_id, sep, b64 = item.partition(":")
            key_id = key_id.strip()
            if not sep or not _KEY_ID.match(key_id):
                raise KeyConfigError(
                    "audit keys are `key_id:base64key` pairs (key id: letters, digits, _ . -)"
                )
            try:
                key = base64.b64decode(b64.strip(), validate=True)
            except (binascii.Error, ValueError):
                raise KeyConfigError(f"audit key {key_id!r} is not valid base64") from None
            if len(key) != 32:
                raise KeyConfigError(f"audit key {key_id!r} has {len(key)} bytes; AES-256 needs 32")
            yield key_id, key


def generate_key(key_id: str) -> str:
    """A fresh `key_id:base64key` pair."""
    if not _KEY_ID.match(key_id):
        raise KeyConfigError("key ids are 1-64 letters, digits, _ . -")
    return f"{key_id}:{base64.b64encode(AESGCM.generate_key(bit_length=256)).decode('ascii')}"


def _aad(where: str, path: str) -> bytes:
    return f"{where}/{path}".encode()


def seal(obj: dict[str, Any], event_type: str, keyring: Keyring, where: str) -> bool:
    """Encrypt `obj`'s sensitive fields in place; `where` is `topic/partition/offset`.
    Returns whether anything was sealed."""
    sealed = False
    for pattern in SENSITIVE.get(event_type, ()):
        for parent, name, path in _locate(obj, pattern.split(".")):
            value = parent[name]
            if value is None:
                continue
            token = keyring.encrypt(orjson.dumps(value), _aad(where, path))
            parent[name] = {ENC: token}
            sealed = True
    return sealed


def _locate(node: Any, parts: list[str], prefix: str = "") -> Iterable[tuple[Any, Any, str]]:
    """(container, key, dotted path) of each field matched by `parts`."""
    head, rest = parts[0], parts[1:]
    if head == "*":
        items: Iterable[tuple[Any, Any]] = enumerate(node) if isinstance(node, list) else ()
    elif isinstance(node, dict) and head in node:
        items = [(head, node[head])]
    else:
        items = ()
    for key, child in items:
        path = f"{prefix}.{key}" if prefix else str(key)
        if rest:
            yield from _locate(child, rest, path)
        else:
            yield node, key, path


def unseal(obj: Any, key_id: str | None, keyring: Keyring | None, where: str) -> tuple[Any, list[str]]:
    """A copy of `obj` with every sealed field decrypted where the key is at hand.

    Returns (payload, problems): fields that stay sealed are left as `{"$enc": ...}` and each
    one's reason is listed in problems."""
    problems: list[str] = []

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, dict):
            if ENC in node and len(node) == 1 and isinstance(node[ENC], str):
                if keyring is None or key_id is None:
                    problems.append(f"{path}: encrypted with key {key_id!r}, which is not configured")
                    return node
                try:
                    return orjson.loads(keyring.decrypt(key_id, node[ENC], _aad(where, path)))
                except (LookupError, ValueError) as e:
                    problems.append(f"{path}: {e}")
                    return node
            return {k: walk(v, f"{path}.{k}" if path else k) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, f"{path}.{i}" if path else str(i)) for i, v in enumerate(node)]
        return node

    return walk(obj, ""), problems
