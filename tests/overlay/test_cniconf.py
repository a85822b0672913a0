"""The pods' CNI network config: exact content, atomic write, rewritten only on change."""

from __future__ import annotations

import json
from pathlib import Path

from node_services.overlay import cniconf


def test_conflist_names_bridge_our_ipam_node_range_and_the_overlay_mtu() -> None:
    conf = cniconf.render(mtu=1450, ipam_dir=Path("/var/lib/x"), pod_cidrs=["10.244.1.0/24"])
    assert conf == {
        "cniVersion": "1.0.0",
        "name": "node-services",
        "plugins": [
            {
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "mtu": 1450,
                "ipam": {
                    "type": "node-services-ipam",
                    "range": "node",
                    "dataDir": "/var/lib/x",
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }
    dual = cniconf.render(mtu=1450, ipam_dir=Path("/x"), pod_cidrs=["10.244.1.0/24", "fd00::/64"])
    assert dual["plugins"][0]["ipam"]["routes"] == [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}]


def test_write_is_atomic_and_only_when_the_content_changes(tmp_path: Path) -> None:
    conf = cniconf.render(mtu=1450, ipam_dir=tmp_path, pod_cidrs=[])
    directory = tmp_path / "net.d"
    assert cniconf.write(directory, conf) is True
    path = directory / cniconf.CONF_NAME
    assert json.loads(path.read_text()) == conf
    inode = path.stat().st_ino
    assert cniconf.write(directory, conf) is False
    assert path.stat().st_ino == inode
    assert cniconf.write(directory, cniconf.render(mtu=1400, ipam_dir=tmp_path, pod_cidrs=[]))
    assert json.loads(path.read_text())["plugins"][0]["mtu"] == 1400
    assert path.stat().st_ino != inode  # replaced by rename, never rewritten in place
    assert sorted(p.name for p in directory.iterdir()) == [cniconf.CONF_NAME]
