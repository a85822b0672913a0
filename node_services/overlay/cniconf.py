"""The CNI network config the daemon writes for this node's pods, so they get the overlay MTU.

With ``cni_conf_dir`` set (a DaemonSet mounts the host's ``/etc/cni/net.d``), every reconcile
pass renders the conflist (Debian/containernetworking ``bridge`` + ``node-services-ipam`` with
``"range": "node"``, ``mtu`` = the overlay MTU, default routes for the node's families, then
``portmap``) and writes it atomically (temporary file + rename in the same directory), only
when its content changed, so a runtime never reads half a file and pods never get a stale MTU.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final

CONF_NAME: Final = "10-node-services.conflist"
NETWORK: Final = "node-services"
BRIDGE: Final = "cni0"


def render(*, mtu: int, ipam_dir: Path, pod_cidrs: Iterable[str]) -> dict[str, Any]:
    """The conflist. ``ipMasq`` stays off: masquerading at the bridge would NAT pod-to-pod
    traffic to other nodes, whose pods must see the real source address."""
    families = {":" in cidr for cidr in pod_cidrs} or {False}
    routes = [{"dst": "::/0" if v6 else "0.0.0.0/0"} for v6 in sorted(families)]
    return {
        "cniVersion": "1.0.0",
        "name": NETWORK,
        "plugins": [
            {
                "type": "bridge",
                "bridge": BRIDGE,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "mtu": mtu,
                "ipam": {
                    "type": "node-services-ipam",
                    "range": "node",
                    "dataDir": str(ipam_dir),
                    "routes": routes,
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def write(directory: Path, conf: dict[str, Any]) -> bool:
    """Write ``conf`` as ``directory/CONF_NAME`` atomically; False when it already held it."""
    text = json.dumps(conf, indent=2) + "\n"
    path = directory / CONF_NAME
    try:
        if path.read_text(encoding="utf-8") == text:
            return False
    except FileNotFoundError:
        pass
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".node-services-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return True
