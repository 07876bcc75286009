"""The values of model.py that several layers share: an address parses and formats both ways
(IPv6 in brackets), a bad one is an error naming the text; a health check is one value."""

from __future__ import annotations

import pytest

from castiron.model import HEALTH_KINDS, Address, HealthCheck


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("127.0.0.1:8080", "127.0.0.1", 8080),
        ("localhost:0", "localhost", 0),
        ("[::1]:80", "::1", 80),
        ("[fe80::1]:65535", "fe80::1", 65535),
    ],
)
def test_an_address_parses_and_formats_back(text: str, host: str, port: int) -> None:
    address = Address.parse(text)
    assert (address.host, address.port) == (host, port)
    assert str(address) == text
    assert Address.parse(str(address)) == address


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nohost", "'nohost' is not HOST:PORT"),
        (":80", "':80' is not HOST:PORT"),
        ("::1:80", r"'::1:80' is not HOST:PORT \(write IPv6 hosts in brackets: \[::1\]:80\)"),
        ("127.0.0.1:http", "'127.0.0.1:http': port 'http' must be a number from 0 to 65535"),
        ("127.0.0.1:65536", "'127.0.0.1:65536': port '65536' must be"),
        ("127.0.0.1:", "'127.0.0.1:': port '' must be"),
    ],
)
def test_a_bad_address_names_the_text(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Address.parse(text)


def test_a_health_check_is_a_value_with_a_closed_kind() -> None:
    check = HealthCheck(kind="http", target="/healthz", interval=0.5)
    assert check == HealthCheck("http", "/healthz", 0.5)
    assert hash(check) == hash(HealthCheck("http", "/healthz", 0.5))
    assert HealthCheck().kind == "tcp"
    assert set(HEALTH_KINDS) == {"http", "tcp", "command", "none"}


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("8080", "'8080' is not HOST:PORT"),
        ("example.com:80", "'example.com' is not an IP address or 'localhost'"),
        ("::1:80", r"write IPv6 hosts in brackets: \[::1\]:80"),
        ("[10.0.0.1]:80", r"'\[10.0.0.1\]' is not an IPv6 address"),
        ("127.0.0.1:0", "port '0' must be a number from 1 to 65535"),
    ],
)
def test_a_listen_address_is_checked_in_one_place(text: str, error: str) -> None:
    """The spec's listen, the agent's routes and backends take addresses through this one
    parser (the same words wherever an address is refused)."""
    with pytest.raises(ValueError, match=error):
        Address.parse_listen(text)


def test_listen_addresses_parse_to_one_value() -> None:
    assert Address.parse_listen("[::1]:8080") == Address("::1", 8080)
    assert str(Address.parse_listen("[::1]:8080")) == "[::1]:8080"
    assert Address.parse_listen("localhost:80") == Address("localhost", 80)
