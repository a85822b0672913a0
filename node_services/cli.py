"""The ``node-services`` command: run, check-config, version."""

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
