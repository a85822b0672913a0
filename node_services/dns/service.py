"""The DNS service as the daemon runs it: built from Settings, started, followed, stopped."""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path

from prometheus_client import CollectorRegistry

from node_services.config import Settings
from node_services.dns.forward import LOOP_PROBE_INTERVAL, Forwarder, upstreams_from_resolv_conf
from node_services.dns.metrics import DnsStats, register
from node_services.dns.server import DnsServer
from node_services.dns.views import ClientViews
from node_services.dns.zone import DEFAULT_METADATA_IP, Zone
from node_services.state.store import Store

log = logging.getLogger(__name__)


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


def upstreams_of(settings: Settings) -> tuple[tuple[str, int], ...]:
    """Configured upstreams, else the host's resolv.conf without loopback stubs; never our own
    listen address (that would be a loop)."""
    if settings.upstreams:
        chosen = tuple((a.host, a.port) for a in settings.upstreams)
    else:
        chosen = upstreams_from_resolv_conf()
        if not chosen:
            log.warning(
                "dns: no upstreams configured and none usable in /etc/resolv.conf: "
                "names outside the cluster zones are answered REFUSED"
            )
    for listen in settings.dns_listen:
        own = (listen.host, listen.port)
        if own in chosen:
            log.error("dns: upstream %s:%d is this server itself; ignoring it", *own)
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


def build_dns(settings: Settings, store: Store, registry: CollectorRegistry) -> DnsServer:
    """A DnsServer for these settings, its metrics registered on ``registry``."""
    stats = DnsStats()
    register(registry, stats)
    upstreams = upstreams_of(settings)
    forwarder = (
        Forwarder(
            upstreams,
            stats=stats,
            timeout=settings.dns_forward_timeout,
            cache_size=settings.dns_cache_size,
            cache_bytes=settings.dns_cache_bytes,
            sockets=settings.dns_upstream_sockets,
            loop_probe_interval=LOOP_PROBE_INTERVAL,
            max_inflight=settings.dns_max_forwards,
            negative_ttl_cap=settings.dns_negative_ttl_cap,
        )
        if upstreams
        else None
    )
    zone = Zone(
        cluster_domain=settings.cluster_domain,
        ttl=settings.dns_ttl,
        pod_records=settings.pod_records,
        metadata_ip=_metadata_ip(settings),
        nameservers=nameserver_ips(settings),
        forwarding=forwarder is not None,
    )
    return DnsServer(
        store,
        zone,
        stats=stats,
        forwarder=forwarder,
        query_log=settings.dns_query_log,
        answer_cache_size=settings.dns_answer_cache_size,
        answer_cache_bytes=settings.dns_answer_cache_bytes,
        views=ClientViews(
            node_name=settings.node_name,
            cluster_domain=settings.cluster_domain,
            autopath=settings.dns_autopath == "on",
            host_search=search_domains_from_resolv_conf(),
        ),
    )
