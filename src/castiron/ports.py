"""Free TCP ports: the one place castiron asks the kernel for a port nobody holds.

Owns :func:`free_port` and :func:`free_ports`. A port found free may be taken by another
process before the caller binds it; callers that can bind port 0 themselves should. It knows
nothing of castiron; it imports only the standard library.
"""

from __future__ import annotations

import socket


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` (an IPv4 or IPv6 literal) that is free right now.

    Raises:
        OSError: when ``host`` cannot be bound.
    """
    with socket.socket(_family(host), socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct TCP ports on ``host`` that are free right now (all held open
    together while they are chosen, so none is given twice).

    Raises:
        OSError: when ``host`` cannot be bound.
    """
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(_family(host), socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind((host, 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


__all__ = ["free_port", "free_ports"]
