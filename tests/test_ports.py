"""Free ports: each one can be bound at once, several are distinct, and IPv6 works where the
host has it."""

from __future__ import annotations

import socket

import pytest

from castiron.ports import free_port, free_ports


def _bind(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, port))


def test_a_free_port_can_be_bound() -> None:
    port = free_port()
    assert 0 < port < 65536
    _bind("127.0.0.1", port)


def test_free_ports_are_distinct_and_bindable() -> None:
    ports = free_ports(5)
    assert len(set(ports)) == 5
    for port in ports:
        _bind("127.0.0.1", port)


def test_an_ipv6_host() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this host")
    try:
        port = free_port("::1")
    except OSError:
        pytest.skip("::1 cannot be bound here")
    _bind("::1", port)


def test_a_host_that_cannot_be_bound_raises_oserror() -> None:
    with pytest.raises(OSError):
        free_port("192.0.2.1")  # TEST-NET-1: never an address of this host
