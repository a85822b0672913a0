"""The ``node-services`` command: run, check-config, version, status."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

from node_services import __version__
from node_services.config import (
    LOG_LEVELS,
    OVERLAYS,
    POD_RECORDS,
    ConfigError,
    Settings,
    describe_settings,
    env_name,
    format_default,
    load_settings,
    reference_markdown,
    unsupported,
)

# flag dest -> Settings field, for the flags that set settings
_FLAG_FIELDS = {
    "node_name": "node_name",
    "snapshots": "snapshots",
    "dns_listen": "dns_listen",
    "metadata_listen": "metadata_listen",
    "admin_listen": "admin_listen",
    "cluster_domain": "cluster_domain",
    "dns_ttl": "dns_ttl",
    "upstreams": "upstreams",
    "dns_forward_zones": "dns_forward_zones",
    "pod_records": "pod_records",
    "dns_query_log": "dns_query_log",
    "dns_forward_timeout": "dns_forward_timeout",
    "dns_cache_size": "dns_cache_size",
    "dns_answer_cache_size": "dns_answer_cache_size",
    "dns_max_forwards": "dns_max_forwards",
    "kubeconfig": "kubeconfig",
    "ipam_dir": "ipam_dir",
    "overlay": "overlay",
    "overlay_interface": "overlay_interface",
    "log_level": "log_level",
}


EXIT_CODES: Final = """\
exit status: 0 stopped cleanly (SIGTERM, SIGINT); 1 could not start (a listener cannot bind:
the message names it and its address); 2 invalid settings (every problem listed)."""


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    def flag(*names: str, key: str, **kwargs: Any) -> None:
        shown = format_default(key)
        plain = kwargs.get("action") == "store_const" or shown == "(none)"
        default = "" if plain else f" (default: {shown})"
        kwargs["help"] = (
            f"{kwargs.get('help', '')}{default} [config key {key}, env {env_name(key)}]"
        )
        parser.add_argument(*names, dest=key, default=None, **kwargs)

    parser.add_argument("--config", type=Path, metavar="FILE", help="YAML settings file")
    flag(
        "--snapshot",
        key="snapshots",
        action="append",
        metavar="FILE",
        help="snapshot file of Kubernetes objects / Cattle resources (repeatable)",
    )
    flag("--node-name", key="node_name", metavar="NAME", help="this node's name")
    flag(
        "--dns-listen",
        key="dns_listen",
        action="append",
        metavar="HOST:PORT",
        help="DNS address",
    )
    flag("--metadata-listen", key="metadata_listen", metavar="HOST:PORT", help="metadata address")
    flag(
        "--admin-listen",
        key="admin_listen",
        metavar="HOST:PORT",
        help="address of /healthz /readyz /metrics",
    )
    flag("--cluster-domain", key="cluster_domain", metavar="DOMAIN", help="cluster DNS domain")
    flag("--dns-ttl", key="dns_ttl", metavar="SECONDS", help="TTL of cluster answers")
    flag(
        "--upstream",
        key="upstreams",
        action="append",
        metavar="IP[:PORT]",
        help="upstream DNS server (repeatable)",
    )
    flag(
        "--dns-forward-zone",
        key="dns_forward_zones",
        action="append",
        metavar="ZONE=IP[:PORT][,IP[:PORT]...][,timeout=SECONDS]",
        help="stub domain: forward names in ZONE to its own upstreams (repeatable)",
    )
    flag("--pod-records", key="pod_records", choices=POD_RECORDS, help="pod A records")
    flag(
        "--dns-query-log",
        key="dns_query_log",
        action="store_const",
        const="true",
        help="log every DNS query",
    )
    flag(
        "--dns-forward-timeout",
        key="dns_forward_timeout",
        metavar="SECONDS",
        help="time to wait for one upstream",
    )
    flag("--dns-cache-size", key="dns_cache_size", metavar="N", help="forward cache entries")
    flag(
        "--dns-answer-cache-size",
        key="dns_answer_cache_size",
        metavar="N",
        help="in-zone UDP answers kept by query bytes (0: off)",
    )
    flag(
        "--dns-max-forwards",
        key="dns_max_forwards",
        metavar="N",
        help="concurrent forwarded queries (REFUSED beyond)",
    )
    flag(
        "--kubeconfig",
        key="kubeconfig",
        metavar="FILE",
        help="kubeconfig (in-cluster config when running in a pod)",
    )
    flag("--ipam-dir", key="ipam_dir", metavar="DIR", help="IPAM store directory")
    flag("--overlay", key="overlay", choices=OVERLAYS, help="overlay mode")
    flag(
        "--overlay-interface",
        key="overlay_interface",
        metavar="IFACE",
        help="interface carrying overlay traffic",
    )
    flag("--log-level", key="log_level", choices=LOG_LEVELS, help="log level")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="node-services",
        description="Per-node DNS, metadata and IPAM/overlay services from one state cache.",
    )
    parser.add_argument("--version", action="version", version=f"node-services {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = commands.add_parser(
        "run",
        help="run the daemon",
        description="Run the daemon. Settings: config file < environment < flags.",
        epilog="Every key: `node-services check-config --keys`.\n" + EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_run_flags(run)
    check = commands.add_parser(
        "check-config",
        help="validate settings (file, environment, flags), reporting every problem",
        description="Validate a YAML settings file together with the environment and the same "
        "flags `run` takes (a DaemonSet's arguments, say); exit 1 and list every problem when "
        "they are invalid (unknown NODE_SERVICES_* variables too).",
    )
    check.add_argument("file", type=Path, nargs="?", help="YAML settings file (or --config)")
    check.add_argument("--keys", action="store_true", help="list every settings key and exit")
    check.add_argument(
        "--markdown",
        action="store_true",
        help="with --keys: print docs/configuration.md (what `make docs` writes)",
    )
    _add_run_flags(check)
    commands.add_parser("version", help="print the version")
    status = commands.add_parser(
        "status",
        help="summarise what the running daemon does (its admin /status)",
        description="Read the running daemon's admin endpoint (/status) and print a summary: "
        "version, uptime, sources, records, DNS, metadata, IPAM pools, overlay peers. Exit 0 "
        "when it is ready, 1 when not, 2 when it cannot be reached.",
    )
    status.add_argument(
        "--admin",
        metavar="URL",
        help="admin endpoint (default: the configured admin_listen, e.g. http://127.0.0.1:9254)",
    )
    status.add_argument("--config", type=Path, metavar="FILE", help="YAML settings file")
    status.add_argument("--json", action="store_true", help="print the /status JSON as it is")
    status.add_argument("--timeout", type=float, default=10.0, help="seconds to wait (10)")
    return parser


def flag_names() -> dict[str, str]:
    """Settings key -> the `run` flag that sets it (``--upstream (repeatable)``)."""
    names: dict[str, str] = {}
    parser = argparse.ArgumentParser(add_help=False)
    _add_run_flags(parser)
    for action in parser._actions:  # the parser's own list: argparse has no public accessor
        if action.dest in _FLAG_FIELDS and action.option_strings:
            repeat = " (repeatable)" if isinstance(action, argparse._AppendAction) else ""
            names[_FLAG_FIELDS[action.dest]] = action.option_strings[0] + repeat
    return names


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {
        key: getattr(args, dest)
        for dest, key in _FLAG_FIELDS.items()
        if getattr(args, dest, None) is not None
    }


def _flag_labels() -> dict[str, str]:
    """Key -> flag, as a problem with a flag's value names it (``flags: --dns-listen: ...``)."""
    return {key: name.split(" ")[0] for key, name in flag_names().items()}


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def _print_settings(settings: Settings) -> None:
    from dataclasses import fields

    for f in fields(settings):
        value = getattr(settings, f.name)
        if f.name.endswith("secret_key") and value:
            value = "(set)"
        elif f.name == "dns_forward_zones":  # as NODE_SERVICES_DNS_FORWARD_ZONES takes it
            value = ";".join(str(v) for v in value)
        elif isinstance(value, tuple):
            value = ", ".join(str(v) for v in value)
        print(f"  {f.name}: {value}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "version":
        print(f"node-services {__version__}")
        return 0
    if args.command == "check-config":
        if args.keys:
            flags = flag_names()
            text = reference_markdown(flags) if args.markdown else describe_settings(flags) + "\n"
            sys.stdout.write(text)
            return 0
        config_file = args.file or args.config
        warnings: list[str] = []
        try:
            settings = load_settings(
                config_file=config_file,
                overrides=_overrides(args),
                flag_names=_flag_labels(),
                warnings=warnings,
            )
            problems = unsupported(settings)
            if problems or warnings:
                raise ConfigError(problems)
        except ConfigError as exc:
            # an unknown variable is a problem here: a checker says what run would ignore
            print(f"node-services: {ConfigError(exc.problems + warnings)}", file=sys.stderr)
            return 1
        print(f"{config_file or 'environment and flags'}: ok")
        _print_settings(settings)
        return 0
    if args.command == "status":
        return _status(args)
    if args.command == "run":
        warnings = []
        try:
            settings = load_settings(
                config_file=args.config,
                overrides=_overrides(args),
                flag_names=_flag_labels(),
                warnings=warnings,
            )
        except ConfigError as exc:
            print(f"node-services: {exc}", file=sys.stderr)
            return 2
        _setup_logging(settings.log_level)
        for warning in warnings:
            logging.getLogger("node_services").warning("%s", warning)
        from node_services.app import run_daemon

        try:
            run_daemon(settings)
        except ConfigError as exc:
            print(f"node-services: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:
            logging.getLogger("node_services").error("cannot start: %s", exc)
            return 1
        return 0
    parser.print_help()
    return 2


def _admin_url(args: argparse.Namespace) -> str:
    if args.admin:
        admin = str(args.admin).rstrip("/")
        # "127.0.0.1:9254" (no scheme): the admin endpoint is plain http
        return admin if "://" in admin else f"http://{admin}"
    listen = load_settings(config_file=args.config).admin_listen
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(listen.host, listen.host)
    return f"http://[{host}]:{listen.port}" if ":" in host else f"http://{host}:{listen.port}"


def _age(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def format_status(report: dict[str, Any]) -> str:
    """The human summary of a /status document."""
    lines = [
        f"node-services {report['version']} on node {report.get('node', '?')} "
        f"(pid {report['pid']}), up {_age(report.get('uptime_seconds', 0))}: "
        + ("ready" if report["ready"] else "NOT READY")
    ]
    lines.extend(f"  problem: {problem}" for problem in report["problems"])
    lines.append(f"listeners: {report.get('listeners', '?')}")
    if report.get("lame_duck"):
        lines.append("shutting down: lame duck (/readyz fails, still serving)")
    lines.append(
        f"store: version {report['store_version']}, "
        f"changed {_age(report['store_last_change_age_seconds'])} ago"
    )
    lines.append("sources:")
    for source in report["sources"]:
        line = f"  {source['name']}: {'synced' if source['synced'] else 'NOT SYNCED'}"
        line += f", changed {_age(source['last_change_age_seconds'])} ago"
        if "loads" in source:
            line += f", {source['loads']} loads, {source['errors']} errors"
        lines.append(line)
    if not report["sources"]:
        lines.append("  (none)")
    records = report["records"]
    lines.append("records: " + ", ".join(f"{kind} {count}" for kind, count in records.items()))
    dns = report["dns"]
    ratio = dns["cache_hit_ratio"]
    responses = dns["responses"]
    lines.append(
        f"dns: {dns['queries_per_second']:.1f} queries/s (last minute), "
        f"{dns['queries_total']} in all; forward cache hit ratio "
        + ("-" if ratio is None else f"{ratio:.1%}")
        + f"; forward errors {dns['forward_errors']}; "
        f"SERVFAIL {responses.get('SERVFAIL', 0)}, NXDOMAIN {responses.get('NXDOMAIN', 0)}"
    )
    metadata = report["metadata"]
    lines.append(
        f"metadata: {metadata['waiters']} waiting long-polls, {metadata['requests_total']} requests"
    )
    ipam = report.get("ipam")
    if ipam is None:
        lines.append("ipam: off (no pools)")
    else:
        for pool in ipam["pools"]:
            lines.append(
                f"ipam: {pool['network']} {pool['range']}: {pool['used']}/{pool['size']} "
                f"used ({pool['usage']:.1%})"
            )
        if not ipam["pools"]:
            lines.append("ipam: no pools yet")
    overlay = report.get("overlay")
    lines.append("overlay: off" if overlay is None else f"overlay: {overlay['peers']} peers")
    return "\n".join(lines)


STATUS_KEYS: Final = frozenset({"version", "pid", "ready", "problems", "sources"})
"""Keys every /status document of ours has (anything else answering is not our daemon)."""


def _status(args: argparse.Namespace) -> int:
    import json
    import urllib.error
    import urllib.request

    try:
        url = _admin_url(args) + "/status"
    except ConfigError as exc:
        print(f"node-services: {exc}", file=sys.stderr)
        return 2
    try:
        with urllib.request.urlopen(url, timeout=args.timeout) as response:
            body = response.read()
    except (urllib.error.URLError, OSError, ValueError) as exc:  # ValueError: a bad URL
        print(f"node-services: cannot read {url}: {exc}", file=sys.stderr)
        return 2
    try:
        report = json.loads(body)
    except ValueError as exc:
        print(f"node-services: {url} did not answer JSON: {exc}", file=sys.stderr)
        return 2
    try:
        if not isinstance(report, dict) or not report.keys() >= STATUS_KEYS:
            raise KeyError(", ".join(sorted(STATUS_KEYS)))
        text = json.dumps(report, indent=2, sort_keys=True) if args.json else format_status(report)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        print(
            f"node-services: {url} is not a node-services /status "
            f"(unexpected document: {type(exc).__name__}: {exc})",
            file=sys.stderr,
        )
        return 2
    print(text)
    return 0 if report.get("ready") else 1
