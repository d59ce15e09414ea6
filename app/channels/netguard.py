"""The network guard: SMTP hosts are chosen by Hosts, so the service refuses to reach its own network.

Resolve once, refuse loopback, private, link-local (cloud metadata too), multicast, reserved and unspecified
addresses, and connect to the address that was checked.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
from typing import Any

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


def _resolve_within(host: str, port: int, seconds: float) -> list[Any]:
    """getaddrinfo, given up after `seconds`: the resolver has no timeout of its own that the caller sets, and a
    hanging one must not hold a delivery past its deadline. The lookup goes on in its daemon thread until the
    resolver answers; nothing waits for it."""
    found: dict[str, Any] = {}
    done = threading.Event()

    def lookup() -> None:
        try:
            found["infos"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            found["error"] = exc
        finally:
            done.set()

    threading.Thread(target=lookup, name="resolve", daemon=True).start()
    if not done.wait(max(seconds, 0)):
        raise DeliveryError(PROVIDER_UNREACHABLE, f"resolving {host!r} took longer than {seconds:g} s")
    if "error" in found:
        raise DeliveryError(PROVIDER_UNREACHABLE, f"cannot resolve host {host!r}")
    return found["infos"]


def resolve_checked(host: str, port: int, allow_private: bool, seconds: float = 10.0) -> list[tuple[int, str]]:
    """Resolve once, within `seconds`, and return (family, address) pairs that may be connected to.

    The caller connects to these addresses, not to the name, so a second DNS answer cannot swap in a
    refused address after the check.
    """
    infos = _resolve_within(host.strip("[]"), port, seconds)
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
    """A connection to an allowed address of `host`, resolution included, within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_error: OSError | None = None
    for family, address in resolve_checked(host, port, allow_private, timeout):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no connection to {host!r} within {timeout:g} s")
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(left)
        try:
            sock.connect((address, port))
            return sock
        except OSError as exc:
            sock.close()
            last_error = exc
    assert last_error is not None
    raise last_error
