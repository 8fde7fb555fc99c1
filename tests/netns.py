"""Separate hosts on one machine: network namespaces joined by a bridge, links optionally shaped with tbf.

Only the addresses made here (a 10.X.0.0/24 that exists only inside these
namespaces) are ever used. Everything is removed on exit, even after a failure.
Needs root; ``available()`` says whether this machine allows it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def available() -> tuple[bool, str]:
    if os.geteuid() != 0:
        return False, "network namespaces need root"
    if shutil.which("ip") is None:
        return False, "the ip tool (iproute2) is not installed"
    probe = f"probe{uuid.uuid4().hex[:6]}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return False, f"cannot create a network namespace: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return True, ""


def start_worker(host: Host, run_dir: Path, *args: str) -> subprocess.Popen[str]:
    """`worker start ARGS` inside `host`, listening on its address; its output goes to run_dir/worker.log."""
    from tests.helpers import ROOT, worker_env

    run_dir.mkdir(parents=True, exist_ok=True)
    log = open(run_dir / "worker.log", "w")  # noqa: SIM115 (the child process owns it)
    argv = [sys.executable, "-m", "worker", "start", "--run-dir", str(run_dir), "--host-maddrs",
            f"/ip4/{host.address}/tcp/0", "--threads", "1", "--no-progress", *args]
    return subprocess.Popen(host.command(argv), stdout=log, stderr=subprocess.STDOUT, env=worker_env(),
                            cwd=ROOT)


@dataclass
class Host:
    name: str  # namespace name
    address: str  # its IPv4 address on the shared bridge

    def command(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]


@dataclass
class Network:
    """N hosts on one bridge; each host's uplink (its side of the veth) may be capped with tbf."""

    hosts: list[Host] = field(default_factory=list)
    _bridge_ns: str = ""
    _tag: str = ""

    @classmethod
    def create(cls, n: int, *, rate_mbit: float | None = None, subnet_octet: int | None = None) -> Network:
        tag = uuid.uuid4().hex[:6]
        octet = subnet_octet if subnet_octet is not None else 100 + int(tag, 16) % 100
        net = cls(_bridge_ns=f"dlbr{tag}", _tag=tag)
        try:
            _ip("netns", "add", net._bridge_ns)
            _ip("-n", net._bridge_ns, "link", "add", "br0", "type", "bridge")
            _ip("-n", net._bridge_ns, "link", "set", "br0", "up")
            for i in range(n):
                host = Host(name=f"dlh{tag}{i}", address=f"10.{octet}.0.{i + 1}")
                _ip("netns", "add", host.name)
                net.hosts.append(host)
                _ip("link", "add", f"v{tag}{i}", "netns", host.name, "type", "veth", "peer",
                    "name", f"b{tag}{i}", "netns", net._bridge_ns)
                _ip("-n", host.name, "link", "set", "lo", "up")
                _ip("-n", host.name, "link", "set", f"v{tag}{i}", "name", "eth0")
                _ip("-n", host.name, "addr", "add", f"{host.address}/24", "dev", "eth0")
                _ip("-n", host.name, "link", "set", "eth0", "up")
                _ip("-n", net._bridge_ns, "link", "set", f"b{tag}{i}", "master", "br0")
                _ip("-n", net._bridge_ns, "link", "set", f"b{tag}{i}", "up")
                if rate_mbit:
                    net.shape(host, rate_mbit=rate_mbit)
        except Exception:
            net.destroy()
            raise
        return net

    def shape(self, host: Host, *, rate_mbit: float) -> None:
        """Cap what `host` sends (its uplink) at rate_mbit with a token bucket."""
        burst = max(32_000, int(rate_mbit * 1e6 / 8 / 250))  # ~4 ms of traffic: smooth but not starved
        subprocess.run(
            ["ip", "netns", "exec", host.name, "tc", "qdisc", "replace", "dev", "eth0", "root", "tbf",
             "rate", f"{rate_mbit}mbit", "burst", str(burst), "latency", "50ms"],
            check=True, capture_output=True, text=True,
        )

    def partition(self, hosts: list[Host]) -> None:
        """Cut `hosts` off from the others: their ports move to a second bridge, so that each side still
        reaches its own hosts and nothing crosses (packets vanish, as in a real partition)."""
        if _ip("-n", self._bridge_ns, "link", "show", "br1", check=False).returncode != 0:
            _ip("-n", self._bridge_ns, "link", "add", "br1", "type", "bridge")
            _ip("-n", self._bridge_ns, "link", "set", "br1", "up")
        for host in hosts:
            _ip("-n", self._bridge_ns, "link", "set", self._port(host), "master", "br1")

    def heal(self) -> None:
        """Undo `partition`: every host on one bridge again."""
        for host in self.hosts:
            _ip("-n", self._bridge_ns, "link", "set", self._port(host), "master", "br0")

    def _port(self, host: Host) -> str:
        return f"b{self._tag}{self.hosts.index(host)}"

    def destroy(self) -> None:
        for host in self.hosts:
            # Kill anything still running inside before the namespace goes.
            pids = subprocess.run(["ip", "netns", "pids", host.name], capture_output=True,
                                  text=True).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), 9)
            _ip("netns", "del", host.name, check=False)
        if self._bridge_ns:
            _ip("netns", "del", self._bridge_ns, check=False)
        self.hosts = []

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()
