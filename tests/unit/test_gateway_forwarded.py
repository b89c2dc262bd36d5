"""Which address the gateway records as the client's behind proxies (X-Forwarded-For)."""

from __future__ import annotations

import ipaddress

import pytest

from producers.gateway.forwarded import client_address, parse_hop

NETS = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8")]


def test_the_header_is_ignored_unless_trusted() -> None:
    assert client_address("10.1.1.1", ["6.6.6.6"], trust_forwarded_for=False) == "10.1.1.1"
    assert client_address(None, ["6.6.6.6"], trust_forwarded_for=True) is None
    assert client_address("testclient", ["6.6.6.6"], trust_forwarded_for=True) is None


def test_one_proxy_the_client_is_the_right_most_entry_not_the_forged_left_most() -> None:
    # The client sent "X-Forwarded-For: 1.1.1.1"; the proxy appended the address it saw.
    got = client_address("10.0.0.5", ["1.1.1.1, 203.0.113.7"], trust_forwarded_for=True)
    assert got == "203.0.113.7"
    assert client_address("10.0.0.5", [], trust_forwarded_for=True) == "10.0.0.5"


def test_trusted_proxies_are_skipped_from_the_right() -> None:
    header = ["1.1.1.1, 203.0.113.7, 10.2.0.1", "10.3.0.1"]  # two header lines read as one list
    got = client_address("10.0.0.5", header, trust_forwarded_for=True, trusted_proxies=NETS)
    assert got == "203.0.113.7"
    v6 = client_address("fd00::1", ["2001:db8::9, fd00::2"], trust_forwarded_for=True, trusted_proxies=NETS)
    assert v6 == "2001:db8::9"


def test_a_peer_that_is_not_a_trusted_proxy_cannot_set_the_address() -> None:
    got = client_address("198.51.100.3", ["1.1.1.1"], trust_forwarded_for=True, trusted_proxies=NETS)
    assert got == "198.51.100.3"


def test_every_hop_trusted_gives_the_left_most_proxy() -> None:
    got = client_address("10.0.0.5", ["10.9.9.9, 10.2.0.1"], trust_forwarded_for=True, trusted_proxies=NETS)
    assert got == "10.9.9.9"


def test_garbage_ends_the_walk_at_the_last_trusted_hop() -> None:
    kw = {"trust_forwarded_for": True, "trusted_proxies": NETS}
    assert client_address("10.0.0.5", ["1.1.1.1, unknown, 10.2.0.1"], **kw) == "10.2.0.1"  # type: ignore[arg-type]
    assert client_address("10.0.0.5", ["<script>"], trust_forwarded_for=True) == "10.0.0.5"
    assert client_address("10.0.0.5", [" , ,"], trust_forwarded_for=True) == "10.0.0.5"


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("203.0.113.7", "203.0.113.7"),
        (" 203.0.113.7:5555 ", "203.0.113.7"),
        ("2001:db8::1", "2001:db8::1"),
        ("[2001:db8::1]:443", "2001:db8::1"),
        ("::ffff:10.0.0.1", "10.0.0.1"),
        ("unknown", None),
        ("[2001:db8::1", None),
        ("999.1.1.1", None),
        ("", None),
    ],
)
def test_parse_hop(text: str, address: str | None) -> None:
    hop = parse_hop(text)
    assert (str(hop) if hop is not None else None) == address
