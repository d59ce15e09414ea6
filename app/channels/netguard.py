"""The network guard: SMTP hosts are chosen by Hosts, so the service refuses to reach its own network.

Resolve once, refuse loopback, private, link-local (cloud metadata too), multicast, reserved and unspecified
addresses, and connect to the address that was checked.
"""

from __future__ import annotations

import ipaddress
import socket

from app.channels.base import DeliveryError
from app.outcomes import DESTINATION_BLOCKED, PROVIDER_UNREACHABLE


def is_public_address(address: str) -> bool:
    """False for loopback, private, link-local (cloud metadata too), multicast, reserved, unspecified."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.is_site_local:
            return False
        # IPv6 forms that carry an IPv4 address are judged by that address.
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None:
            return is_public_address(str(embedded))
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified)


def literal_host_blocked(host: str) -> bool:
    """True when `host` is itself a refused address or a name that always means this machine."""
    name = host.strip().strip("[]").rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(name.split("%", 1)[0])
    except ValueError:
        return False
    return not is_public_address(name)


def resolve_checked(host: str, port: int, allow_private: bool) -> list[tuple[int, str]]:
    """Resolve once and return (family, address) pairs that may be connected to.

    The caller connects to these addresses, not to the name, so a second DNS answer cannot swap in a
    refused address after the check.
    """
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise DeliveryError(PROVIDER_UNREACHABLE, f"cannot resolve host {host!r}") from None
    allowed: list[tuple[int, str]] = []
    for family, _type, _proto, _canon, sockaddr in infos:
        address = str(sockaddr[0])
        if (allow_private or is_public_address(address)) and (family, address) not in allowed:
            allowed.append((family, address))
    if not allowed:
        # Same words whether or not anything listens there: the answer must not map the network.
        raise DeliveryError(DESTINATION_BLOCKED, f"host {host!r} resolves to an address that is not allowed")
    return allowed


def connect_checked(host: str, port: int, timeout: float, allow_private: bool) -> socket.socket:
    last_error: OSError | None = None
    for family, address in resolve_checked(host, port, allow_private):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect((address, port))
            return sock
        except OSError as exc:
            sock.close()
            last_error = exc
    assert last_error is not None
    raise last_error
