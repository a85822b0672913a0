"""DNS test helpers: kubectl-shaped objects, snapshot files, dig, dnspython, a fake upstream.

Everything talks to loopback only. The fake upstream is a real UDP + TCP DNS server (threads,
dnspython messages) on 127.0.0.x that answers from a table, can stay silent (timeouts) or
truncate UDP answers (TC=1) so the TCP retry is exercised.
"""

from __future__ import annotations

import shutil
import socket
import socketserver
import subprocess
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
import yaml

DIG = shutil.which("dig")
needs_dig = pytest.mark.skipif(DIG is None, reason="dig (Debian bind9-dnsutils) is not installed")

# -- kubectl-shaped objects --------------------------------------------------------------


def namespace(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name}},
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"},
    }


def service(
    ns: str,
    name: str,
    *,
    cluster_ips: Iterable[str] | None = ("10.43.0.10",),
    ports: Iterable[tuple[str, int, str]] = (),
    external_name: str = "",
    publish_not_ready: bool = False,
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "ports": [
            {"name": pname, "port": port, "protocol": proto, "targetPort": port}
            for pname, port, proto in ports
        ],
        "type": "ClusterIP",
        "sessionAffinity": "None",
    }
    if not spec["ports"]:
        del spec["ports"]
    if external_name:
        spec["type"] = "ExternalName"
        spec["externalName"] = external_name
    elif cluster_ips is None:
        spec["clusterIP"] = "None"
        spec["clusterIPs"] = ["None"]
        spec["selector"] = {"app": name}
    else:
        ips = list(cluster_ips)
        spec["clusterIP"] = ips[0]
        spec["clusterIPs"] = ips
        spec["ipFamilies"] = ["IPv6" if ":" in ip else "IPv4" for ip in ips]
        spec["selector"] = {"app": name}
    if publish_not_ready:
        spec["publishNotReadyAddresses"] = True
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": ns, "uid": f"uid-{ns}-{name}"},
        "spec": spec,
        "status": {"loadBalancer": {}},
    }


def endpoint_slice(
    ns: str,
    svc: str,
    name: str,
    endpoints: Iterable[dict[str, Any]],
    *,
    ports: Iterable[tuple[str, int, str]] = (),
    address_type: str = "IPv4",
) -> dict[str, Any]:
    """``endpoints``: dicts with ``ip`` and optional ``hostname`` and ``ready`` (None: unset)."""
    items = []
    for ep in endpoints:
        item: dict[str, Any] = {"addresses": [ep["ip"]], "nodeName": "node-a"}
        conditions: dict[str, Any] = {}
        if ep.get("ready", True) is not None:
            conditions["ready"] = ep.get("ready", True)
            conditions["serving"] = ep.get("ready", True)
            conditions["terminating"] = False
        item["conditions"] = conditions
        if ep.get("hostname"):
            item["hostname"] = ep["hostname"]
        items.append(item)
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "addressType": address_type,
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": {"kubernetes.io/service-name": svc},
        },
        "endpoints": items,
        "ports": [{"name": n, "port": p, "protocol": proto} for n, p, proto in ports],
    }


def pod(
    ns: str,
    name: str,
    ip: str,
    *,
    hostname: str = "",
    subdomain: str = "",
    ready: bool = True,
    host_network: bool = False,
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "containers": [{"name": "c", "image": "busybox"}],
        "nodeName": "node-a",
    }
    if hostname:
        spec["hostname"] = hostname
    if subdomain:
        spec["subdomain"] = subdomain
    if host_network:
        spec["hostNetwork"] = True
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "uid": f"uid-pod-{name}"},
        "spec": spec,
        "status": {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


def write_snapshot(path: Path, objects: Iterable[dict[str, Any]]) -> Path:
    """Multi-document YAML, written atomically (so the daemon never reads half a file)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump_all(list(objects), sort_keys=False))
    tmp.replace(path)
    return path


Z = "cluster.local"


def kube_cluster() -> list[dict[str, Any]]:
    """The cluster most DNS tests ask about (see tests/dns/test_kubernetes.py)."""
    objects = [
        namespace("default"),
        namespace("shop"),
        namespace("quiet"),
        service(
            "shop",
            "web",
            cluster_ips=["10.43.0.20", "fd00:43::20"],
            ports=[("http", 80, "TCP"), ("dns", 53, "UDP"), ("", 8443, "TCP")],
        ),
        service(
            "shop", "db", cluster_ips=None, ports=[("mysql", 3306, "TCP"), ("x", 33060, "TCP")]
        ),
        endpoint_slice(
            "shop",
            "db",
            "db-v4",
            [
                {"ip": "10.42.1.10", "hostname": "db-0"},
                {"ip": "10.42.1.11"},
                {"ip": "10.42.1.12", "hostname": "db-2", "ready": False},
                {"ip": "10.42.1.13", "ready": None},
            ],
            ports=[("mysql", 3306, "TCP"), ("x", 33060, "TCP")],
        ),
        endpoint_slice(
            "shop",
            "db",
            "db-v6",
            [{"ip": "fd00:42::10", "hostname": "db-0"}],
            ports=[("mysql", 3306, "TCP"), ("x", 33060, "TCP")],
            address_type="IPv6",
        ),
        service("shop", "warm", cluster_ips=None, publish_not_ready=True),
        endpoint_slice("shop", "warm", "warm-1", [{"ip": "10.42.1.20", "ready": False}]),
        service("shop", "cold", cluster_ips=None),
        endpoint_slice("shop", "cold", "cold-1", [{"ip": "10.42.1.21", "ready": False}]),
        service("shop", "ext", external_name="www.example.org"),
        service("shop", "inner", external_name=f"web.shop.svc.{Z}"),
        service("shop", "big", cluster_ips=None),
        endpoint_slice("shop", "big", "big-1", [{"ip": f"10.42.3.{i}"} for i in range(1, 61)]),
        pod("shop", "db-0", "10.42.1.10", hostname="db-0", subdomain="db"),
        pod("shop", "sub-1", "10.42.1.30", hostname="sp", subdomain="db"),
        pod("shop", "plain", "10.42.1.40"),
        pod("shop", "hostnet", "192.168.1.10", host_network=True),
    ]
    return objects


# -- clients -----------------------------------------------------------------------------


def dig(port: int, *args: str, server: str = "127.0.0.1", timeout: int = 2) -> str:
    """Run Debian's dig against our server; returns stdout."""
    assert DIG is not None
    result = subprocess.run(
        [DIG, f"@{server}", "-p", str(port), "+tries=1", f"+time={timeout}", *args],
        capture_output=True,
        text=True,
        timeout=timeout * 3 + 5,
        check=False,
    )
    return result.stdout


def dig_short(port: int, *args: str) -> list[str]:
    return sorted(line for line in dig(port, "+short", *args).splitlines() if line)


def query(
    port: int,
    name: str,
    rdtype: str = "A",
    *,
    tcp: bool = False,
    host: str = "127.0.0.1",
    timeout: float = 3,
    **make: Any,
) -> dns.message.Message:
    message = dns.message.make_query(name, rdtype, **make)
    if tcp:
        return dns.query.tcp(message, host, port=port, timeout=timeout)
    return dns.query.udp(message, host, port=port, timeout=timeout, ignore_trailing=False)


def answers(response: dns.message.Message) -> list[str]:
    """Answer records as sorted 'name ttl type rdata' text."""
    return sorted(
        f"{rrset.name} {rrset.ttl} {dns.rdatatype.to_text(rrset.rdtype)} {rdata}"
        for rrset in response.answer
        for rdata in rrset
    )


def rcode(response: dns.message.Message) -> str:
    return dns.rcode.to_text(response.rcode())


def raw_udp(port: int, data: bytes, *, timeout: float = 2) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(data, ("127.0.0.1", port))
        try:
            return sock.recv(65535)
        except TimeoutError:
            return None


# -- a fake upstream ---------------------------------------------------------------------


@dataclass
class FakeUpstream:
    """A loopback DNS server answering from ``records`` ({(name, type): [rdata text]}),
    NXDOMAIN with an SOA for ``nxdomain`` names, silent when ``silent``, and TC=1 over UDP
    when ``truncate_udp``. Counts the queries it saw per transport."""

    host: str = "127.0.0.2"
    records: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    ttl: int = 300
    soa_minimum: int = 60
    silent: bool = False
    truncate_udp: bool = False
    queries: list[tuple[str, str, str]] = field(default_factory=list)  # (proto, name, type)
    port: int = 0
    on_query: Callable[[dns.message.Message], None] | None = None
    relay_to: tuple[str, int] | None = None  # pass every query on to this server (a loop)

    def start(self) -> FakeUpstream:
        upstream = self

        class Udp(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                data, sock = self.request
                reply = upstream._answer(data, "udp")
                if reply is not None:
                    sock.sendto(reply, self.client_address)

        class Tcp(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                size = int.from_bytes(self.rfile.read(2), "big")
                reply = upstream._answer(self.rfile.read(size), "tcp")
                if reply is not None:
                    self.wfile.write(len(reply).to_bytes(2, "big") + reply)

        socketserver.UDPServer.allow_reuse_address = True
        self._udp = socketserver.ThreadingUDPServer((self.host, self.port), Udp)
        self.port = self._udp.server_address[1]
        socketserver.TCPServer.allow_reuse_address = True
        self._tcp = socketserver.ThreadingTCPServer((self.host, self.port), Tcp)
        for server in (self._udp, self._tcp):
            server.daemon_threads = True
            threading.Thread(target=server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        for server in (self._udp, self._tcp):
            server.shutdown()
            server.server_close()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def _answer(self, data: bytes, proto: str) -> bytes | None:
        query = dns.message.from_wire(data)
        question = query.question[0]
        name = question.name.to_text().lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        self.queries.append((proto, name, rdtype))
        if self.on_query is not None:
            self.on_query(query)
        if self.silent:
            return None
        if self.relay_to is not None:
            return raw_udp(self.relay_to[1], data, timeout=3)
        response = dns.message.make_response(query)
        response.flags |= dns.flags.RA
        values = self.records.get((name, rdtype))
        if values:
            response.answer.append(
                dns.rrset.from_text_list(question.name, self.ttl, "IN", rdtype, values)
            )
            if proto == "udp" and self.truncate_udp:
                response.answer = []
                response.flags |= dns.flags.TC
        else:
            exists = any(n == name for n, _ in self.records)
            if not exists:
                response.set_rcode(dns.rcode.NXDOMAIN)
            response.authority.append(
                dns.rrset.from_text(
                    "example.",
                    self.ttl,
                    "IN",
                    "SOA",
                    f"ns.example. host.example. 1 7200 1800 86400 {self.soa_minimum}",
                )
            )
        return response.to_wire()
