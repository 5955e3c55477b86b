"""Several "hosts" on one machine: a network namespace per host, each joined by a veth pair to a
bridge in a switch namespace of its own, every host link capped at about 1 Gbit/s (tbf) and, where
the kernel has sch_netem, delayed. Nothing touches the root namespace: traffic flows only between
these namespaces (and their own loopbacks). Everything made is removed on exit, checked."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence

RATE = "1gbit"
DELAY = "1ms"
SUBNET = "10.231.77"


def can_run() -> str:
    """'' when namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "needs root (ip netns)"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "needs iproute2 (ip, tc): bash scripts/setup.sh installs it where apt exists"
    return ""


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), check=check, capture_output=True, text=True)


class Topology:
    """`hosts` names -> namespace `{prefix}{name}` with eth0 at 10.231.77.(i+1)."""

    def __init__(self, hosts: Sequence[str]) -> None:
        self.prefix = f"dvd{os.getpid() % 100000}"
        self.hosts = list(hosts)
        self.switch = f"{self.prefix}sw"
        self.shaping = ""  # which qdiscs ran: "tbf 1gbit" or "netem delay 1ms + tbf 1gbit"

    def ns(self, host: str) -> str:
        return f"{self.prefix}{host}"

    def ip(self, host: str) -> str:
        return f"{SUBNET}.{self.hosts.index(host) + 1}"

    def exec_prefix(self, host: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns(host)]

    def __enter__(self) -> Topology:
        try:
            self._build()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _build(self) -> None:
        sh("ip", "netns", "add", self.switch)
        sh("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.switch, "link", "set", "br0", "up")
        netem = self._has_netem()
        self.shaping = f"netem delay {DELAY} + tbf {RATE}" if netem else f"tbf {RATE} (no sch_netem in this kernel)"
        for i, host in enumerate(self.hosts):
            ns, outer = self.ns(host), f"{self.prefix}p{i}"
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", outer, "netns", self.switch)
            sh("ip", "-n", self.switch, "link", "set", outer, "master", "br0", "up")
            sh("ip", "-n", ns, "addr", "add", f"{self.ip(host)}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            for where, dev in ((ns, "eth0"), (self.switch, outer)):  # both directions of the link
                self._shape(where, dev, netem)

    def _has_netem(self) -> bool:
        probe = sh("ip", "-n", self.switch, "link", "add", "probe0", "type", "dummy", check=False)
        if probe.returncode:
            return False
        ok = sh("tc", "-n", self.switch, "qdisc", "add", "dev", "probe0", "root", "netem", "delay", DELAY,
                check=False).returncode == 0
        sh("ip", "-n", self.switch, "link", "del", "probe0", check=False)
        return ok

    @staticmethod
    def _shape(ns: str, dev: str, netem: bool) -> None:
        tbf = ["tbf", "rate", RATE, "burst", "256kb", "latency", "50ms"]
        if netem:
            sh("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "handle", "1:", "netem", "delay", DELAY)
            sh("tc", "-n", ns, "qdisc", "add", "dev", dev, "parent", "1:", "handle", "2:", *tbf)
        else:
            sh("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", *tbf)

    def link(self, host: str, up: bool) -> None:
        sh("ip", "-n", self.ns(host), "link", "set", "eth0", "up" if up else "down")

    def namespaces(self) -> list[str]:
        listed = sh("ip", "netns", "list").stdout.split()
        return [n for n in listed if n.startswith(self.prefix)]

    def __exit__(self, *exc: object) -> None:
        for name in [*(self.ns(h) for h in self.hosts), self.switch]:
            sh("ip", "netns", "del", name, check=False)  # its veth ends go with it
        left = self.namespaces()
        if left:
            raise RuntimeError(f"network namespaces left behind: {left}")
