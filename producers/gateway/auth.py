"""API keys → (tenant, user), from a TOML or JSON file. The tenant decides which tenant's topics
(and principal) the gateway uses for the key's requests:

```toml
[[keys]]
key = "sk-acme-1"            # or: sha256 = "<hex digest of the key>"
tenant = "acme"
user = "alice"
```
"""

from __future__ import annotations

import hashlib
import hmac
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path

from schemas.topics import check_tenant


@dataclass(frozen=True)
class Principal:
    tenant_id: str
    user_id: str


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
            entries[digest.lower()] = Principal(tenant, item.get("user", tenant))
        return cls(entries)

    def __len__(self) -> int:
        return len(self._by_digest)

    def resolve(self, key: str | None) -> Principal | None:
        if not key:
            return None
        digest = hashlib.sha256(key.encode()).hexdigest()
        found = None
        for known, principal in self._by_digest.items():
            if hmac.compare_digest(known, digest):
                found = principal
        return found
