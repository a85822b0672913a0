"""Settings: one frozen dataclass, filled from a YAML file, then the environment, then flags.

Every key of the YAML file is a field of :class:`Settings` (same name); the environment
variable is ``NODE_SERVICES_<KEY>`` in upper case, except the conventional ``NODE_NAME`` and
``CATTLE_URL`` / ``CATTLE_ACCESS_KEY`` / ``CATTLE_SECRET_KEY``. :func:`load_settings` reports
every problem at once in a :class:`ConfigError`.
"""

from __future__ import annotations

import difflib
import ipaddress
import itertools
import os
import re
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import yaml

POD_RECORDS: Final = ("disabled", "insecure", "verified")
OVERLAYS: Final = ("none", "vxlan", "host-gw", "wireguard")
IPAM_MODES: Final = ("auto", "on", "off")
TX_CHECKSUM_OFFLOAD_MODES: Final = ("auto", "on", "off")
WIREGUARD_IMPLEMENTATIONS: Final = ("auto", "kernel", "userspace")
DNS_AUTOPATH_MODES: Final = ("off", "on")
LOG_LEVELS: Final = ("debug", "info", "warning", "error")
MAX_DNS_LISTEN: Final = 64
"""dns_listen addresses at most: two sockets each, and the hand-over passes every listener in
one SCM_RIGHTS message (at most 253 descriptors)."""


class ConfigError(Exception):
    """The configuration is invalid; ``problems`` lists every reason, one line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid configuration:\n  " + "\n  ".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class Address:
    """A listen or upstream address."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ForwardZone:
    """A stub domain: names in ``zone`` (lowercase, with the trailing dot; "." is the
    default) are forwarded to ``upstreams``, each given ``timeout`` seconds (None: the
    dns_forward_timeout setting)."""

    zone: str
    upstreams: tuple[Address, ...]
    timeout: float | None = None

    def __str__(self) -> str:
        timeout = f",timeout={self.timeout:g}" if self.timeout is not None else ""
        return f"{self.zone}=" + ",".join(str(u) for u in self.upstreams) + timeout


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the daemon is configured with. Field docstrings are the reference docs."""

    node_name: str = ""
    """This node's name as the sources know it (Kubernetes Node name, Cattle hostname).
    Env NODE_NAME; default: the machine's hostname."""

    snapshots: tuple[Path, ...] = ()
    """Snapshot files (Kubernetes objects as `kubectl get -o yaml` prints them and/or Cattle
    v2-beta resources) loaded into the cache, reloaded on change and on SIGHUP."""

    snapshot_poll_interval: float = 1.0
    """Seconds between checks of the snapshot files for changes (0 disables polling;
    SIGHUP still reloads)."""

    dns_listen: tuple[Address, ...] = field(default_factory=lambda: (Address("0.0.0.0", 53),))
    """UDP and TCP address of the DNS server; a list for several (node-local DNS:
    `[169.254.20.10:53, 10.96.0.10:53]`, the link-local address and the kube-dns ClusterIP,
    both on a local interface), at most 64. A restart hands every one over; the hand-over
    socket is named after the first; a successor looks at every address's. An IPv6 address serves
    IPv6 only (`[::]:53` beside `0.0.0.0:53` for both families)."""

    cluster_domain: str = "cluster.local"
    """The Kubernetes cluster domain answered authoritatively."""

    dns_ttl: int = 5
    """TTL in seconds of answers for cluster names (also the SOA minimum)."""

    upstreams: tuple[Address, ...] = ()
    """DNS servers for names outside the cluster zones; default: the host's /etc/resolv.conf
    without loopback stubs. IP addresses, port 53 unless given (a host name is an error).
    When resolv.conf names only loopback stubs (systemd-resolved's 127.0.0.53), the
    nameservers of /run/systemd/resolve/resolv.conf; none anywhere: an error is logged and
    names outside the cluster zones get REFUSED."""

    pod_records: str = "disabled"
    """Pod A records `a-b-c-d.<ns>.pod.<zone>`: disabled, insecure (any well-formed name),
    verified (only IPs of known pods in that namespace)."""

    dns_query_log: bool = False
    """Log every DNS query (client, name, type, rcode, answers, milliseconds) at info level
    on the node_services.dns.query logger."""

    dns_forward_timeout: float = 2.0
    """Seconds to wait for one upstream before trying the next (SERVFAIL when all time out)."""

    dns_cache_size: int = 10000
    """Responses the forward cache holds (least recently used go first); 0 disables it."""

    dns_cache_bytes: int = 16777216
    """Memory budget in bytes of the forward cache (16 MiB): each entry counts its response,
    its key and about 550 bytes of bookkeeping; least recently used go first; 0 disables it.
    Both this and dns_cache_size apply."""

    dns_upstream_sockets: int = 16
    """UDP sockets (per address family) shared by all queries to upstreams, each on its own
    random port, renewed every 10000 queries."""

    dns_answer_cache_size: int = 65536
    """In-zone UDP answers kept by the exact query bytes (all but the ID), so a query asked
    before skips the lookup; emptied whenever the zone changes, started over when full. A cap
    on the entry count; memory is capped by dns_answer_cache_bytes. 0 disables it."""

    dns_answer_cache_bytes: int = 32 << 20
    """Bytes the in-zone UDP answer cache may cost: query keys (a client chooses their size,
    up to 4 KB with EDNS options), answers and per-entry overhead (~300 bytes an entry for
    ordinary queries); started over when full. 32 MiB by default (room for the 65,536 entries
    of ordinary queries the entry cap allows); 0 disables the cache."""

    dns_negative_ttl_cap: int = 300
    """Longest time in seconds a negative upstream answer is cached (RFC 2308: the SOA
    minimum, capped by this)."""

    dns_max_forwards: int = 1000
    """Forwarded queries waiting for upstreams at once; more are answered REFUSED."""

    metadata_listen: Address = field(default_factory=lambda: Address("169.254.169.250", 80))
    """HTTP address of the metadata service (the Rancher metadata address by default)."""

    metadata_trusted_proxies: tuple[str, ...] = ()
    """Addresses or CIDRs of proxies whose `Forwarded` (RFC 7239) or `X-Forwarded-For` header
    the metadata service believes; a request carrying either header from any other peer gets
    403."""

    metadata_access_log: bool = False
    """Log one line per metadata request (logger node_services.metadata.access)."""

    metadata_cache_bytes: int = 32 * 1024 * 1024
    """Bytes the metadata service's rendered-answer caches may hold together, counting keys
    (paths, Accept headers, peers), bodies, headers and a per-entry overhead; when full they
    start over. 0 disables them."""

    metadata_prepare_above: int = 5000
    """Records from which the metadata service builds a new snapshot's trees (in a worker
    thread) before showing it: until then it answers from, and reports the version of, the
    snapshot it shows. Below, a new version is shown at once and trees build on first use."""

    metadata_environment_name: str = "Default"
    """Environment name the metadata service shows at `/<version>/name` (Rancher's project)."""

    metadata_environment_uuid: str = ""
    """Environment uuid shown at `/<version>/uuid` and as `environment_uuid` on objects."""

    metadata_region_name: str = "local"
    """Region name shown at `/<version>/region_name`."""

    admin_listen: Address = field(default_factory=lambda: Address("0.0.0.0", 9254))
    """HTTP address of /healthz, /readyz and /metrics."""

    kubeconfig: Path | None = None
    """Kubeconfig file for the Kubernetes source (enables it); without one, the in-cluster
    service account is used when running in a pod (KUBERNETES_SERVICE_HOST is set)."""

    kube_read_timeout: float = 120.0
    """Seconds a Kubernetes watch may stay silent (no event, no bookmark) before it is taken
    as dead and re-opened from the last resourceVersion."""

    kube_page_size: int = 500
    """Objects per page when listing from the Kubernetes API (`limit`/`continue`)."""

    ipam_dir: Path = Path("/var/lib/node-services/ipam")
    """Directory of the IPAM store, shared with the CNI plugin (its `dataDir`)."""

    ipam: str = "auto"
    """IPAM reconcile in the daemon (persist this node's pod CIDRs for `"range": "node"`,
    release leaked addresses, pool metrics): on, off, or auto (on once ipam_dir exists, also
    when it appears after start: checked every second)."""

    ipam_leak_grace: float = 600.0
    """Seconds an allocation must stay without a workload on this node before the daemon
    releases it as leaked."""

    ipam_reconcile_interval: float = 10.0
    """Seconds between IPAM reconcile passes (it also runs on every state change)."""

    overlay: str = "none"
    """Overlay between nodes: none, vxlan (one VXLAN device, a route + neighbour + FDB entry
    per peer) or host-gw (a route per peer via its underlay address; peers must be on a
    directly connected network). Needs CAP_NET_ADMIN in the host's network namespace.
    Also wireguard: one WireGuard device, a peer (public key, endpoint, AllowedIPs = its pod
    CIDRs) and a route per pod CIDR per peer; pod traffic between nodes encrypted."""

    overlay_interface: str = ""
    """Interface whose address carries overlay traffic; default: the one holding this node's
    underlay address (node-services.io/public-ip, else its InternalIP / agent IP), else the
    one the route to it leaves by."""

    overlay_reconcile_interval: float = 10.0
    """Seconds between overlay reconcile passes (it also runs on every state change): entries
    deleted or changed by hand are repaired within one interval."""

    overlay_mtu: int = 0
    """MTU of the overlay device and of the pods (CNI conf); 0: the underlay interface's MTU
    less 50 (VXLAN over IPv4; 70 over IPv6), or the underlay's for host-gw; less 80 for
    wireguard (both families)."""

    overlay_vxlan_device: str = "ns-vxlan.1"
    """Name of the VXLAN device (VXLAN only)."""

    overlay_vxlan_vni: int = 1
    """VXLAN network identifier; 1 like flannel."""

    overlay_vxlan_port: int = 8472
    """VXLAN UDP port; 8472 like flannel (the Linux default), not IANA's 4789."""

    overlay_directrouting: bool = False
    """VXLAN: peers on the same L2 subnet as the underlay get a plain route via their underlay
    address instead of the tunnel (flannel's DirectRouting)."""

    overlay_tx_checksum_offload: str = "auto"
    """Tx checksum offload on the VXLAN device: auto, on or off. Auto turns it off on kernels
    older than 5.7, where a netfilter bug corrupts the checksums of SNATed VXLAN packets and
    stalls cross-node traffic for 63 s at a time (flannel#1282, kubernetes#88986, fixed in
    5.7; Calico does the same), and keeps it on newer kernels, where turning it off costs most
    of the overlay's TCP throughput (no GSO). true/false are read as on/off."""

    cni_conf_dir: Path | None = None
    """With an overlay: directory (the host's /etc/cni/net.d) where the daemon writes the pods'
    CNI network config `10-node-services.conflist` (bridge `cni0` + node-services-ipam with
    "range": "node", mtu = the overlay MTU), atomically, whenever it changes. Unset: none."""

    cattle_url: str = ""
    """Project-scoped Cattle v2-beta endpoint (e.g. http://rancher:8080/v2-beta/projects/1a5);
    enables the Cattle source. Env CATTLE_URL."""

    cattle_access_key: str = ""
    """Cattle API access key. Env CATTLE_ACCESS_KEY."""

    cattle_secret_key: str = ""
    """Cattle API secret key. Env CATTLE_SECRET_KEY."""

    log_level: str = "info"
    """debug, info, warning or error."""

    overlay_wireguard_device: str = "ns-wg"
    """Name of the WireGuard device (wireguard only)."""

    overlay_wireguard_port: int = 51820
    """WireGuard UDP listen port, the same on every node (peers' endpoints use it)."""

    overlay_wireguard_keepalive: int = 0
    """WireGuard PersistentKeepalive in seconds for every peer (keeps NAT mappings open);
    0: off."""

    overlay_wireguard_implementation: str = "auto"
    """WireGuard implementation: auto (the kernel when a wireguard link can be made, else a
    running wireguard-go serving the device, else wireguard-go started by the daemon), kernel
    (generic netlink) or userspace (wireguard-go, configured over its UAPI socket
    /var/run/wireguard/<device>.sock; it keeps running when the daemon stops, as a kernel
    device stays)."""

    overlay_wireguard_key_file: Path = Path("/var/lib/node-services/wireguard/private.key")
    """This node's WireGuard private key (base64, as `wg genkey` writes it), generated on first
    start, mode 0600; the public key is published as the node annotation
    node-services.io/wireguard-public-key (Cattle: a host label of that name). Write a new key
    into it to rotate: peers are re-keyed within one reconcile."""

    cattle_ca_file: Path | None = None
    """PEM file of the CA(s) that sign the Cattle server's https certificate (an https
    cattle_url only); unset: the system's trust store."""

    runtime_dir: Path | None = Path("/run/node-services")
    """Directory of the hand-over socket (`handover-<netns>-<dns host>-<dns port>.sock`): a
    new instance started while one runs takes over its listening sockets through it, so a
    restart or an upgrade loses no query. The unit's RuntimeDirectory=, a hostPath in the
    DaemonSet. Empty: no hand-over."""

    shutdown_grace: float = 5.0
    """Seconds the daemon keeps serving after SIGTERM when no successor took over its sockets
    (lame duck: /readyz fails at once so load balancers and kube-proxy drain it first)."""

    dns_autopath: str = "off"
    """Kubernetes autopath, on or off. On: a query from the IP of exactly one running,
    non-hostNetwork pod of this node for a name ending in its first search domain
    (`<ns>.svc.<zone>`) that does not exist is answered with the pod's whole search walk
    done server-side (`<base>.<ns>.svc.<zone>`, `<base>.svc.<zone>`, `<base>.<zone>`, the
    host's search domains, then `<base>` itself, forwarded): the first answer that is not
    NXDOMAIN, behind a CNAME from the asked name. Saves a pod with `ndots:5` most of its
    queries for external names; the cost is one upstream round trip per search domain of the
    host for names that exist nowhere. Any other caller (an unknown IP, a host-network pod, an
    IP two live pods share) gets the plain answer."""

    dns_forward_zones: tuple[ForwardZone, ...] = ()
    """Stub domains: zones whose names go to upstreams of their own instead of the default
    ones, each with its own timeout (CoreDNS `forward` per server block, kube-dns
    `stubDomains`). YAML: a mapping of zone to a list of upstreams or to `{upstreams: [...],
    timeout: SECONDS}`, e.g. `{consul: ["127.0.0.9:8600"], 10.in-addr.arpa: [10.0.0.2]}`.
    Environment and flag (repeatable): `ZONE=IP[:PORT][,IP[:PORT]...][,timeout=SECONDS]`,
    entries separated by `;`, e.g.
    `consul=127.0.0.9:8600;corp.example=10.1.0.53,10.1.0.54,timeout=1.5`. The longest zone a
    name falls in wins; zone `.` sets the default upstreams (instead of `upstreams`) and its
    timeout. Reverse zones (`10.in-addr.arpa`) work alike for the reverse names this server
    holds no record of. The cluster domain and rancher.internal are always answered here: a
    zone inside them is an error. Upstreams are IP addresses (port 53 unless given)."""
    dns_serve_stale: float = 3600.0
    """Seconds past its TTL a positive forwarded answer is kept to be served stale (TTL 30,
    RFC 8767) when every upstream fails (timeout, SERVFAIL, REFUSED); for 30 s after a
    failure expired answers are served stale at once and refreshed in the background.
    Negative answers (NXDOMAIN, NODATA) are never served past their own TTL. Stale entries
    count in dns_cache_bytes and go first when it is full. 0 disables it."""

    dns_prefetch: int = 10
    """Forward-cache answers served from one entry that make it popular: a popular entry is
    asked again upstream in the background when 10% of its TTL is left, so it never expires
    while in use (CoreDNS `cache { prefetch 10 }`). 0 disables prefetching."""


FIELD_NAMES: Final = tuple(f.name for f in fields(Settings))

# Environment variables with conventional names; the rest are NODE_SERVICES_<KEY>.
_ENV_NAMES: Final = {
    "node_name": "NODE_NAME",
    "cattle_url": "CATTLE_URL",
    "cattle_access_key": "CATTLE_ACCESS_KEY",
    "cattle_secret_key": "CATTLE_SECRET_KEY",
}


def env_name(key: str) -> str:
    """The environment variable that sets ``key``."""
    return _ENV_NAMES.get(key, "NODE_SERVICES_" + key.upper())


_BOOLEANS: Final = {
    **dict.fromkeys(("true", "yes", "on", "1"), True),
    **dict.fromkeys(("false", "no", "off", "0", ""), False),
}

_DOMAIN_RE: Final = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)(\.(?!-)[a-z0-9-]{1,63}(?<!-))*$")


def parse_address(text: str, *, default_port: int | None = None, min_port: int = 0) -> Address:
    """Parse ``HOST:PORT``, ``[V6]:PORT``, or a bare host when ``default_port`` is given;
    the port from ``min_port`` to 65535."""
    text = text.strip()
    host, port_text = text, ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"{text!r}: missing ']'")
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"{text!r}: expected ':PORT' after ']'")
            port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif text.count(":") > 1:
        host = text  # a bare IPv6 address
    if not host:
        raise ValueError(f"{text!r}: missing host")
    if port_text:
        if not port_text.isdigit() or not min_port <= int(port_text) <= 65535:
            raise ValueError(f"{text!r}: port must be a number from {min_port} to 65535")
        port = int(port_text)
    elif default_port is not None:
        port = default_port
    else:
        raise ValueError(f"{text!r}: expected HOST:PORT")
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{text!r}: {host!r} is not an IPv6 address") from None
    return Address(host, port)


def _did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """The candidate ``name`` looks like a misspelling of, or ""."""
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.75)
    return close[0] if close else ""


def _listen_address(value: Any) -> Address:
    """A listen address: HOST:PORT whose host is an IP address (a listener binds one)."""
    if isinstance(value, Address):
        return value
    address = parse_address(str(value))
    try:
        ipaddress.ip_address(address.host)
    except ValueError:
        raise ValueError(f"{str(value).strip()!r}: {address.host!r} is not an IP address") from None
    return address


def parse_upstream(value: Any) -> Address:
    """An upstream DNS server: an IP address with an optional port (53 by default). A host
    name is refused: resolving it would need the resolver we may be (a loop at query time)."""
    if isinstance(value, Address):
        return value
    text = str(value).strip()
    address = parse_address(text, default_port=53, min_port=1)
    try:
        ipaddress.ip_address(address.host)
    except ValueError:
        raise ValueError(
            f"{text!r} is not an IP address (an upstream is IP[:PORT] or [IPv6]:PORT; host "
            "names are not resolved)"
        ) from None
    return address


_ZONE_RE: Final = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")
_FORWARD_ZONE_SYNTAX: Final = "ZONE=IP[:PORT][,IP[:PORT]...][,timeout=SECONDS]"


def _zone_name(value: Any) -> str:
    """A zone as dns_forward_zones keeps it: lowercase with the trailing dot ("." the root)."""
    text = str(value).strip().lower()
    if text == ".":
        return "."
    name = text.rstrip(".") if text.endswith(".") and not text.endswith("..") else text
    labels = name.split(".")
    if not name or len(name) > 253 or not all(_ZONE_RE.match(label) for label in labels):
        raise ValueError(f"{str(value).strip()!r} is not a valid DNS zone")
    return name + "."


def _zone_timeout(zone: str, value: Any) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"zone {zone!r}: timeout {value!r} is not a number of seconds") from None
    if not 0 < seconds <= 60:
        raise ValueError(f"zone {zone!r}: timeout must be more than 0 and at most 60 seconds")
    return seconds


def _forward_zone(raw_zone: Any, raw: Any) -> ForwardZone:
    """One dns_forward_zones entry from YAML (a list, a text list, or a mapping with
    upstreams and timeout) or from text (the part after ``ZONE=``)."""
    zone = _zone_name(raw_zone)
    timeout: float | None = None
    if isinstance(raw, Mapping):
        unknown = sorted(str(k) for k in raw if k not in ("upstreams", "timeout"))
        if unknown:
            raise ValueError(
                f"zone {zone!r}: unknown key {unknown[0]!r} (expected upstreams, timeout)"
            )
        if raw.get("timeout") is not None:
            timeout = _zone_timeout(zone, raw["timeout"])
        items = _as_list(raw.get("upstreams") or [])
    elif isinstance(raw, str):
        items = []
        for item in (v for v in re.split(r"[,\s]+", raw) if v):
            if item.lower().startswith("timeout="):
                timeout = _zone_timeout(zone, item.partition("=")[2])
            else:
                items.append(item)
    elif isinstance(raw, list | tuple):
        items = list(raw)
    else:
        raise ValueError(
            f"zone {zone!r}: expected a list of upstreams or {{upstreams: [...], timeout: "
            f"SECONDS}}, got {type(raw).__name__}"
        )
    upstreams = []
    problems = []
    for item in items:
        try:
            upstreams.append(parse_upstream(item))
        except ValueError as exc:
            problems.append(f"zone {zone!r}: {exc}")
    if problems:
        raise ValueError("; ".join(problems))
    if not upstreams:
        raise ValueError(f"zone {zone!r}: no upstreams")
    return ForwardZone(zone, tuple(upstreams), timeout)


def _forward_zones(value: Any) -> tuple[ForwardZone, ...]:
    """dns_forward_zones from YAML (a mapping) or text (``;``-separated entries, in one
    string or in a list of them, as repeated flags give)."""
    if isinstance(value, tuple) and all(isinstance(z, ForwardZone) for z in value):
        return value
    pairs: list[tuple[Any, Any]] = []
    if isinstance(value, Mapping):
        pairs = list(value.items())
    elif isinstance(value, str | list | tuple):
        texts = [value] if isinstance(value, str) else [str(v) for v in value]
        for text in texts:
            for entry in (e.strip() for e in re.split(r"[;\n]", text)):
                if not entry:
                    continue
                zone, equals, rest = entry.partition("=")
                if not equals or not zone.strip():
                    raise ValueError(f"entry {entry!r}: expected {_FORWARD_ZONE_SYNTAX}")
                pairs.append((zone, rest))
    elif value is not None:
        raise ValueError(
            f"expected a mapping of zone to upstreams, or {_FORWARD_ZONE_SYNTAX} entries "
            f"separated by ';', got {type(value).__name__}"
        )
    zones: dict[str, ForwardZone] = {}
    problems = []
    for raw_zone, raw in pairs:
        try:
            entry = _forward_zone(raw_zone, raw)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        if entry.zone in zones:
            problems.append(f"zone {entry.zone!r} is given twice")
        zones[entry.zone] = entry
    if problems:
        raise ValueError("; ".join(problems))
    return tuple(zones.values())


def _forward_zone_problems(values: Mapping[str, Any]) -> list[str]:
    """What dns_forward_zones cannot mean together with the other settings."""
    zones: tuple[ForwardZone, ...] = values.get("dns_forward_zones", ())
    domain = str(values.get("cluster_domain", "cluster.local")) + "."
    problems = []
    for entry in zones:
        for own, what in ((domain, "the cluster domain"), ("rancher.internal.", "the zone")):
            if entry.zone == own or entry.zone.endswith("." + own):
                problems.append(
                    f"dns_forward_zones: zone {entry.zone!r} is inside {what} {own!r}, which "
                    "this server answers itself: its names are never forwarded"
                )
        if entry.zone == "." and values.get("upstreams"):
            problems.append(
                "dns_forward_zones: zone '.' sets the default upstreams, and so does "
                "upstreams: set only one of them"
            )
    return problems


def _listen_addresses(value: Any) -> tuple[Address, ...]:
    """One or more listen addresses (a list, or text separated by commas or spaces), each
    named once, no wildcard beside another address of its family on the same port."""
    if isinstance(value, Address):
        return (value,)
    items = _as_list(value)
    items = [
        part for item in items for part in (_as_list(item) if isinstance(item, str) else [item])
    ]
    addresses = tuple(_listen_address(item) for item in items)
    if not addresses:
        raise ValueError("expected at least one HOST:PORT")
    if len(addresses) > MAX_DNS_LISTEN:
        raise ValueError(
            f"{len(addresses)} addresses: at most {MAX_DNS_LISTEN} (a restart hands every "
            "socket over in one message)"
        )
    for i, first in enumerate(addresses):
        one = ipaddress.ip_address(first.host)
        for second in addresses[i + 1 :]:
            other = ipaddress.ip_address(second.host)
            if first.port != second.port or one.version != other.version:
                continue
            if one == other:
                raise ValueError(f"{str(second)!r} is named twice")
            if one.is_unspecified or other.is_unspecified:
                raise ValueError(
                    f"{str(first)!r} and {str(second)!r}: a wildcard address takes its port "
                    "on every address; name the addresses instead"
                )
    return addresses


def _as_list(value: Any) -> list[Any]:
    if isinstance(value, str):
        return [v for v in re.split(r"[,\s]+", value) if v]
    if isinstance(value, list | tuple):
        return list(value)
    raise ValueError(f"expected a list, got {type(value).__name__}")


def _convert(key: str, value: Any) -> Any:
    """Convert one raw value (YAML, env text or flag text) for field ``key``."""
    if key == "dns_listen":
        return _listen_addresses(value)
    if key in ("metadata_listen", "admin_listen"):
        return _listen_address(value)
    if key == "upstreams":
        return tuple(parse_upstream(v) for v in _as_list(value))
    if key == "dns_forward_zones":
        return _forward_zones(value)
    if key == "metadata_trusted_proxies":
        networks = []
        for item in _as_list(value):
            try:
                networks.append(str(ipaddress.ip_network(str(item).strip(), strict=False)))
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or CIDR") from None
        return tuple(networks)
    if key in (
        "metadata_access_log",
        "dns_query_log",
        "overlay_directrouting",
    ):
        if isinstance(value, bool):
            return value
        flag = str(value).strip().lower()
        if flag not in _BOOLEANS:
            raise ValueError(f"{value!r} is not true or false")
        return _BOOLEANS[flag]
    if key == "snapshots":
        return tuple(Path(str(v)) for v in _as_list(value))
    if key == "runtime_dir":
        return Path(str(value)) if value not in (None, "") else None
    if key == "dns_serve_stale":
        if isinstance(value, bool):
            raise ValueError(f"{value!r} is not a number of seconds (0 disables serving stale)")
        try:
            stale = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{value!r} is not a number of seconds") from None
        if not 0 <= stale <= 604800:
            raise ValueError("must be from 0 (off) to 604800 seconds (a week)")
        return stale
    if key == "dns_prefetch":
        if isinstance(value, bool) or not str(value).strip().isdigit():
            raise ValueError(f"{value!r} is not a whole number (0 disables prefetching)")
        return int(value)
    if key == "shutdown_grace":
        try:
            grace = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{value!r} is not a number of seconds") from None
        if not 0 <= grace <= 3600:
            raise ValueError("must be from 0 to 3600 seconds")
        return grace
    if key in ("kubeconfig", "cni_conf_dir", "cattle_ca_file"):
        return Path(str(value)) if value not in (None, "") else None
    if key in ("ipam_dir", "overlay_wireguard_key_file"):
        if key == "overlay_wireguard_key_file" and not str(value).strip():
            raise ValueError("must be a file path")
        return Path(str(value))
    if key in ("ipam_leak_grace", "ipam_reconcile_interval", "overlay_reconcile_interval"):
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{value!r} is not a number of seconds") from None
        if key in ("ipam_reconcile_interval", "overlay_reconcile_interval") and not seconds > 0:
            raise ValueError("must be positive")
        if not seconds >= 0:
            raise ValueError("must not be negative")
        return seconds
    if key in ("metadata_cache_bytes", "metadata_prepare_above"):
        if isinstance(value, bool) or not str(value).strip().isdigit():
            raise ValueError(f"{value!r} is not a whole number")
        return int(value)
    if key == "dns_ttl":
        if isinstance(value, bool) or not str(value).strip().isdigit():
            raise ValueError(f"{value!r} is not a whole number of seconds")
        ttl = int(value)
        if not 0 <= ttl <= 2147483647:
            raise ValueError(f"{ttl} is out of range")
        return ttl
    if key in (
        "dns_cache_size",
        "dns_cache_bytes",
        "dns_upstream_sockets",
        "dns_answer_cache_size",
        "dns_answer_cache_bytes",
        "dns_negative_ttl_cap",
        "dns_max_forwards",
    ):
        if isinstance(value, bool) or not str(value).strip().isdigit():
            raise ValueError(f"{value!r} is not a whole number")
        number = int(value)
        if key in ("dns_max_forwards", "dns_upstream_sockets") and number < 1:
            raise ValueError("must be at least 1")
        return number
    if key in ("dns_forward_timeout", "kube_read_timeout"):
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{value!r} is not a number of seconds") from None
        if key == "dns_forward_timeout" and not 0 < seconds <= 60:
            raise ValueError("must be more than 0 and at most 60 seconds")
        if not seconds > 0:
            raise ValueError("must be more than 0")
        return seconds
    if key in ("overlay_mtu", "overlay_vxlan_vni", "overlay_vxlan_port"):
        if isinstance(value, bool) or not str(value).strip().isdigit():
            raise ValueError(f"{value!r} is not a whole number")
        number = int(value)
        low, high = {
            "overlay_mtu": (0, 65535),
            "overlay_vxlan_vni": (0, 16777215),
            "overlay_vxlan_port": (1, 65535),
        }[key]
        if not low <= number <= high or (key == "overlay_mtu" and 0 < number < 576):
            raise ValueError(f"{number} is out of range")
        return number
    if key in ("overlay_wireguard_port", "overlay_wireguard_keepalive"):
        if isinstance(value, bool) or not str(value).strip().isdigit():
            raise ValueError(f"{value!r} is not a whole number")
        number = int(value)
        low, high = (1, 65535) if key == "overlay_wireguard_port" else (0, 65535)
        if not low <= number <= high:
            raise ValueError(f"{number} is out of range")
        return number
    if key in ("overlay_vxlan_device", "overlay_wireguard_device"):
        name = str(value).strip()
        if not 0 < len(name) < 16 or "/" in name or any(c.isspace() for c in name):
            raise ValueError(f"{value!r} is not an interface name (1-15 characters)")
        return name
    if key == "kube_page_size":
        if isinstance(value, bool) or not str(value).strip().isdigit() or int(value) < 1:
            raise ValueError(f"{value!r} is not a whole number of at least 1")
        return int(value)
    if key == "snapshot_poll_interval":
        try:
            interval = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{value!r} is not a number of seconds") from None
        if interval < 0:
            raise ValueError("must not be negative")
        return interval
    if key == "cluster_domain":
        domain = str(value).strip().rstrip(".").lower()
        if not _DOMAIN_RE.match(domain):
            raise ValueError(f"{value!r} is not a valid DNS domain")
        return domain
    if key in ("ipam", "overlay_tx_checksum_offload", "dns_autopath") and isinstance(value, bool):
        value = "on" if value else "off"  # YAML 1.1 reads a bare on/off as a boolean
    if key == "overlay_tx_checksum_offload":
        value = {"true": "on", "yes": "on", "false": "off", "no": "off"}.get(
            str(value).strip().lower(), value
        )
    choices = {
        "pod_records": POD_RECORDS,
        "overlay": OVERLAYS,
        "log_level": LOG_LEVELS,
        "ipam": IPAM_MODES,
        "overlay_tx_checksum_offload": TX_CHECKSUM_OFFLOAD_MODES,
        "overlay_wireguard_implementation": WIREGUARD_IMPLEMENTATIONS,
        "dns_autopath": DNS_AUTOPATH_MODES,
    }.get(key)
    if choices is not None:
        if isinstance(value, bool):  # YAML 1.1 reads a bare yes/no/on/off/true/false so
            raise ValueError(
                f"got the boolean {str(value).lower()} (YAML reads an unquoted yes/no/on/off "
                f"so); expected one of {', '.join(choices)}"
            )
        text = str(value).strip().lower()
        if text not in choices:
            raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
        return text
    if value is None:
        return ""
    if not isinstance(value, str | int | float):
        raise ValueError(f"expected text, got {type(value).__name__}")
    return str(value)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """The problem and its line/column, never the offending text (it may hold a secret)."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        what = exc.problem or exc.context or "syntax error"
        if mark is not None:
            return f"{what} at line {mark.line + 1}, column {mark.column + 1}"
        return what
    return type(exc).__name__


def read_config_file(path: Path, problems: list[str]) -> dict[str, Any]:
    """The raw mapping of a YAML config file; problems are appended, not raised."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        problems.append(f"{path}: cannot read: {exc.strerror or exc}")
        return {}
    except yaml.YAMLError as exc:
        problems.append(f"{path}: not valid YAML: {_yaml_problem(exc)}")
        return {}
    if data is None:
        return {}
    if not isinstance(data, dict):
        problems.append(f"{path}: expected a mapping of settings, got {type(data).__name__}")
        return {}
    for key in data:
        if key not in FIELD_NAMES:
            close = _did_you_mean(str(key), FIELD_NAMES)
            hint = f" (did you mean {close!r}?)" if close else ""
            problems.append(f"{path}: unknown key {key!r}{hint}")
    return {k: v for k, v in data.items() if k in FIELD_NAMES}


def unsupported(settings: Settings) -> list[str]:
    """Valid settings that name a part this build does not have yet: ``run`` refuses them
    (rather than run without it) and ``check-config`` reports them."""
    problems: list[str] = []
    return problems


def load_settings(
    *,
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    check_files: bool = True,
    flag_names: Mapping[str, str] | None = None,
    warnings: list[str] | None = None,
) -> Settings:
    """Settings from the file, then the environment, then ``overrides`` (flags).

    Raises ConfigError listing every problem found. ``flag_names`` (key -> ``--flag``) names
    the flag in a problem with an override. Unknown ``NODE_SERVICES_*`` variables are not an
    error (other tools may share the prefix): each is appended to ``warnings``.
    """
    environ = os.environ if environ is None else environ
    problems: list[str] = []
    layers: list[tuple[str, Mapping[str, Any]]] = []
    if config_file is not None:
        layers.append((str(config_file), read_config_file(config_file, problems)))
    env_values = {k: environ[env_name(k)] for k in FIELD_NAMES if env_name(k) in environ}
    if warnings is not None:
        warnings.extend(unknown_variables(environ))
    layers.append(("environment", env_values))
    layers.append(("flags", dict(overrides or {})))

    values: dict[str, Any] = {}
    for origin, layer in layers:
        for key, raw in layer.items():
            label = f"{env_name(key)}" if origin == "environment" else key
            if origin == "flags" and flag_names and key in flag_names:
                label = flag_names[key]
            try:
                values[key] = _convert(key, raw)
            except ValueError as exc:
                problems.append(f"{origin}: {label}: {exc}")
    if not values.get("node_name"):
        values["node_name"] = os.uname().nodename
    if check_files:
        for snapshot in values.get("snapshots", ()):
            problem = _not_a_file(snapshot)
            if problem:
                problems.append(f"snapshots: {snapshot}: {problem}")
        kubeconfig = values.get("kubeconfig")
        problem = _not_a_file(kubeconfig) if kubeconfig is not None else ""
        if problem:
            problems.append(f"kubeconfig: {kubeconfig}: {problem}")
    cattle = [values.get(k, "") for k in ("cattle_url", "cattle_access_key", "cattle_secret_key")]
    if cattle[0] and not re.match(r"^https?://", cattle[0]):
        problems.append(f"cattle_url: {cattle[0]!r} must start with http:// or https://")
    if any(cattle[1:]) and not cattle[0]:
        problems.append("cattle_access_key/cattle_secret_key are set but cattle_url is not")
    problems.extend(_cattle_problems(values, check_files=check_files))
    problems.extend(_forward_zone_problems(values))
    if problems:
        raise ConfigError(problems)
    return Settings(**values)


_CATTLE_PROJECT_RE: Final = re.compile(r"^https?://[^/?#\s]+/v2-beta/projects/[A-Za-z0-9]+/?$")


def _cattle_problems(values: Mapping[str, Any], *, check_files: bool) -> list[str]:
    """The Cattle source's settings: a project-scoped v2-beta URL, both keys or neither, a
    readable CA file only for https. Never quotes the secret."""
    url = str(values.get("cattle_url", ""))
    access, secret = values.get("cattle_access_key", ""), values.get("cattle_secret_key", "")
    ca_file = values.get("cattle_ca_file")
    problems = []
    userinfo = "@" in urlsplit(url).netloc if re.match(r"^https?://", url) else False
    if userinfo:  # never quote it: the password would reach logs and /readyz
        problems.append(
            "cattle_url: holds credentials (user:password@host): remove them and set the API "
            "key pair with CATTLE_ACCESS_KEY / CATTLE_SECRET_KEY"
        )
    elif url and re.match(r"^https?://[^/?#\s]+/v1/?$", url):
        problems.append(
            f"cattle_url: {url!r} is the /v1 URL Rancher injects into agent.role=environment "
            "containers; use the project URL <server>/v2-beta/projects/<id>, like "
            "http://rancher:8080/v2-beta/projects/1a5"
        )
    elif url and re.match(r"^https?://", url) and not _CATTLE_PROJECT_RE.match(url):
        problems.append(
            f"cattle_url: {url!r} is not a project-scoped v2-beta URL like "
            "http://rancher:8080/v2-beta/projects/1a5 (as Rancher shows for environment API keys)"
        )
    if url and bool(access) != bool(secret):
        missing = "cattle_secret_key" if access else "cattle_access_key"
        problems.append(f"{missing}: missing (set both Cattle API keys, or neither)")
    if ca_file is not None:
        if not url.startswith("https://"):
            problems.append("cattle_ca_file: set, but cattle_url is not an https:// URL")
        elif check_files and not ca_file.is_file():
            problems.append(f"cattle_ca_file: {ca_file}: no such file")
        elif check_files:
            try:
                ssl.create_default_context(cafile=str(ca_file))
            except (ssl.SSLError, OSError, ValueError) as exc:
                reason = (
                    f"not a usable PEM CA bundle ({exc.reason or exc})"
                    if isinstance(exc, ssl.SSLError)
                    else (getattr(exc, "strerror", None) or str(exc))
                )
                problems.append(f"cattle_ca_file: {ca_file}: {reason}")
    return problems


def _not_a_file(path: Path) -> str:
    """Why ``path`` cannot be read as a file ("" when it can be tried)."""
    if path.is_dir():
        return "is a directory, not a file"
    if not path.exists():
        return "no such file"
    if not path.is_file():
        return "not a regular file"
    return ""


_SERVICE_LINK_RE: Final = re.compile(
    r"^[A-Z0-9_]+_(SERVICE_HOST|SERVICE_PORT(_[A-Z0-9_]+)?"
    r"|PORT_[0-9]+_(TCP|UDP|SCTP)(_(PROTO|PORT|ADDR))?)$"
)
_SERVICE_LINK_URL_RE: Final = re.compile(r"^(tcp|udp|sctp)://\S+$")
"""What Kubernetes injects for a Service (``node-services``: ``NODE_SERVICES_SERVICE_HOST``,
``NODE_SERVICES_PORT_9254_TCP_ADDR``...); not settings."""


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """One line per ``NODE_SERVICES_*`` variable that sets no key, with a suggestion."""
    known = {env_name(k) for k in FIELD_NAMES}
    lines = []
    for name in sorted(environ):
        if name.startswith("NODE_SERVICES_") and name not in known:
            if _SERVICE_LINK_RE.match(name) or (
                name.endswith("_PORT") and _SERVICE_LINK_URL_RE.match(environ[name])
            ):  # Kubernetes' variables for a Service, not settings
                continue
            close = _did_you_mean(name.removeprefix("NODE_SERVICES_").lower(), FIELD_NAMES)
            hint = f" (did you mean {env_name(close)}?)" if close else ""
            lines.append(f"environment: unknown variable {name}{hint}; ignored")
    return lines


_DEFAULT_TEXT: Final = {
    "node_name": "the machine's hostname",
    "upstreams": "the nameservers of /etc/resolv.conf",
}
"""Defaults computed at start-up, described instead of shown."""


def format_default(key: str) -> str:
    """The default of ``key`` as the references show it (``--keys``, configuration.md)."""
    if key in _DEFAULT_TEXT:
        return _DEFAULT_TEXT[key]
    value = getattr(Settings(), key)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        value = ", ".join(str(v) for v in value)
    if value is None or value == "":
        return "(none)"
    return str(value)


def describe_settings(flags: Mapping[str, str] | None = None) -> str:
    """Reference text of every key: name, environment variable, flag, default, meaning.
    ``flags`` maps a key to the command-line flag that sets it."""
    docs = _field_docs()
    flags = flags or {}
    lines = []
    for f in fields(Settings):
        flag = f", flag {flags[f.name]}" if f.name in flags else ""
        lines.append(f"{f.name}  (env {env_name(f.name)}{flag}, default: {format_default(f.name)})")
        lines.extend("    " + line for line in docs.get(f.name, "").splitlines())
    return "\n".join(lines)


REFERENCE_HEADER: Final = """\
# Configuration

<!-- Generated from the Settings field docstrings in node_services/config.py by `make docs`
     (`node-services check-config --keys --markdown`); edit those, then regenerate.
     tests/test_config_reference.py fails when this file is stale. -->

Settings come from a YAML file (`--config FILE`), then the environment, then command-line
flags; a later layer wins. `node-services check-config [FILE] [FLAGS]` validates a file, the
environment and the same flags `run` takes, and lists every problem at once (exit 1);
`node-services check-config --keys` prints this reference as text.

Example (`/etc/node-services/config.yaml`):

```yaml
node_name: node-a
snapshots: [/etc/node-services/snapshot.yaml]
dns_listen: 169.254.20.10:53
cluster_domain: cluster.local
upstreams: [10.0.0.2, "10.0.0.3:53"]
pod_records: verified
metadata_listen: 169.254.169.250:80
admin_listen: 0.0.0.0:9254
```

Addresses are `HOST:PORT` or `[IPv6]:PORT`; a listen address's host is an IP address; upstreams
may omit the port (53). Lists in the environment are separated by commas or spaces
(`NODE_SERVICES_UPSTREAMS="10.0.0.2 10.0.0.3:53"`). A snapshot path that is missing or a
directory, an unknown key or a malformed value stops `run` with exit code 2 and the full list
of problems; unknown keys and unknown `NODE_SERVICES_*` variables get a "did you mean"
suggestion (an unknown variable is a warning for `run`, a problem for `check-config`).

"""


def reference_markdown(flags: Mapping[str, str] | None = None) -> str:
    """docs/configuration.md: :data:`REFERENCE_HEADER` and a table of every key."""
    docs = _field_docs()
    flags = flags or {}
    rows = [
        "| key | environment | flag | default | meaning |",
        "|---|---|---|---|---|",
    ]
    for f in fields(Settings):
        flag = "—"
        if f.name in flags:
            name, _, note = flags[f.name].partition(" ")
            flag = f"`{name}` {note}".strip()
        meaning = docs.get(f.name, "").replace("|", "\\|")
        default = format_default(f.name).replace("|", "\\|")
        if f.name not in _DEFAULT_TEXT and default != "(none)":
            default = f"`{default}`"
        rows.append(f"| `{f.name}` | `{env_name(f.name)}` | {flag} | {default} | {meaning} |")
    return REFERENCE_HEADER + "\n".join(rows) + "\n"


def _field_docs() -> dict[str, str]:
    """Field docstrings, read from this module's source (the single place they are written)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(Settings))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, following in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    return docs
