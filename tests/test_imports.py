"""What every node pays for at start: the daemon loads WireGuard's libraries (cryptography's
X25519, pyroute2's generic netlink, ~17 MB together) only on a node that runs WireGuard."""

from __future__ import annotations

import subprocess
import sys


def loaded_after(imports: str) -> list[str]:
    """Which of WireGuard's libraries a fresh interpreter holds after ``imports``."""
    probe = (
        f"import sys\n{imports}\n"
        "print(' '.join(sorted(m for m in ('cryptography', 'pyroute2') if m in sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    return out.stdout.split()


def test_the_daemon_without_wireguard_loads_neither_cryptography_nor_pyroute2() -> None:
    assert loaded_after("import node_services.app, node_services.cli") == []


def test_the_wireguard_backend_loads_them_when_it_runs() -> None:
    assert loaded_after("from node_services.overlay import wgdriver, wgkeys") == [
        "cryptography",
        "pyroute2",
    ]
