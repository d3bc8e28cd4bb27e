"""A second "host" on this machine: a network namespace joined to ours by a veth pair (needs root and iproute2).

Processes started with `Netns.wrap(argv)` run inside it and reach this namespace at `host_ip`; it is reachable at
`peer_ip`. Traffic between the two crosses the veth interfaces, as it would cross a NIC between two hosts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid


class NetnsUnavailable(RuntimeError):
    """No rights or no iproute2 to create namespaces here (the reason is the message)."""


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if r.returncode != 0:
        raise NetnsUnavailable(f"ip {' '.join(args)}: {r.stderr.strip() or r.returncode}")


class Netns:
    """Namespace `name` with `peer_dev` at `peer_ip`, paired with `host_dev` at `host_ip` in ours."""

    def __init__(self, subnet: str = "10.77.0") -> None:
        tag = uuid.uuid4().hex[:6]
        self.name = f"brigade-{tag}"
        self.host_dev, self.peer_dev = f"vbh{tag}", f"vbp{tag}"
        self.host_ip, self.peer_ip = f"{subnet}.1", f"{subnet}.2"
        self.created = False

    def create(self) -> Netns:
        if shutil.which("ip") is None:
            raise NetnsUnavailable("iproute2 (`ip`) is not installed")
        if os.geteuid() != 0:
            raise NetnsUnavailable("creating network namespaces needs root (CAP_NET_ADMIN)")
        try:
            _ip("netns", "add", self.name)
            self.created = True
            _ip("link", "add", self.host_dev, "type", "veth", "peer", "name", self.peer_dev)
            _ip("link", "set", self.peer_dev, "netns", self.name)
            _ip("addr", "add", f"{self.host_ip}/24", "dev", self.host_dev)
            _ip("link", "set", self.host_dev, "up")
            _ip("-n", self.name, "addr", "add", f"{self.peer_ip}/24", "dev", self.peer_dev)
            _ip("-n", self.name, "link", "set", self.peer_dev, "up")
            _ip("-n", self.name, "link", "set", "lo", "up")
        except NetnsUnavailable:
            self.remove()
            raise
        return self

    def wrap(self, argv: list[str]) -> list[str]:
        """`argv` run inside the namespace."""
        return ["ip", "netns", "exec", self.name, *argv]

    def remove(self) -> None:
        """Delete the namespace (its end of the pair goes with it, and with it ours)."""
        subprocess.run(["ip", "link", "del", self.host_dev], capture_output=True, timeout=10)
        if self.created:
            subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=10)
            self.created = False
