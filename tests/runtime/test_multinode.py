"""One engine over two hosts (two network namespaces joined by a veth pair): node 0 serves
the API on host A, node 1 runs `--headless` on host B. It serves the single-process
tokens; losing either host is loud on the other; a node with other flags, a node that
never arrives and a leader that never answers each fail the start, saying so."""

from __future__ import annotations

import re
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import openai
import pytest

from kubellm.runtime import LLM, SamplingParams

from .pins import PINS
from .serve_process import ServeProcess, is_running, start_long_requests
from .two_hosts import two_hosts, unavailable

EXIT_BOUND_SECONDS = 30  # a lost host -> the other exits; measured: see docs/serving.md
PROMPTS = [[5, 6, 7], list(range(10, 60)), [100, 200, 300, 400], [9] * 20]


@pytest.fixture(scope="module")
def hosts():
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    with two_hosts() as pair:
        yield pair


@pytest.fixture(scope="module")
def tiny(tiny_model_dir) -> str:
    return str(tiny_model_dir("gqa4-untied"))


def node_args(model: str, nodes: int, rank: int, leader, *extra: str) -> tuple[str, ...]:
    args = (
        "--model",
        model,
        "--served-model-name",
        "tiny",
        "--kv-cache-memory-gib",
        "0.05",
        "--pipeline-parallel-size",
        "2",
        "--nnodes",
        str(nodes),
        "--node-rank",
        str(rank),
        "--master-addr",
        leader.address,
        "--master-port",
        "29577",
        "--log-level",
        "info",
        *extra,
    )
    return args + (("--headless",) if rank else ("--host", leader.address))


@contextmanager
def serving_pair(model: str, host_a, host_b, *extra: str) -> Iterator[tuple]:
    """Node 0 healthy on host A, node 1 on host B; afterwards, no rank of node 1 left."""
    leader = ServeProcess(
        *node_args(model, 2, 0, host_a, *extra), prefix=host_a.prefix, host=host_a.address
    )
    follower = ServeProcess(*node_args(model, 2, 1, host_a, *extra), prefix=host_b.prefix)
    with leader, follower:
        host_a.call(leader.wait_healthy)
        remote = rank_pids(follower, r"node 1 of 2: ranks \d+\.\.\d+, pids ")
        yield leader, follower
    assert not any(is_running(pid) for pid in remote), "a rank outlived its node"


def rank_pids(process: ServeProcess, pattern: str) -> list[int]:
    match = re.search(pattern + r"([\d ]+)", process.output)
    assert match, process.output
    return [int(pid) for pid in match.group(1).split()]


def wait_exit(process: ServeProcess, timeout: float = EXIT_BOUND_SECONDS) -> tuple[int, float]:
    """The exit code and how long it took."""
    started = time.monotonic()
    code = process.proc.wait(timeout)
    return code, time.monotonic() - started


def test_two_hosts_serve_the_single_process_tokens(hosts, tiny):
    host_a, host_b = hosts
    greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    single = LLM(model=tiny, kv_cache_memory_gib=0.05, **PINS)
    expected = [o.outputs[0].text for o in single.generate(PROMPTS, greedy)]
    with serving_pair(tiny, host_a, host_b, "--tensor-parallel-size", "2") as (leader, follower):
        assert "over 2 nodes; the others: node 1 (ranks 2..3)" in leader.output

        def ask() -> list[str]:
            client = openai.OpenAI(base_url=leader.url + "/v1", api_key="unused")
            return [
                client.completions.create(
                    model="tiny",
                    prompt=p,
                    temperature=0,
                    max_tokens=16,
                    extra_body={"ignore_eos": True},
                )
                .choices[0]
                .text
                for p in PROMPTS
            ]

        assert host_a.call(ask) == expected
        leader.proc.send_signal(signal.SIGTERM)  # an orderly stop stops node 1 too, with 0
        assert wait_exit(leader)[0] == 0, leader.output
        assert wait_exit(follower)[0] == 0, follower.output


def test_losing_the_headless_host_fails_requests_health_and_node_0(hosts, tiny):
    host_a, host_b = hosts
    with serving_pair(tiny, host_a, host_b) as (leader, follower):
        results: dict = {}
        streaming = threading.Event()

        def fault() -> tuple[int, int, float]:
            client = openai.OpenAI(base_url=leader.url + "/v1", api_key="unused", max_retries=0)
            readers = start_long_requests(client, results, streaming)
            assert streaming.wait(60)
            follower.proc.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            health = _health_after(leader.url, killed)
            for reader in readers:
                reader.join(60)
            return health, leader.proc.wait(EXIT_BOUND_SECONDS), time.monotonic() - killed

        health, code, seconds = host_a.call(fault)
        assert health == 503, leader.output
        assert isinstance(results.get("plain"), openai.APIError), results
        assert isinstance(results.get("stream"), openai.APIError), results
        assert code != 0, leader.output
        assert "the engine is dead: node 1 (ranks 1..1) is gone" in leader.output
        print(f"node 0 exited {seconds:.1f} s after host B's process was killed")


def _health_after(url: str, since: float) -> int:
    """/health once the failure shows (503), or whatever it last said; None if node 0 is
    already gone."""
    status = None
    while time.monotonic() - since < EXIT_BOUND_SECONDS:
        try:
            status = httpx.get(url + "/health").status_code
        except httpx.TransportError:
            return status
        if status == 503:
            return status
        time.sleep(0.05)
    return status


def test_losing_node_0_stops_the_headless_host(hosts, tiny):
    host_a, host_b = hosts
    with serving_pair(tiny, host_a, host_b) as (leader, follower):
        leader.proc.send_signal(signal.SIGKILL)
        code, seconds = wait_exit(follower)
        assert code == 1, follower.output
        assert "node 0 is gone" in follower.output
        print(f"node 1 exited {seconds:.1f} s after node 0 was killed")


def test_a_cut_network_stops_both_hosts(hosts, tiny):
    """No FIN, no RST: each side notices by TCP keepalive."""
    host_a, host_b = hosts
    with serving_pair(tiny, host_a, host_b) as (leader, follower):
        with host_b.cut():
            follower_code, follower_seconds = wait_exit(follower)
            leader_code, leader_seconds = wait_exit(leader)
        assert follower_code == 1 and "node 0 is gone" in follower.output, follower.output
        assert leader_code == 1, leader.output
        assert "the engine is dead: node 1 (ranks 1..1) is gone" in leader.output
        print(
            f"after the cut: node 1 exited in {follower_seconds:.1f} s, "
            f"node 0 {leader_seconds:.1f} s later"
        )


def test_a_node_with_other_flags_is_refused_on_both(hosts, tiny):
    host_a, host_b = hosts
    leader = ServeProcess(*node_args(tiny, 2, 0, host_a), prefix=host_a.prefix, host=host_a.address)
    follower = ServeProcess(
        *node_args(tiny, 2, 1, host_a, "--max-model-len", "256"), prefix=host_b.prefix
    )
    with leader, follower:
        assert wait_exit(follower, 120)[0] == 2, follower.output
        assert wait_exit(leader, 120)[0] == 1, leader.output
    for output in (leader.output, follower.output):
        assert "--max-model-len is 256 on node 1 but None on node 0" in output


def test_a_node_that_never_arrives_fails_the_start(tiny):
    leader = ServeProcess(
        *node_args(tiny, 2, 0, _Loopback(), "--distributed-timeout", "3"), host="127.0.0.1"
    )
    with leader:
        assert wait_exit(leader, 120)[0] == 1, leader.output
    assert "node 1 (ranks 1..1) did not join within 3 s (distributed_timeout)" in leader.output


def test_a_leader_that_never_answers_fails_the_headless_start(tiny):
    follower = ServeProcess(*node_args(tiny, 2, 1, _Loopback(), "--distributed-timeout", "2"))
    with follower:
        assert wait_exit(follower, 120)[0] == 1, follower.output
    assert "did not answer within 2 s (distributed_timeout)" in follower.output


class _Loopback:
    address = "127.0.0.1"


def test_node_0_takes_only_a_connection_that_names_an_awaited_node():
    """A stray connection (garbage, or a node rank not awaited) is dropped, and node 0
    goes on waiting for the real one; a node that connected and then left fails the
    start."""
    import socket
    from multiprocessing.connection import Connection

    from kubellm.runtime.config import EngineConfig
    from kubellm.runtime.executor.distributed import open_store
    from kubellm.runtime.executor.nodes import PLANS_KEY, Meeting

    config = EngineConfig(pipeline_parallel_size=2, nnodes=2)
    store = open_store(2)
    links: dict = {}
    meeting = Meeting(config, store, "torch.float32", links)
    port = int(store.get(PLANS_KEY))
    try:
        for greeting in (b"not a number", b"7", b"1"):
            client = Connection(socket.create_connection(("127.0.0.1", port)).detach())
            client.send_bytes(greeting)
            for _ in range(50):
                meeting.poll()
            assert list(links) == ([1] if greeting == b"1" else []), greeting
        assert meeting.missing == []
        client.close()  # node 1 gone before the group is complete: node 0 fails at once
        with pytest.raises(RuntimeError, match=r"node 1 \(ranks 1\.\.1\) left before"):
            meeting.poll()
    finally:
        meeting.close()
