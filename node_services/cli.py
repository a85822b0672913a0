"""The ``node-services`` command: run, check-config, version."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from node_services import __version__
from node_services.config import (
    LOG_LEVELS,
    OVERLAYS,
    POD_RECORDS,
    ConfigError,
    Settings,
    describe_settings,
    env_name,
    load_settings,
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


def _add_run_flags(parser: argparse.ArgumentParser) -> None:
    def flag(*names: str, key: str, **kwargs: Any) -> None:
        kwargs["help"] = f"{kwargs.get('help', '')} [config key {key}, env {env_name(key)}]"
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
    flag("--dns-listen", key="dns_listen", metavar="HOST:PORT", help="DNS address")
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
        metavar="HOST[:PORT]",
        help="upstream DNS server (repeatable)",
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
        epilog="Every key: `node-services check-config --keys`.",
    )
    _add_run_flags(run)
    check = commands.add_parser(
        "check-config",
        help="validate a settings file (and the environment), reporting every problem",
        description="Validate a YAML settings file together with the environment; exit 1 and "
        "list every problem when it is invalid.",
    )
    check.add_argument("file", type=Path, nargs="?", help="YAML settings file")
    check.add_argument("--keys", action="store_true", help="list every settings key and exit")
    commands.add_parser("version", help="print the version")
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {
        key: getattr(args, dest)
        for dest, key in _FLAG_FIELDS.items()
        if getattr(args, dest, None) is not None
    }


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
            print(describe_settings())
            return 0
        try:
            settings = load_settings(config_file=args.file)
            problems = unsupported(settings)
            if problems:
                raise ConfigError(problems)
        except ConfigError as exc:
            print(f"node-services: {exc}", file=sys.stderr)
            return 1
        print(f"{args.file or 'environment'}: ok")
        _print_settings(settings)
        return 0
    if args.command == "run":
        try:
            settings = load_settings(config_file=args.config, overrides=_overrides(args))
        except ConfigError as exc:
            print(f"node-services: {exc}", file=sys.stderr)
            return 2
        _setup_logging(settings.log_level)
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
