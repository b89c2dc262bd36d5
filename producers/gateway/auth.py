"""API keys → (tenant, user), from a TOML or JSON file. The tenant decides which tenant's topics
(and principal) the gateway uses for the key's requests:

```toml
[[keys]]
key = "sk-acme-1"            # or: sha256 = "<hex digest of the key>"
tenant = "acme"
user = "alice"
# optional, this key's own quotas on top of its tenant's (0 or absent: none of its own)
rpm = 60                     # requests per minute
tpm = 20000                  # tokens per minute
monthly_tokens = 1000000     # tokens per calendar month (UTC)
```
"""

from __future__ import annotations

import hashlib
import hmac
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from producers.gateway.quota_windows import Limits
from schemas.topics import check_tenant

#: Per-key quota fields of a keys file entry.
_LIMIT_FIELDS = ("rpm", "tpm", "monthly_tokens")


@dataclass(frozen=True)
class Principal:
    tenant_id: str
    user_id: str
    #: The key's fingerprint (the first 16 hex digits of its sha256), never the key: its quota rows.
    key_id: str = field(default="", compare=False)
    #: The key's own quotas, if its entry sets any.
    limits: Limits | None = field(default=None, compare=False)


class ApiKeys:
    def __init__(self, entries: dict[str, Principal]) -> None:
        # Keys are held as sha256 digests only; lookups compare digests in constant time.
        self._by_digest = entries

    @classmethod
    def load(cls, path: Path | None) -> ApiKeys:
        if path is None:
            return cls({})
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        entries: dict[str, Principal] = {}
        for i, item in enumerate(data.get("keys", [])):
            digest = item.get("sha256") or (
                hashlib.sha256(item["key"].encode()).hexdigest() if "key" in item else None
            )
            if not digest or "tenant" not in item:
                raise ValueError(f"{path}: keys[{i}] needs `key` (or `sha256`) and `tenant`")
            try:
                tenant = check_tenant(str(item["tenant"]))
            except ValueError as e:
                raise ValueError(f"{path}: keys[{i}]: {e}") from None
            digest = digest.lower()
            entries[digest] = Principal(
                tenant,
                item.get("user", tenant),
                key_id=digest[:16],
                limits=_limits(item, f"{path}: keys[{i}]"),
            )
        return cls(entries)

    def __len__(self) -> int:
        return len(self._by_digest)

    @property
    def tenants(self) -> list[str]:
        """The tenants the keys name (whose batches this gateway runs)."""
        return sorted({p.tenant_id for p in self._by_digest.values()})

    def resolve(self, key: str | None) -> Principal | None:
        if not key:
            return None
        digest = hashlib.sha256(key.encode()).hexdigest()
        found = None
        for known, principal in self._by_digest.items():
            if hmac.compare_digest(known, digest):
                found = principal
        return found


def _limits(item: dict[str, Any], where: str) -> Limits | None:
    """The key's own quotas from its entry, or None when it sets none."""
    if not any(name in item for name in _LIMIT_FIELDS):
        return None
    values = {}
    for name in _LIMIT_FIELDS:
        value = item.get(name, 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{where}: `{name}` must be a whole number >= 0 (0: unlimited), not {value!r}")
        values[name] = value
    return Limits(**values)
