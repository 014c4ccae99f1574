"""One engine over several machines (`nnodes` > 1), launched as vLLM's are: node 0 runs
`kubellm serve --node-rank 0`, rank 0 (the scheduler and the API) and the first share of
the ranks; node R runs `kubellm serve --node-rank R --headless`, whose process is only the
supervisor of its own share, `ranks_per_node` ranks on its own GPUs (`headless.py`).

Meeting: node 0 opens the group's TCPStore on --master-port and writes into it its settings
and the port of its plan listener. A headless node checks its settings against node 0's
(a difference is refused on both nodes, naming it), connects to the plan listener, starts
its ranks (which join the `torch.distributed` group through the store) and then relays
every plan from that one connection to its ranks' pipes: one TCP send per node and step,
local pipes beyond it (`benchmarks/pipeline.py` measures both).

Loss is loud everywhere: node 0 watches each node's connection as it watches its local
workers' processes (a closed connection is a lost node: the engine fails). A headless node
exits non-zero when node 0's connection closes (at once when node 0's process dies; within
`KEEPALIVE_SECONDS` when its machine is gone) or when one of its ranks dies, and its ranks
never outlive it (each watches its parent). A node that never arrives fails the start
after --distributed-timeout seconds.
"""

from __future__ import annotations

import fcntl
import json
import pickle
import socket
import struct
import time
from dataclasses import asdict
from multiprocessing.connection import Connection

from kubellm.runtime.config import EngineConfig
from kubellm.runtime.executor.distributed import connect_store

SETTINGS_KEY = "kubellm/settings"
PLANS_KEY = "kubellm/plans"
STOP = "stop"
STOP_MESSAGE = pickle.dumps((STOP, ()))
# Settings each node may set for itself; every other one must be node 0's.
NODE_LOCAL = frozenset({"node_rank", "download_dir", "master_addr", "distributed_timeout"})
# A node whose peer's machine vanished (no FIN, no RST) notices within about this long.
KEEPALIVE_SECONDS = 10
HANDSHAKE_SECONDS = 10  # a new connection names its node within this long


def refused_key(node: int) -> str:
    return f"kubellm/refused/{node}"


def shared_settings(config: EngineConfig) -> dict[str, object]:
    return {k: v for k, v in asdict(config).items() if k not in NODE_LOCAL}


def differences(node: int, ours: dict[str, object], leaders: dict[str, object]) -> list[str]:
    """Each setting where node `node`'s value is not node 0's, as a flag and both values."""
    return [
        f"--{name.replace('_', '-')} is {ours.get(name)!r} on node {node} but "
        f"{leaders.get(name)!r} on node 0"
        for name in sorted(set(ours) | set(leaders))
        if ours.get(name) != leaders.get(name)
    ]


def keep_alive(sock: socket.socket) -> None:
    """Notice a peer whose machine is gone within about KEEPALIVE_SECONDS, idle or not."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_SECONDS // 2)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_SECONDS // 2)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, KEEPALIVE_SECONDS * 1000)


def interface_towards(address: str, timeout: float) -> str:
    """The network interface this machine reaches `address` through: gloo must listen
    there (by default it takes the hostname's address, often a loopback one). A name
    that does not resolve yet (a Service's DNS record still on its way) is retried for
    up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return _interface_towards(address)
        except socket.gaierror:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def _interface_towards(address: str) -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((address, 9))  # chooses a route; sends nothing
        local = probe.getsockname()[0]
        for _, name in socket.if_nameindex():
            request = struct.pack("256s", name.encode()[:15])
            try:
                reply = fcntl.ioctl(probe.fileno(), 0x8915, request)  # SIOCGIFADDR
            except OSError:  # no IPv4 address
                continue
            if socket.inet_ntoa(reply[20:24]) == local:
                return name
    raise RuntimeError(f"no network interface holds {local}, the address towards {address}")


def nodes_named(nodes: list[int], config: EngineConfig) -> str:
    return ", ".join(
        f"node {n} (ranks {config.ranks_of_node(n)[0]}..{config.ranks_of_node(n)[-1]})"
        for n in nodes
    )


class Meeting:
    """Node 0's side of the meeting: its settings and plan port in the store, then each
    other node's connection as it arrives (or its refusal)."""

    def __init__(
        self, config: EngineConfig, store, dtype: str, links: dict[int, Connection]
    ) -> None:
        """`links`: filled with each node's connection, by node rank."""
        self.config, self.store, self.links = config, store, links
        self.listener = socket.create_server(("", 0))
        self.listener.settimeout(0.05)
        settings = {"settings": shared_settings(config), "dtype": dtype}
        store.set(SETTINGS_KEY, json.dumps(settings))
        store.set(PLANS_KEY, str(self.listener.getsockname()[1]))

    @property
    def missing(self) -> list[int]:
        return [n for n in range(1, self.config.nnodes) if n not in self.links]

    def poll(self) -> None:
        """Take a connection that is waiting; raise RuntimeError if a node refused, or
        left (its supervisor says nothing after its greeting: readable means closed)."""
        for node in self.missing:
            if self.store.check([refused_key(node)]):
                raise RuntimeError(self.store.get(refused_key(node)).decode())
        gone = [node for node, link in self.links.items() if link.poll(0)]
        if gone:
            raise RuntimeError(
                f"{nodes_named(gone, self.config)} left before the group was complete "
                f"(see that node's log)"
            )
        try:
            sock, _ = self.listener.accept()
        except TimeoutError:
            return
        sock.setblocking(True)
        keep_alive(sock)
        link = Connection(sock.detach())
        node = _greeting(link)
        if node in self.missing:
            self.links[node] = link
        else:  # not one of the nodes still awaited (a stray connection): not ours
            link.close()

    def close(self) -> None:
        self.listener.close()


def _greeting(link: Connection) -> int | None:
    """The node rank a new connection names first (digits: nothing is unpickled), or None
    when it says nothing sensible within HANDSHAKE_SECONDS."""
    try:
        if link.poll(HANDSHAKE_SECONDS):
            return int(link.recv_bytes(16))
    except (OSError, EOFError, ValueError):
        pass
    return None


class Leader:
    """A headless node's view of node 0: its settings and its connection."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        address = f"{config.master_addr}:{config.master_port}"
        self.store = connect_store(
            config.master_addr, config.master_port, config.world_size, config.distributed_timeout
        )
        published = json.loads(self.store.get(SETTINGS_KEY))
        problems = differences(config.node_rank, shared_settings(config), published["settings"])
        if problems:
            message = (
                f"node {config.node_rank} was started with other flags than node 0 at "
                f"{address}: {'; '.join(problems)}: start every node with the same flags"
            )
            self.store.set(refused_key(config.node_rank), message)
            raise ValueError(message)
        self.dtype = published["dtype"].removeprefix("torch.")
        sock = socket.create_connection(
            (config.master_addr, int(self.store.get(PLANS_KEY))), config.distributed_timeout
        )
        keep_alive(sock)
        sock.settimeout(None)
        self.link = Connection(sock.detach())
        self.link.send_bytes(str(config.node_rank).encode())
