"""The IPAM plugin driven exactly as a container runtime drives it: CNI_* environment variables,
the network configuration on stdin, a result or an error on stdout."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node_services.ipam.store import IPAMStore


@dataclass
class Reply:
    returncode: int
    stdout: str
    stderr: str

    @property
    def json(self) -> Any:
        return json.loads(self.stdout)

    @property
    def ips(self) -> list[str]:
        return [entry["address"] for entry in self.json["ips"]]


@dataclass
class Plugin:
    """Our plugin installed (by its own ``--install``) in a CNI_PATH directory of the test."""

    cni_path: Path
    data_dir: Path

    @property
    def executable(self) -> Path:
        return self.cni_path / "node-services-ipam"

    def config(self, version: str = "1.0.0", name: str = "testnet", **ipam: Any) -> dict[str, Any]:
        body: dict[str, Any] = {"type": "node-services-ipam", "dataDir": str(self.data_dir)}
        body.update(ipam)
        if "subnet" not in body and "ranges" not in body and "range" not in body:
            body["subnet"] = "10.244.7.0/24"
        return {"cniVersion": version, "name": name, "ipam": body}

    def env(
        self,
        command: str,
        *,
        container: str = "c1",
        ifname: str = "eth0",
        netns: str = "/var/run/netns/test",
        args: str = "",
        extra: dict[str, str] | None = None,
    ) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CNI_")}
        env.update(
            CNI_COMMAND=command,
            CNI_CONTAINERID=container,
            CNI_IFNAME=ifname,
            CNI_NETNS=netns,
            CNI_PATH=str(self.cni_path),
            CNI_ARGS=args,
        )
        for key, value in (extra or {}).items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        return {k: v for k, v in env.items() if v != ""}

    def run(
        self, command: str, config: dict[str, Any] | bytes | None = None, **kwargs: Any
    ) -> Reply:
        stdin = (
            config if isinstance(config, bytes) else json.dumps(config or self.config()).encode()
        )
        proc = subprocess.run(
            [str(self.executable)],
            input=stdin,
            env=self.env(command, **kwargs),
            capture_output=True,
            timeout=60,
        )
        return Reply(proc.returncode, proc.stdout.decode(), proc.stderr.decode())

    def add(self, container: str = "c1", **kwargs: Any) -> Reply:
        config = kwargs.pop("config", None)
        return self.run("ADD", config, container=container, **kwargs)

    def popen(self, command: str, config: dict[str, Any], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start the plugin without waiting (stdin from a file, so many can run at once)."""
        with tempfile.TemporaryFile() as stdin:
            stdin.write(json.dumps(config).encode())
            stdin.seek(0)
            return subprocess.Popen(
                [str(self.executable)],
                stdin=stdin,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=self.env(command, **kwargs),
            )

    def check_store(self) -> list[str]:
        store = IPAMStore(self.data_dir)
        try:
            with store.transaction() as tx:
                return tx.check()
        finally:
            store.close()

    def held(self, network: str = "testnet") -> set[tuple[str, str]]:
        """(container id, address) of every allocation of the network."""
        store = IPAMStore(self.data_dir)
        try:
            with store.transaction() as tx:
                return {(a.container_id, a.ip) for a in tx.allocations(network)}
        finally:
            store.close()

    def allocations(self, network: str = "testnet") -> dict[tuple[str, str], str]:
        store = IPAMStore(self.data_dir)
        try:
            with store.transaction() as tx:
                return {(a.container_id, a.ifname): a.ip for a in tx.allocations(network)}
        finally:
            store.close()


def error_of(reply: Reply) -> tuple[int, str]:
    """(code, msg) of an error reply; asserts the process failed and printed the error shape."""
    assert reply.returncode != 0, reply.stdout
    body = reply.json
    assert set(body) <= {"cniVersion", "code", "msg", "details"}, body
    assert isinstance(body["cniVersion"], str)
    return body["code"], body["msg"]
