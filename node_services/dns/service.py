"""The DNS service as the daemon runs it: built from Settings, started, followed, stopped."""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path
from typing import Final

from prometheus_client import CollectorRegistry

from node_services.config import Address, Settings, env_name
from node_services.dns.forward import LOOP_PROBE_INTERVAL, Forwarder
from node_services.dns.forward_zones import ForwardZones
from node_services.dns.metrics import DnsStats, forwarder_stats, register
from node_services.dns.server import DnsServer
from node_services.dns.upstream import UdpPool
from node_services.dns.views import ClientViews
from node_services.dns.zone import DEFAULT_METADATA_IP, Zone
from node_services.state.store import Store

log = logging.getLogger(__name__)

RESOLV_CONF: Final = Path("/etc/resolv.conf")
RESOLVED_CONF: Final = Path("/run/systemd/resolve/resolv.conf")
"""systemd-resolved's list of the real upstreams (its stub 127.0.0.53 is in resolv.conf)."""
RESOLVED_STUBS: Final = frozenset({"127.0.0.53", "127.0.0.54"})
"""systemd-resolved's own listeners: never upstreams of ours."""


def _metadata_ip(settings: Settings) -> str:
    """The address rancher-metadata.rancher.internal names: where metadata listens (a
    loopback address too: a host-network caller reaches it), unless that is a wildcard
    (then the Rancher metadata address, which a wildcard listen also answers on)."""
    try:
        address = ipaddress.ip_address(settings.metadata_listen.host)
    except ValueError:
        return DEFAULT_METADATA_IP
    if address.is_unspecified:
        return DEFAULT_METADATA_IP
    return str(address)


def nameserver_ips(settings: Settings) -> tuple[str, ...]:
    """The addresses ``ns.dns.<zone>`` names (the NS glue): every dns_listen host that is
    not a wildcard, once each, in the order listed. A wildcard listen names no address: the
    server cannot tell which of the host's addresses a client reaches it on."""
    ips: list[str] = []
    for listen in settings.dns_listen:
        address = ipaddress.ip_address(listen.host)
        if not address.is_unspecified and str(address) not in ips:
            ips.append(str(address))
    return tuple(ips)


def nameservers_of(path: Path) -> tuple[str, ...]:
    """Every nameserver address a resolv.conf names, loopback ones included (a zone index
    such as ``%eth0`` dropped; a line that is no IP address skipped)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ()
    found = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            host = parts[1].split("%", 1)[0]
            try:
                found.append(str(ipaddress.ip_address(host)))
            except ValueError:
                continue
    return tuple(found)


def resolved_upstreams(path: Path = RESOLVED_CONF) -> tuple[tuple[str, int], ...]:
    """The upstreams systemd-resolved forwards to, from its own resolv.conf: every nameserver
    but its stub listeners (a loopback one is a local resolver an admin set, e.g. unbound)."""
    return tuple((host, 53) for host in nameservers_of(path) if host not in RESOLVED_STUBS)


def upstreams_of(
    settings: Settings,
    *,
    resolv_conf: Path = RESOLV_CONF,
    resolved_conf: Path = RESOLVED_CONF,
) -> tuple[tuple[str, int], ...]:
    """The default upstreams: zone "." of dns_forward_zones or the upstreams setting, else
    the host's resolv.conf without loopback stubs, else (a loopback stub only, as with
    systemd-resolved) the upstreams systemd-resolved uses; never our own listen address
    (that would be a loop). None at all: an error saying which setting to add."""
    default = next((z for z in settings.dns_forward_zones if z.zone == "."), None)
    if default is not None:
        return _without_self(settings, ".", default.upstreams)
    if settings.upstreams:
        return _without_self(settings, ".", settings.upstreams)
    listed = nameservers_of(resolv_conf)
    chosen = tuple((h, 53) for h in listed if not ipaddress.ip_address(h).is_loopback)
    if chosen:
        return _without_self(settings, ".", tuple(Address(h, p) for h, p in chosen))
    stubs = listed  # loopback ones only, if any
    if stubs:
        chosen = resolved_upstreams(resolved_conf)
        if chosen:
            log.info(
                "dns: %s names only the loopback stub %s; forwarding to the upstreams of %s "
                "(systemd-resolved's): %s",
                resolv_conf,
                ", ".join(stubs),
                resolved_conf,
                ", ".join(f"{h}:{p}" for h, p in chosen),
            )
            return _without_self(settings, ".", tuple(Address(h, p) for h, p in chosen))
        found = (
            f"{resolv_conf} names only the loopback stub {', '.join(stubs)} and {resolved_conf} "
            "names no other nameserver"
        )
    elif not resolv_conf.is_file():
        found = f"{resolv_conf} cannot be read"
    else:
        found = f"{resolv_conf} names no nameserver"
    log.error(
        "dns: no upstream DNS servers: %s, so names outside the cluster zones%s are answered "
        "REFUSED (counted in node_services_dns_forward_no_upstream_total). Set the upstreams "
        "to forward to: config key upstreams, environment %s or flag --upstream (IP[:PORT])",
        found,
        " and dns_forward_zones" if settings.dns_forward_zones else "",
        env_name("upstreams"),
    )
    return ()


def _without_self(
    settings: Settings, zone: str, upstreams: tuple[Address, ...]
) -> tuple[tuple[str, int], ...]:
    chosen = tuple((a.host, a.port) for a in upstreams)
    for listen in settings.dns_listen:
        own = (listen.host, listen.port)
        if own in chosen:
            log.error(
                "dns: upstream %s:%d of zone %s is this server itself; ignoring it", *own, zone
            )
            chosen = tuple(u for u in chosen if u != own)
    return chosen


def search_domains_from_resolv_conf(path: Path = Path("/etc/resolv.conf")) -> tuple[str, ...]:
    """The host's search domains (the last `search` or `domain` line wins, as in glibc)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ()
    domains: tuple[str, ...] = ()
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] in ("search", "domain"):
            domains = tuple(f.rstrip(".") for f in fields[1:] if f.rstrip("."))
    return domains


def build_forward_zones(
    settings: Settings,
    stats: DnsStats,
    *,
    resolv_conf: Path = RESOLV_CONF,
    resolved_conf: Path = RESOLVED_CONF,
) -> ForwardZones:
    """One Forwarder per zone: the default one (counting on ``stats``) and one per stub zone
    of dns_forward_zones (counting apart, for the zone label), all on one socket pool."""
    # one pool for every zone, counting on the server's stats (its metrics have no zone)
    pool = UdpPool(stats=stats, size=settings.dns_upstream_sockets)

    def forwarder(
        upstreams: tuple[tuple[str, int], ...], counters: DnsStats, timeout: float | None
    ) -> Forwarder:
        return Forwarder(
            upstreams,
            stats=counters,
            timeout=settings.dns_forward_timeout if timeout is None else timeout,
            cache_size=settings.dns_cache_size,
            cache_bytes=settings.dns_cache_bytes,
            sockets=settings.dns_upstream_sockets,
            loop_probe_interval=LOOP_PROBE_INTERVAL,
            max_inflight=settings.dns_max_forwards,
            negative_ttl_cap=settings.dns_negative_ttl_cap,
            pool=pool,
            serve_stale=settings.dns_serve_stale,
            prefetch=settings.dns_prefetch,
        )

    upstreams = upstreams_of(settings, resolv_conf=resolv_conf, resolved_conf=resolved_conf)
    root = next((z for z in settings.dns_forward_zones if z.zone == "."), None)
    timeout = root.timeout if root is not None else None
    default = forwarder(upstreams, stats, timeout) if upstreams else None
    stubs: dict[str, Forwarder] = {}
    zone_stats: dict[str, DnsStats] = {".": stats} if default is not None else {}
    for entry in settings.dns_forward_zones:
        if entry.zone == ".":
            continue
        chosen = _without_self(settings, entry.zone, entry.upstreams)
        if not chosen:
            log.error(
                "dns: zone %s of dns_forward_zones has no upstream left; its names go to the "
                "default upstreams",
                entry.zone,
            )
            continue
        counters = forwarder_stats()
        stubs[entry.zone] = forwarder(chosen, counters, entry.timeout)
        zone_stats[entry.zone] = counters
        log.info(
            "dns: names in %s are forwarded to %s (timeout %g s)",
            entry.zone,
            ", ".join(str(u) for u in entry.upstreams if (u.host, u.port) in chosen),
            stubs[entry.zone].timeout,
        )
    if stubs:
        stats.forward_zones = zone_stats
    return ForwardZones(default, stubs, max_inflight=settings.dns_max_forwards)


def build_dns(
    settings: Settings,
    store: Store,
    registry: CollectorRegistry,
    *,
    resolv_conf: Path = RESOLV_CONF,
    resolved_conf: Path = RESOLVED_CONF,
) -> DnsServer:
    """A DnsServer for these settings, its metrics registered on ``registry``."""
    stats = DnsStats()
    register(registry, stats)
    zones = build_forward_zones(
        settings, stats, resolv_conf=resolv_conf, resolved_conf=resolved_conf
    )
    zone = Zone(
        cluster_domain=settings.cluster_domain,
        ttl=settings.dns_ttl,
        pod_records=settings.pod_records,
        metadata_ip=_metadata_ip(settings),
        nameservers=nameserver_ips(settings),
        forwarding=bool(zones.forwarders),
    )
    return DnsServer(
        store,
        zone,
        stats=stats,
        forward_zones=zones,
        query_log=settings.dns_query_log,
        answer_cache_size=settings.dns_answer_cache_size,
        answer_cache_bytes=settings.dns_answer_cache_bytes,
        views=ClientViews(
            node_name=settings.node_name,
            cluster_domain=settings.cluster_domain,
            autopath=settings.dns_autopath == "on",
            host_search=search_domains_from_resolv_conf(resolv_conf),
        ),
    )
