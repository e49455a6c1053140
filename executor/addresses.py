"""What kind of network address a host name or IP literal is.

Owns ``is_loopback`` (the web page and the notifier decide with it whether a peer is this machine).

Must never: resolve a name through DNS (only ``localhost`` and IP literals are judged).
"""

from __future__ import annotations

import ipaddress


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` (``localhost``, an IPv4 or a bracketed or bare IPv6 literal) is the loopback."""
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
