"""The test bed's isolation rule: everything of the cluster's networking lives in its own
network namespace; the host sees the API server on a loopback port only."""

from __future__ import annotations

import subprocess
from typing import Any
from urllib.parse import urlsplit

import pytest

pytestmark = pytest.mark.kubernetes

CLUSTER_PREFIXES = ("10.213.", "10.214.", "10.215.")


def _host(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30).stdout


def test_host_namespace_has_no_cluster_address_route_or_link(kube_testbed: Any) -> None:
    server = urlsplit(kube_testbed.server)
    assert server.hostname == "127.0.0.1"
    addresses = _host("ip", "-o", "addr")
    routes = _host("ip", "route") + _host("ip", "-6", "route")
    links = _host("ip", "-o", "link")
    for prefix in CLUSTER_PREFIXES:
        assert prefix not in addresses
        assert prefix not in routes
    for name in ("cni0", "node0", "veth"):
        assert f" {name}" not in links
    rules = "".join(_host("iptables", "-w", "-t", table, "-S") for table in ("filter", "nat"))
    assert "KUBE-" not in rules and "CNI-" not in rules
    # The node reports its address inside the namespace, never a host one.
    nodes = kube_testbed.raw("/api/v1/nodes")["items"]
    (internal,) = [
        a["address"] for a in nodes[0]["status"]["addresses"] if a["type"] == "InternalIP"
    ]
    assert internal.startswith("10.213.")
