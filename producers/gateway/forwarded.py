"""The client's address behind proxies, from X-Forwarded-For.

Each proxy appends the address it received the request from, so only the right end of the header
was written by machines we trust; anything to the left of the first untrusted hop may be whatever
the client sent. The client is therefore the right-most hop that is not a trusted proxy — never
the left-most entry, which any client can forge.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_hop(text: str) -> IPAddress | None:
    """One X-Forwarded-For entry as an address: `1.2.3.4`, `1.2.3.4:5678`, `::1` or `[::1]:80`;
    None for anything else (`unknown`, a host name, garbage)."""
    text = text.strip()
    if text.startswith("["):  # [v6]:port
        text = text[1 : text.find("]")] if "]" in text else ""
    elif text.count(":") == 1:  # v4:port
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    # ::ffff:10.0.0.1 is the IPv4 peer 10.0.0.1 seen through a dual-stack socket.
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return mapped or address


def _trusted(address: IPAddress | None, proxies: Sequence[IPNetwork]) -> bool:
    return address is not None and any(address.version == net.version and address in net for net in proxies)


def client_address(
    peer: str | None,
    forwarded_for: Iterable[str],
    *,
    trust_forwarded_for: bool,
    trusted_proxies: Sequence[IPNetwork] = (),
) -> str | None:
    """The client's IP address, or None when there is no usable one.

    `peer` is the address of the TCP connection; `forwarded_for` the X-Forwarded-For header
    values in the order received. The header is only read when `trust_forwarded_for` is on and the
    peer is a trusted proxy: with `trusted_proxies` empty the peer is trusted as the one proxy in
    front of the gateway (so the client is the right-most entry); otherwise the peer must be in
    `trusted_proxies`, and the walk from the right skips every hop that is in it too. A hop that
    is not an IP address ends the walk at the last trusted one, which is then the best we know.
    """
    here = parse_hop(peer) if peer else None
    if not trust_forwarded_for or here is None:
        return str(here) if here is not None else None
    if trusted_proxies and not _trusted(here, trusted_proxies):
        return str(here)  # reached us directly, not through a proxy: its header is the client's own
    hops = [h for value in forwarded_for for h in value.split(",") if h.strip()]
    for text in reversed(hops):
        hop = parse_hop(text)
        if hop is None:
            break
        here = hop
        if not _trusted(hop, trusted_proxies):
            break
    return str(here)
