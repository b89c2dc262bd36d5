import hashlib
from pathlib import Path

import pytest

from producers.gateway.auth import ApiKeys, Principal


def test_keys_from_toml_and_json(tmp_path: Path) -> None:
    toml = tmp_path / "keys.toml"
    digest = hashlib.sha256(b"sk-hashed").hexdigest()
    toml.write_text(
        '[[keys]]\nkey = "sk-acme"\ntenant = "acme"\nuser = "alice"\n\n'
        f'[[keys]]\nsha256 = "{digest}"\ntenant = "beta"\n'
    )
    keys = ApiKeys.load(toml)
    assert keys.resolve("sk-acme") == Principal("acme", "alice")
    assert keys.resolve("sk-hashed") == Principal("beta", "beta")
    assert keys.resolve("sk-unknown") is None and keys.resolve("") is None and keys.resolve(None) is None
    js = tmp_path / "keys.json"
    js.write_text('{"keys": [{"key": "k1", "tenant": "t1", "user": "u1"}]}')
    assert ApiKeys.load(js).resolve("k1") == Principal("t1", "u1")


def test_no_file_means_no_keys_and_bad_entries_are_refused(tmp_path: Path) -> None:
    assert len(ApiKeys.load(None)) == 0
    bad = tmp_path / "bad.toml"
    bad.write_text('[[keys]]\nkey = "k"\n')
    with pytest.raises(ValueError, match="tenant"):
        ApiKeys.load(bad)


def test_a_key_naming_an_invalid_tenant_is_refused_at_load(tmp_path: Path) -> None:
    """The tenant becomes part of topic and principal names: a key file cannot smuggle dots in."""
    bad = tmp_path / "bad.toml"
    bad.write_text('[[keys]]\nkey = "k"\ntenant = "acme.chat"\n')
    with pytest.raises(ValueError, match=r"keys\[0\]: invalid tenant name"):
        ApiKeys.load(bad)
