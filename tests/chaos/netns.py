"""A second network stack on this machine, joined to ours by a veth pair: a worker "host" the tests can cut off."""

from __future__ import annotations

import os
import shutil
import subprocess
import time


class NetnsUnavailable(Exception):
    """Network namespaces cannot be made here (not root, no `ip`, or no CAP_SYS_ADMIN)."""


class NetworkNamespace:
    """A second network stack on this machine, joined to ours by a veth pair: a worker "host" we can cut off.

    Our side of the pair gets `host_address`, theirs `peer_address` (a /30 of 10.254.0.0/16 that no
    interface here uses). Taking our end down drops every packet between the two, silently, as a pulled
    cable would; bringing it up heals the link, with every address and route as it was.
    """

    def __init__(self, tag: str) -> None:
        suffix = f"{os.getpid() % 10000}{time.time_ns() % 1000:03d}"
        self.name = f"tfchaos-{suffix}"
        self.host_if = f"tfh{suffix}"[:15]
        self.peer_if = f"tfp{suffix}"[:15]
        used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, check=False).stdout
        third = next(n for n in range(1 + os.getpid() % 200, 255) if f"10.254.{n}." not in used)
        self.host_address = f"10.254.{third}.1"
        self.peer_address = f"10.254.{third}.2"
        self.created = False

    def _ip(self, *args: str) -> None:
        out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
        if out.returncode != 0:
            raise NetnsUnavailable(f"`ip {' '.join(args)}` failed: {out.stderr.strip()}")

    def create(self) -> None:
        if shutil.which("ip") is None:
            raise NetnsUnavailable("the `ip` command is not installed")
        self._ip("netns", "add", self.name)
        self.created = True
        self._ip("link", "add", self.host_if, "type", "veth", "peer", "name", self.peer_if)
        self._ip("link", "set", self.peer_if, "netns", self.name)
        self._ip("addr", "add", f"{self.host_address}/30", "dev", self.host_if)
        self._ip("link", "set", self.host_if, "up")
        self._ip("netns", "exec", self.name, "ip", "addr", "add", f"{self.peer_address}/30", "dev", self.peer_if)
        self._ip("netns", "exec", self.name, "ip", "link", "set", self.peer_if, "up")
        self._ip("netns", "exec", self.name, "ip", "link", "set", "lo", "up")

    def cut(self) -> float:
        self._ip("link", "set", self.host_if, "down")
        return time.time()

    def heal(self) -> float:
        self._ip("link", "set", self.host_if, "up")
        return time.time()

    def delete(self) -> None:
        """Remove the namespace; its end of the pair goes with it, and ours with that."""
        if self.created:
            subprocess.run(["ip", "netns", "del", self.name], capture_output=True, check=False, timeout=30)
            subprocess.run(["ip", "link", "del", self.host_if], capture_output=True, check=False, timeout=30)
            self.created = False
