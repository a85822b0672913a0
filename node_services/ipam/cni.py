"""`node-services-ipam`: the CNI IPAM plugin process (one per CNI command).

The runtime (or a main plugin such as ``bridge``) runs it with ``CNI_COMMAND`` and friends in
the environment and the network configuration on stdin; it answers on stdout and exits 0, or
prints ``{cniVersion, code, msg, details}`` and exits 1. Commands: ADD, DEL, CHECK, VERSION,
GC, STATUS of CNI spec 0.3.0 to 1.1.0 (GC and STATUS from 1.1.0, CHECK from 0.4.0).

It works while the daemon is down: every decision is made from the SQLite store under
``dataDir``. Standard library only (checked by an import-linter contract), so a cold start
costs only the interpreter; ``node-services-ipam --install DIR`` writes a launcher that starts
the interpreter with ``-S`` (no site-packages scan) for the lowest start-up cost.
"""

from __future__ import annotations

import os
import sys
import time
from ipaddress import ip_address, ip_network

from node_services.ipam import cnijson
from node_services.ipam.allocator import (
    Exhausted,
    RangeError,
    RangeSet,
    Unavailable,
    node_range_sets,
    parse_range_sets,
)
from node_services.ipam.store import (
    DEFAULT_TIMEOUT,
    IPAMStore,
    StoreBusy,
    StoreError,
    StoreLost,
)
from node_services.ipam.tables import Owner, Transaction

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs the plugin's start-up an import
    from typing import Any, Final, TypeGuard

SUPPORTED_VERSIONS: Final = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
LATEST: Final = "1.1.0"
DEFAULT_DATA_DIR: Final = "/var/lib/node-services/ipam"
PLUGIN_NAME: Final = "node-services-ipam"
MAX_LOCK_TIMEOUT: Final = 600.0
"""The longest ``ipam.lockTimeout`` (10 minutes: longer than any runtime waits for a plugin)."""

# CNI well-known error codes, and ours (100+).
INCOMPATIBLE_VERSION: Final = 1
INVALID_ENVIRONMENT: Final = 4
IO_FAILURE: Final = 5
DECODE_FAILURE: Final = 6
INVALID_CONFIG: Final = 7
TRY_AGAIN_LATER: Final = 11
NOT_AVAILABLE: Final = 50
POOL_EXHAUSTED: Final = 100
ADDRESS_UNAVAILABLE: Final = 101
RESERVATION_MISSING: Final = 102
INTERNAL_ERROR: Final = 110

TEST_PAUSE_ENV: Final = "NODE_SERVICES_IPAM_TEST_PAUSE"
"""Test only: a file path; ADD creates it inside its transaction, after reserving, then sleeps,
so a test can SIGKILL the plugin in the middle of an ADD."""

_ID_FIRST: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
_ID_REST: Final = _ID_FIRST | frozenset("_.-")
_COMMANDS: Final = ("ADD", "DEL", "CHECK", "VERSION", "GC", "STATUS")


class CNIError(Exception):
    """A failed command: the CNI error code, a message, and details."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details


def _valid_container_id(value: str) -> bool:
    r"""The spec's ``^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$`` (whole string; no :mod:`re`, which costs the
    plugin's start-up several milliseconds)."""
    return bool(value) and value[0] in _ID_FIRST and all(c in _ID_REST for c in value)


def _is_path(value: object) -> TypeGuard[str]:
    """A usable path: text with no NUL (the OS call would fail with a bare ValueError) and
    no lone surrogate (it would fail with UnicodeEncodeError)."""
    return isinstance(value, str) and "\x00" not in value and _encodable(value)


def _encodable(text: str) -> bool:
    """Whether ``text`` is valid UTF-8 text: bytes that were not (decoded from the environment
    with surrogateescape, or JSON's lone ``\\ud800`` escapes) cannot be stored in SQLite."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


class Request:
    """One invocation: the CNI_* environment and the decoded network configuration."""

    __slots__ = ("args", "command", "config", "container_id", "ifname", "netns", "version")

    def __init__(self, command: str) -> None:
        self.command = command
        self.container_id = ""
        self.netns = ""
        self.ifname = ""
        self.args: dict[str, str] = {}
        self.config: dict[str, Any] = {}
        self.version = LATEST

    def at_least(self, version: str) -> bool:
        return _version_tuple(self.version) >= _version_tuple(version)


def parse_cni_args(text: str) -> dict[str, str]:
    """``CNI_ARGS``: ``KEY=VALUE`` pairs separated by ``;``."""
    pairs: dict[str, str] = {}
    for item in text.split(";"):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CNIError(INVALID_ENVIRONMENT, f"CNI_ARGS: {item!r} is not KEY=VALUE", text)
        pairs[key] = value
    return pairs


def parse_request(environ: dict[str, str] | os._Environ[str], stdin: bytes) -> Request:
    """Validate the environment and decode stdin; raises CNIError with the spec's code."""
    command = environ.get("CNI_COMMAND", "")
    if command not in _COMMANDS:
        raise CNIError(
            INVALID_ENVIRONMENT,
            "CNI_COMMAND must be one of " + ", ".join(_COMMANDS),
            f"CNI_COMMAND={command!r}",
        )
    request = Request(command)
    if command in ("ADD", "DEL", "CHECK"):
        request.container_id = environ.get("CNI_CONTAINERID", "")
        request.ifname = environ.get("CNI_IFNAME", "")
        request.netns = environ.get("CNI_NETNS", "")
        missing = [
            name
            for name, value in (
                ("CNI_CONTAINERID", request.container_id),
                ("CNI_IFNAME", request.ifname),
                ("CNI_NETNS", request.netns if command != "DEL" else "-"),
                ("CNI_PATH", environ.get("CNI_PATH", "")),
            )
            if not value
        ]
        if missing:
            raise CNIError(
                INVALID_ENVIRONMENT, "required environment variables missing", ", ".join(missing)
            )
        if not _valid_container_id(request.container_id):
            raise CNIError(
                INVALID_ENVIRONMENT, "invalid characters in CNI_CONTAINERID", request.container_id
            )
        name = request.ifname
        if (
            len(name) > 15
            or name in (".", "..")
            or any(c in name for c in "/: \t\n\x00")
            or not _encodable(name)
        ):
            raise CNIError(INVALID_ENVIRONMENT, "invalid interface name in CNI_IFNAME", name)
        cni_args = environ.get("CNI_ARGS", "")
        if not _encodable(cni_args):
            raise CNIError(INVALID_ENVIRONMENT, "CNI_ARGS is not UTF-8", cnijson.brief(cni_args))
        request.args = parse_cni_args(cni_args)
    elif command == "GC" and not environ.get("CNI_PATH"):
        raise CNIError(INVALID_ENVIRONMENT, "required environment variables missing", "CNI_PATH")

    if command == "VERSION" and not stdin.strip():
        return request
    try:
        config = cnijson.loads(stdin)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CNIError(
            DECODE_FAILURE, "network configuration on stdin is not JSON", str(exc)
        ) from None
    if not isinstance(config, dict):
        raise CNIError(
            DECODE_FAILURE, "network configuration must be a JSON object", type(config).__name__
        )
    request.config = config
    version = config.get("cniVersion")
    if command == "VERSION":
        if isinstance(version, str) and version in SUPPORTED_VERSIONS:
            request.version = version
        return request
    if not isinstance(version, str) or not version:
        raise CNIError(INVALID_CONFIG, "cniVersion is required", cnijson.brief(version))
    if version not in SUPPORTED_VERSIONS:
        raise CNIError(
            INCOMPATIBLE_VERSION,
            f"CNI version {version} is not supported",
            "supported: " + ", ".join(SUPPORTED_VERSIONS),
        )
    request.version = version
    required = {"CHECK": "0.4.0", "GC": "1.1.0", "STATUS": "1.1.0"}.get(command)
    if required and not request.at_least(required):
        raise CNIError(
            INCOMPATIBLE_VERSION,
            f"config version {version} does not allow {command}",
            f"needs {required}",
        )
    network = config.get("name")
    if not isinstance(network, str) or not network:
        raise CNIError(INVALID_CONFIG, "network configuration needs a name")
    if not _valid_container_id(network):  # the spec gives names the same alphabet
        raise CNIError(
            INVALID_CONFIG,
            "network name: a letter or digit, then letters, digits, '_', '.' or '-'",
            cnijson.brief(network),
        )
    if not isinstance(config.get("ipam"), dict):
        raise CNIError(INVALID_CONFIG, "network configuration needs an ipam object")
    return request


# -- configuration --------------------------------------------------------------------------


def data_dir(request: Request) -> str:
    value = request.config["ipam"].get("dataDir", DEFAULT_DATA_DIR)
    if not value or not _is_path(value):
        raise CNIError(
            INVALID_CONFIG, "ipam.dataDir must be a directory path", cnijson.brief(value)
        )
    return value


def lock_timeout(request: Request) -> float:
    """``ipam.lockTimeout``: seconds to wait for another command's lock (then code 11), from 0
    to :data:`MAX_LOCK_TIMEOUT`. NaN, infinities and huge values are refused: SQLite would read
    them as "do not wait at all"."""
    value = request.config["ipam"].get("lockTimeout", DEFAULT_TIMEOUT)
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0 <= value <= MAX_LOCK_TIMEOUT  # False for NaN too
    ):
        raise CNIError(
            INVALID_CONFIG,
            f"ipam.lockTimeout must be a number of seconds from 0 to {MAX_LOCK_TIMEOUT:g}",
            cnijson.brief(value),
        )
    return float(value)


def range_sets(request: Request, tx: Transaction, *, code: int = TRY_AGAIN_LATER) -> list[RangeSet]:
    """The configured range sets; ``"range": "node"`` reads the node's persisted pod CIDRs."""
    ipam = request.config["ipam"]
    try:
        if "range" in ipam:
            if ipam["range"] != "node":
                raise CNIError(
                    INVALID_CONFIG,
                    'ipam.range: the only value is "node"',
                    cnijson.brief(ipam["range"]),
                )
            cidrs = tx.node_ranges()
            if not cidrs:
                raise CNIError(code, *why_no_node_ranges(tx, data_dir(request)))
            return node_range_sets(cidrs)
        return parse_range_sets(ipam)
    except RangeError as exc:
        raise CNIError(INVALID_CONFIG, str(exc)) from None


RESOLV_CONF_LIMIT: Final = 65536
"""Characters of ``ipam.resolvConf`` read (a real one is a few hundred)."""

STALE_AFTER: Final = 30.0
"""The daemon counts as stopped when its last pass is older than this, or three intervals."""


def why_no_node_ranges(tx: Transaction, directory: str) -> tuple[str, str]:
    """(msg, details) of "range": "node" without ranges: which of the daemon's parts is missing
    (none reconciles this dataDir, it stopped, or it runs but has no CIDRs for its node)."""
    seen = tx.reconciler()
    now = time.time()
    if seen is None:
        return (
            "this node's pod CIDRs are not known yet: no node-services daemon has reconciled "
            "this dataDir",
            f"check that node-services runs on this node with ipam_dir (--ipam-dir) {directory} "
            "and ipam on or auto (auto starts once the directory exists); its log says "
            '"ipam reconcile on <dir>"',
        )
    node, interval, at = seen
    age = now - at
    if age > max(STALE_AFTER, 3 * interval):
        return (
            "this node's pod CIDRs are not known yet: the node-services daemon stopped "
            f"reconciling this dataDir {age:.0f}s ago",
            f"its last pass (node {node}) was at "
            f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(at))}; check that the daemon "
            "is running and its log for ipam errors",
        )
    return (
        f"this node's pod CIDRs are not known yet: the node-services daemon has none for node "
        f"{node}",
        f"it runs, but node {node} shows no pod CIDRs: check the Node's spec.podCIDRs "
        f"(kubectl get node {node} -o jsonpath='{{.spec.podCIDRs}}'), or, on Rancher 1.x, the "
        "default network's subnet, and that the daemon's --node-name is this node's name",
    )


def routes(request: Request) -> list[dict[str, str]]:
    raw = request.config["ipam"].get("routes", [])
    if not isinstance(raw, list):
        raise CNIError(INVALID_CONFIG, "ipam.routes must be a list")
    out = []
    for i, route in enumerate(raw):
        if not isinstance(route, dict) or not isinstance(route.get("dst"), str):
            raise CNIError(
                INVALID_CONFIG, f"ipam.routes[{i}]: needs dst (a CIDR)", cnijson.brief(route)
            )
        try:
            entry = {"dst": str(ip_network(route["dst"], strict=False))}
            if route.get("gw"):
                entry["gw"] = str(ip_address(route["gw"]))
        except ValueError as exc:
            raise CNIError(INVALID_CONFIG, f"ipam.routes[{i}]: {exc}") from None
        out.append(entry)
    return out


def dns(request: Request) -> dict[str, Any] | None:
    """``ipam.resolvConf``: nameservers, domain, search and options of a resolv.conf file."""
    path = request.config["ipam"].get("resolvConf")
    if not path:
        return None
    if not _is_path(path):
        raise CNIError(INVALID_CONFIG, "ipam.resolvConf must be a file path", cnijson.brief(path))
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read(RESOLV_CONF_LIMIT)  # (a device such as /dev/zero never ends)
    except OSError as exc:
        raise CNIError(INVALID_CONFIG, f"ipam.resolvConf: cannot read {path}", str(exc)) from None
    result: dict[str, Any] = {}
    for line in text.splitlines():
        words = line.split()
        if not words or words[0].startswith(("#", ";")):
            continue
        if words[0] == "nameserver" and len(words) > 1:
            result.setdefault("nameservers", []).append(words[1])
        elif words[0] == "domain" and len(words) > 1:
            result["domain"] = words[1]
        elif words[0] == "search":
            result["search"] = words[1:]
        elif words[0] == "options":
            result.setdefault("options", []).extend(words[1:])
    return result


def requested_ips(request: Request) -> list[str]:
    """Requested addresses: ``CNI_ARGS IP=``, ``args.cni.ips``, ``runtimeConfig.ips``."""
    found: list[Any] = []
    if request.args.get("IP"):
        found.extend(request.args["IP"].split(","))
    cni_args = request.config.get("args", {})
    if isinstance(cni_args, dict) and isinstance(cni_args.get("cni"), dict):
        ips = cni_args["cni"].get("ips", [])
        found.extend(ips if isinstance(ips, list) else [ips])
    runtime = request.config.get("runtimeConfig", {})
    if isinstance(runtime, dict):
        ips = runtime.get("ips", [])
        found.extend(ips if isinstance(ips, list) else [ips])
    out = []
    for item in found:
        if not isinstance(item, str):
            raise CNIError(
                INVALID_CONFIG, f"requested IP: a {type(item).__name__} is not an IP address"
            )
        text = item.strip().split("/")[0]
        try:
            out.append(str(ip_address(text)))
        except ValueError:
            raise CNIError(INVALID_CONFIG, f"requested IP {item!r} is not an IP address") from None
    return list(dict.fromkeys(out))


def assign_requested(sets: list[RangeSet], wanted: list[str]) -> list[int | None]:
    """Which requested address goes to which range set (None: allocate)."""
    chosen: list[int | None] = [None] * len(sets)
    for text in wanted:
        value = int(ip_address(text))
        for i, range_set in enumerate(sets):
            if range_set.family == ip_address(text).version and range_set.range_of(value):
                if chosen[i] is not None:
                    raise CNIError(
                        ADDRESS_UNAVAILABLE,
                        f"more than one IP requested for range set {range_set.spec}",
                        ", ".join(wanted),
                    )
                chosen[i] = value
                break
        else:
            raise CNIError(ADDRESS_UNAVAILABLE, f"requested IP {text} is in no configured range")
    return chosen


# -- results --------------------------------------------------------------------------------


def ip_entry(request: Request, range_set: RangeSet, ip: str) -> dict[str, str]:
    value = int(ip_address(ip))
    found = range_set.range_of(value)
    assert found is not None
    entry = {"address": f"{ip}/{found.subnet.prefixlen}"}
    if found.gateway is not None:
        entry["gateway"] = str(found.gateway)
    if not request.at_least("1.0.0"):
        entry["version"] = str(found.family)
    return entry


def build_result(
    request: Request,
    entries: list[dict[str, str]],
    route_list: list[dict[str, str]],
    servers: dict[str, Any] | None,
) -> dict[str, Any]:
    result: dict[str, Any] = {"cniVersion": request.version, "ips": entries}
    result["routes"] = route_list
    if servers is not None:
        result["dns"] = servers
    return result


# -- commands -------------------------------------------------------------------------------


def owner_of(request: Request) -> Owner:
    return Owner(
        container_id=request.container_id,
        ifname=request.ifname,
        pod_namespace=request.args.get("K8S_POD_NAMESPACE", ""),
        pod_name=request.args.get("K8S_POD_NAME", ""),
        pod_uid=request.args.get("K8S_POD_UID", ""),
    )


def cmd_add(request: Request, store: IPAMStore) -> dict[str, Any]:
    network = request.config["name"]
    wanted = requested_ips(request)
    # read and validated before reserving anything: a failed ADD leaves no reservation
    route_list = routes(request)
    servers = dns(request)
    with store.transaction() as tx:
        sets = range_sets(request, tx)
        chosen = assign_requested(sets, wanted)
        # An address the orchestrator assigned this container (Cattle primaryIpAddress).
        for text in tx.assigned(request.container_id):
            for i, range_set in enumerate(sets):
                if chosen[i] is None and _in_set(range_set, text):
                    chosen[i] = int(ip_address(text))
        existing = tx.owned(network, request.container_id, request.ifname)
        entries: list[dict[str, str]] = []
        for i, range_set in enumerate(sets):
            mine = [a for a in existing if _in_set(range_set, a.ip)]
            if mine:
                entries.append(ip_entry(request, range_set, mine[0].ip))
                continue
            try:
                ip = tx.allocate(network, range_set, owner_of(request), chosen[i])
            except Exhausted as exc:
                raise CNIError(
                    POOL_EXHAUSTED,
                    f"no free IP address in network {network}",
                    f"{exc}; release addresses (CNI DEL/GC) or widen the range",
                ) from None
            except Unavailable as exc:
                raise CNIError(ADDRESS_UNAVAILABLE, str(exc)) from None
            entries.append(ip_entry(request, range_set, ip))
        # Left over from a range the configuration no longer has: give them back.
        for allocation in existing:
            if not any(_in_set(s, allocation.ip) for s in sets):
                tx.release(allocation)
        pause = os.environ.get(TEST_PAUSE_ENV)
        if pause:
            with open(pause, "w") as marker:
                marker.write(str(os.getpid()))
            time.sleep(60)
    return build_result(request, entries, route_list, servers)


def _in_set(range_set: RangeSet, ip: str) -> bool:
    address = ip_address(ip)
    return address.version == range_set.family and range_set.range_of(int(address)) is not None


def cmd_del(request: Request, store: IPAMStore) -> None:
    with store.transaction() as tx:
        tx.release_owner(request.config["name"], request.container_id, request.ifname)


def cmd_check(request: Request, store: IPAMStore) -> None:
    network = request.config["name"]
    with store.transaction() as tx:
        held = {a.ip for a in tx.owned(network, request.container_id, request.ifname)}
    if not held:
        raise CNIError(
            RESERVATION_MISSING,
            f"no IP reservation for container {request.container_id} interface "
            f"{request.ifname} in network {network}",
        )
    prev = request.config.get("prevResult")
    if isinstance(prev, dict):
        prev_ips = prev.get("ips") or []
        if not isinstance(prev_ips, list):
            raise CNIError(INVALID_CONFIG, "prevResult.ips must be a list", cnijson.brief(prev_ips))
        for entry in prev_ips:
            address = str(entry.get("address", "")).split("/")[0] if isinstance(entry, dict) else ""
            if address and address not in held:
                raise CNIError(
                    RESERVATION_MISSING,
                    f"address {address} of prevResult is not reserved for container "
                    f"{request.container_id} interface {request.ifname}",
                    "held: " + ", ".join(sorted(held)),
                )


def cmd_gc(request: Request, store: IPAMStore) -> None:
    raw = request.config.get("cni.dev/valid-attachments", request.config.get("cni.dev/attachments"))
    if not isinstance(raw, list):
        raise CNIError(
            INVALID_CONFIG, "GC needs cni.dev/valid-attachments (a list of {containerID, ifname})"
        )
    valid = set()
    for item in raw:
        if not isinstance(item, dict) or not isinstance(item.get("containerID"), str):
            raise CNIError(
                INVALID_CONFIG, "cni.dev/valid-attachments: bad entry", cnijson.brief(item)
            )
        valid.add((item["containerID"], str(item.get("ifname", ""))))
    network = request.config["name"]
    with store.transaction() as tx:
        for allocation in tx.allocations(network):
            if (allocation.container_id, allocation.ifname) not in valid:
                tx.release(allocation)


def cmd_status(request: Request, store: IPAMStore) -> None:
    network = request.config["name"]
    with store.transaction() as tx:
        sets = range_sets(request, tx, code=NOT_AVAILABLE)
        full = [s.spec for s in sets if tx.free_count(network, s) == 0]
    if full:
        raise CNIError(
            NOT_AVAILABLE,
            f"IP pool exhausted in network {network}: no free address",
            "exhausted range sets: " + "; ".join(full),
        )


def run(request: Request, *, close: bool = True) -> dict[str, Any] | None:
    """Execute one command; the result to print, or None. ``close=False`` leaves the database
    open for the process exit (see :func:`main`)."""
    if request.command == "VERSION":
        return {"cniVersion": request.version, "supportedVersions": list(SUPPORTED_VERSIONS)}
    store = IPAMStore(data_dir(request), timeout=lock_timeout(request))
    try:
        if request.command == "ADD":
            return cmd_add(request, store)
        if request.command == "DEL":
            cmd_del(request, store)
        elif request.command == "CHECK":
            cmd_check(request, store)
        elif request.command == "GC":
            cmd_gc(request, store)
        else:
            cmd_status(request, store)
        return None
    except StoreLost as exc:
        if request.command == "DEL":
            # Nothing recorded is left to release, and a failing DEL would keep the pod from
            # ever being torn down; the next ADD on this node fails and says why.
            sys.stderr.write(f"{PLUGIN_NAME}: DEL released nothing: {exc}\n")
            return None
        code = NOT_AVAILABLE if request.command == "STATUS" else IO_FAILURE
        raise CNIError(
            code, "the IPAM store was lost: running containers' reservations are unknown", str(exc)
        ) from None
    except StoreBusy as exc:
        code = NOT_AVAILABLE if request.command == "STATUS" else TRY_AGAIN_LATER
        raise CNIError(code, "the IPAM store is busy", str(exc)) from None
    except StoreError as exc:
        code = NOT_AVAILABLE if request.command == "STATUS" else IO_FAILURE
        raise CNIError(code, "the IPAM store cannot be used", str(exc)) from None
    finally:
        if close:
            store.close()


def _reply_version(stdin: bytes) -> str:
    """The cniVersion to answer an error in: the request's, when it is one we speak."""
    try:
        version = cnijson.loads(stdin).get("cniVersion")
    except Exception:  # whatever the input, the error reply itself must not fail
        return LATEST
    return version if version in SUPPORTED_VERSIONS else LATEST


def error_text(error: CNIError, version: str) -> str:
    body = {"cniVersion": version, "code": error.code, "msg": error.msg}
    if error.details:
        body["details"] = error.details
    return cnijson.dumps(body) + "\n"


def respond(environ: dict[str, str] | os._Environ[str], stdin: bytes) -> tuple[str, int]:
    """One command, from its environment and stdin to (what to print, exit status): a result
    (or nothing) and 0, or exactly one CNI error object and 1, whatever the input."""
    try:
        result = run(parse_request(environ, stdin))
    except CNIError as error:
        return error_text(error, _reply_version(stdin)), 1
    except Exception as exc:  # a bug: still answer in the CNI error shape, with the cause
        details = cnijson.brief(exc)
        internal = CNIError(INTERNAL_ERROR, "internal error", details)
        return error_text(internal, _reply_version(stdin)), 1
    return ("" if result is None else cnijson.dumps(result) + "\n"), 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv:
        if argv[0] == "--install":
            from node_services.ipam import install  # install time only

            return install.main(argv[1:])
        if argv[0] == "--version":
            print(f"{PLUGIN_NAME} CNI plugin, CNI spec versions {', '.join(SUPPORTED_VERSIONS)}")
            return 0
        usage = (
            f"usage: {PLUGIN_NAME}  (a CNI plugin: run by the container runtime with CNI_COMMAND"
            " set)\n"
            f"       {PLUGIN_NAME} --install DIR [--python PATH] [--lib DIR] [--root DIR]\n"
            "           (write the launcher a runtime runs into DIR; --install --help)\n"
            f"       {PLUGIN_NAME} --version | --help\n"
        )
        if argv[0] in ("--help", "-h"):  # asked for: stdout, success
            sys.stdout.write(usage)
            return 0
        sys.stderr.write(f"{PLUGIN_NAME}: unknown argument {argv[0]!r}\n{usage}")
        return 2
    text, status = respond(os.environ, sys.stdin.buffer.read())
    sys.stdout.write(text)
    sys.stdout.flush()
    # run() closed the store: the last connection to close checkpoints the WAL and removes it.
    # (Exiting with the database open, as a crash does, is safe, but then the next process
    # replays the whole WAL and can never restart it: the WAL, and every command's start-up,
    # grew with each pod ever started.)
    os._exit(status)


if __name__ == "__main__":
    sys.exit(main())
