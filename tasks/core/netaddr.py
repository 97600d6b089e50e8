"""Host names and addresses as settings give them: which one means every interface, how one
goes into a URL, which one is this machine. Standard library only (the hub imports it)."""

from __future__ import annotations

import ipaddress
import socket

# What a listener binds to listen on every interface; no client can connect to these.
EVERY_INTERFACE = frozenset({"", "0.0.0.0", "::"})


def listens_everywhere(host: str) -> bool:
    return host in EVERY_INTERFACE


def local_address(host: str) -> str:
    """Where this machine reaches a listener bound to ``host``: loopback for every interface,
    so that it does not depend on the machine's name resolving."""
    return "127.0.0.1" if listens_everywhere(host) else host


def url_host(host: str) -> str:
    """``host`` as the host part of a URL: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host else host


def host_of(netloc: str) -> str:
    """The host of ``host[:port]`` (``[v6][:port]`` too), brackets dropped."""
    if netloc.startswith("["):
        return netloc[1:].split("]", 1)[0]
    return netloc.rsplit(":", 1)[0] if netloc.count(":") == 1 else netloc


def ip_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``text`` as an address (a zone index dropped), None if it is a name."""
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    # A dual-stack server sees IPv4 clients as ::ffff:a.b.c.d.
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped or address


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    address = ip_address(host)
    return bool(address and address.is_loopback)


def machine_name() -> str:
    """This machine's DNS name, or its host name where DNS only knows it as localhost."""
    fqdn = socket.getfqdn()
    return socket.gethostname() if fqdn.split(".")[0] == "localhost" else fqdn
