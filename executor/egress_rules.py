"""What an ``egress`` entry of a policy means: a host name (or ``*.`` + a domain) or an IP literal, and a port.

Owns parsing and validating entries (``parse_egress``: a bad entry's error says what is wrong and how to
write it), matching a request's host and port against the rules, and ``forbidden_reason``: which
addresses a name may never lead to (loopback, private, link-local, multicast, unspecified, reserved,
cloud metadata) unless an entry names that IP literally.

Must never: resolve a name (the egress proxy resolves, once, and checks what it got), or accept a range,
a scheme or a path in an entry.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Union

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

METADATA = frozenset({ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")})
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


@dataclass(frozen=True)
class Rule:
    """One ``egress`` entry: a host name (or ``*.`` + a domain, for its subdomains only) or an IP, and a port."""

    host: str  # lower-case name without the "*." prefix, or the IP in its canonical text
    port: int
    wildcard: bool = False
    ip: IPAddress | None = None

    def matches(self, host: str, port: int, ip: IPAddress | None) -> bool:
        if port != self.port:
            return False
        if self.ip is not None or ip is not None:
            return self.ip == ip  # an IP is matched only by an entry naming that IP
        if self.wildcard:
            return host.endswith("." + self.host)
        return host == self.host

    def __str__(self) -> str:
        host = f"[{self.ip}]" if self.ip is not None and self.ip.version == 6 else \
            ("*." if self.wildcard else "") + self.host
        return f"{host}:{self.port}"


def parse_egress(entries: Iterable[object]) -> list[Rule]:
    """The rules of a job's ``egress`` list; ValueError names the bad entry, what is wrong, how to fix it."""
    if isinstance(entries, (str, bytes)):
        raise ValueError('egress must be a list of "host:port" strings, e.g. ["packages.example.com:443"], '
                         'not one string')
    return [_parse_entry(entry) for entry in entries]


def _parse_entry(entry: object) -> Rule:
    if not isinstance(entry, str):
        raise ValueError(f'egress entry {entry!r} is not a string; write "host:port", e.g. "packages.example.com:443"')
    text = entry.strip().lower()
    if "/" in text and "://" not in text and ip_or_none(text.split("/")[0].strip("[]")) is not None:
        raise ValueError(f'egress entry {entry!r}: IP ranges are not supported; list each address as ip:port, '
                         f'e.g. "192.0.2.10:443"')
    if "://" in text or "/" in text:
        raise ValueError(f'egress entry {entry!r}: write host:port only, without scheme or path, '
                         f'e.g. "packages.example.com:443"')
    host, port = _split_host_port(entry, text)
    ip = ip_or_none(host)
    if ip is not None:
        return Rule(str(ip), port, ip=ip)
    wildcard = host.startswith("*.")
    name = host[2:] if wildcard else host
    if "*" in name:
        raise ValueError(f'egress entry {entry!r}: "*" is allowed only as a leading "*." '
                         f'(e.g. "*.example.org:443" for every subdomain of example.org)')
    _check_name(entry, name)
    if wildcard and name.count(".") < 1:
        raise ValueError(f'egress entry {entry!r}: a wildcard must name a domain with at least two labels, '
                         f'e.g. "*.example.org:443", not a whole top-level domain')
    return Rule(name.rstrip("."), port, wildcard=wildcard)


def _split_host_port(entry: str, text: str) -> tuple[str, int]:
    if text.startswith("["):  # [IPv6]:port
        host, sep, port = text[1:].partition("]:")
        if not sep or ip_or_none(host) is None or ":" not in host:
            raise ValueError(f'egress entry {entry!r}: write an IPv6 address as "[2001:db8::1]:443"')
    else:
        host, sep, port = text.rpartition(":")
        if not sep or not host:
            raise ValueError(f'egress entry {entry!r} has no port; add it, e.g. "{text or "packages.example.com"}:443"')
        if ":" in host:
            raise ValueError(f'egress entry {entry!r}: put an IPv6 address in brackets, e.g. "[{host}]:{port}"')
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f'egress entry {entry!r}: port {port!r} is not a number from 1 to 65535')
    return host, int(port)


def _check_name(entry: str, name: str) -> None:
    if "/" in name or not name or len(name.rstrip(".")) > 253:
        raise ValueError(f'egress entry {entry!r}: {name!r} is not a host name')
    for label in name.rstrip(".").split("."):
        if not _LABEL.match(label):
            raise ValueError(f'egress entry {entry!r}: {name!r} is not a valid host name (label {label!r}: '
                             f'use letters, digits and inner hyphens, 1-63 characters; IP ranges are not supported)')


def ip_or_none(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def forbidden_reason(ip: IPAddress) -> str | None:
    """Why the sandbox may not reach ``ip`` through a host name, or None for a public address."""
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:10.0.0.1 is 10.0.0.1
    if ip in METADATA:
        return "a cloud metadata address"
    for reason, hit in (("loopback", ip.is_loopback), ("unspecified", ip.is_unspecified),
                        ("link-local", ip.is_link_local), ("multicast", ip.is_multicast),
                        ("private", ip.is_private), ("reserved", ip.is_reserved)):
        if hit:
            return f"a {reason} address"
    if not ip.is_global:
        return "not a public address"  # e.g. 100.64.0.0/10, shared address space
    return None
