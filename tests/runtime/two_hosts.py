"""Two hosts on this machine: two network namespaces, each with its own address, joined by
a veth pair. Processes start in one with `ip netns exec`; the test's own calls to a host
run on a thread that entered its namespace (sockets belong to their thread's namespace,
and threads started from it inherit it)."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

CLONE_NEWNET = 0x40000000


@dataclass
class Host:
    namespace: str
    address: str
    interface: str  # its end of the veth pair
    _thread: ThreadPoolExecutor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._thread = ThreadPoolExecutor(1, initializer=_enter, initargs=(self.namespace,))

    @property
    def prefix(self) -> tuple[str, ...]:
        """The command line prefix that runs a program on this host."""
        return ("ip", "netns", "exec", self.namespace)

    @contextmanager
    def cut(self) -> Iterator[None]:
        """This host off the network without a word (its link down), back afterwards."""
        link = ["ip", "-n", self.namespace, "link", "set", self.interface]
        subprocess.run([*link, "down"], check=True)
        try:
            yield
        finally:
            subprocess.run([*link, "up"], check=True)

    def call(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`function(*args, **kwargs)` from this host's network."""
        return self._thread.submit(function, *args, **kwargs).result()

    def close(self) -> None:
        self._thread.shutdown()


def _enter(namespace: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{namespace}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {namespace}")
    finally:
        os.close(fd)


def unavailable() -> str | None:
    """Why two hosts cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "needs `ip` (iproute2) for network namespaces"
    return None


@contextmanager
def two_hosts() -> Iterator[tuple[Host, Host]]:
    """Hosts A (10.213.x.1) and B (10.213.x.2), removed afterwards."""
    tag = os.getpid() % 250
    a, b = f"kubellm-a{os.getpid()}", f"kubellm-b{os.getpid()}"
    commands = [
        ["ip", "netns", "add", a],
        ["ip", "netns", "add", b],
        ["ip", "link", "add", f"kva{tag}", "type", "veth", "peer", "name", f"kvb{tag}"],
        ["ip", "link", "set", f"kva{tag}", "netns", a],
        ["ip", "link", "set", f"kvb{tag}", "netns", b],
        ["ip", "-n", a, "addr", "add", f"10.213.{tag}.1/24", "dev", f"kva{tag}"],
        ["ip", "-n", b, "addr", "add", f"10.213.{tag}.2/24", "dev", f"kvb{tag}"],
        ["ip", "-n", a, "link", "set", f"kva{tag}", "up"],
        ["ip", "-n", b, "link", "set", f"kvb{tag}", "up"],
        ["ip", "-n", a, "link", "set", "lo", "up"],
        ["ip", "-n", b, "link", "set", "lo", "up"],
    ]
    hosts: list[Host] = []
    try:
        for command in commands:
            subprocess.run(command, check=True, capture_output=True, text=True)
        hosts = [Host(a, f"10.213.{tag}.1", f"kva{tag}"), Host(b, f"10.213.{tag}.2", f"kvb{tag}")]
        yield hosts[0], hosts[1]
    finally:
        for host in hosts:
            host.close()
        for namespace in (a, b):  # deleting a namespace deletes its end of the veth pair
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
