"""`kubellm route` as a real process in front of real `kubellm serve` replicas on
127.0.0.1 (the built-in model), through the `openai` SDK and httpx: replies and streams
pass through, a tenant's requests stay on one replica, faults are survived, and a request
sent while no replica is up waits for one."""

from __future__ import annotations

import re
import signal
import threading
import time

import httpx
import openai
import pytest

from kubellm.operator.kube import collection_path, object_path
from tests.helpers import free_port, wait_for
from tests.operator.emulator import emulated_cluster, endpoint_slice
from tests.runtime.serve_process import ServeProcess

pytestmark = pytest.mark.slow
MODEL = "smol"
REPLICA_ARGS = (
    "--served-model-name",
    MODEL,
    "--max-model-len",
    "512",
    "--kv-cache-memory-gib",
    "0.05",
)
GREEDY = {"temperature": 0.0, "max_tokens": 12}
# Each replica on one thread: several share this machine's cores, where each would
# otherwise run a thread per core and their spinning OpenMP threads starve one another
# (a replica then made no token in 30 s while another decoded: not what pods, each
# with cores of its own, do).
ONE_CORE = {"OMP_NUM_THREADS": "1"}


def _replica(port: int | None = None) -> ServeProcess:
    return ServeProcess(*REPLICA_ARGS, port=port, env=ONE_CORE)


def _router(*urls: str, policy: str = "prefix", extra: tuple[str, ...] = ()) -> ServeProcess:
    replicas = [arg for url in urls for arg in ("--replica", url)]
    router = ServeProcess(*replicas, "--policy", policy, *extra, command="route")
    router.wait_healthy(30)
    return router


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _counts(router_url: str, family: str, label: str) -> dict[str, float]:
    text = httpx.get(router_url + "/metrics").text
    pattern = rf'^kubellm:router_{family}\{{{label}="([^"]+)"\}} (\S+)$'
    return {key: float(value) for key, value in re.findall(pattern, text, re.MULTILINE)}


def _wait_ready(router_url: str, count: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sum(_counts(router_url, "replica_ready", "replica").values()) == count:
            return
        time.sleep(0.2)
    raise AssertionError(f"the router never saw {count} ready replicas")


@pytest.fixture(scope="module")
def replicas():
    started = [_replica() for _ in range(3)]
    try:
        for replica in started:
            replica.wait_healthy()
        yield started
    finally:
        for replica in started:
            replica.__exit__()


def _chat(system: str, user: str) -> list[dict]:
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def test_replies_and_streams_pass_through_unchanged(replicas):
    with _router(*(r.url for r in replicas)) as router:
        _wait_ready(router.url, 3)
        messages = _chat("You are brief.", "What is the capital of France?")
        direct = _client(replicas[0].url).chat.completions.create(
            model=MODEL, messages=messages, **GREEDY
        )
        routed = _client(router.url).chat.completions.create(
            model=MODEL, messages=messages, **GREEDY
        )
        assert routed.choices[0].message.content == direct.choices[0].message.content
        chunks = list(
            _client(router.url).chat.completions.create(
                model=MODEL,
                messages=messages,
                stream=True,
                stream_options={"include_usage": True},
                **GREEDY,
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == direct.choices[0].message.content and len(chunks) > 3
        assert chunks[-1].usage.completion_tokens == direct.usage.completion_tokens
        models = _client(router.url).models.list()
        assert [m.id for m in models.data] == [MODEL]


def _endpoint_slice(name: str, service: str, url: str) -> dict:
    """The slice of a ready replica at `url` (127.0.0.1:<port>)."""
    return endpoint_slice(name, service, int(url.rsplit(":", 1)[1]))


def _ready(router_url: str) -> set[str]:
    return {url for url, up in _counts(router_url, "replica_ready", "replica").items() if up}


def test_discover_follows_the_services_endpoint_slices(replicas, tmp_path):
    """`--discover smol-replicas.ml`: the ready endpoints of the Service's slices, as the
    watch reports them (one replica per slice: each slice has one port). A slice added,
    an endpoint turning unready, a slice deleted each change whom requests reach, with no
    restart; other Services' slices are ignored."""
    first, second = replicas[0].url, replicas[1].url
    with emulated_cluster(tmp_path) as cluster:
        slices = collection_path("EndpointSlice", "ml")
        cluster.create(slices, _endpoint_slice("smol-a", "smol-replicas", first))
        cluster.create(slices, _endpoint_slice("other", "other-svc", replicas[2].url))
        env = {"KUBECONFIG": str(cluster.kubeconfig)}
        router = ServeProcess("--discover", "smol-replicas.ml", command="route", env=env)
        with router:
            router.wait_healthy(30)
            wait_for(lambda: _ready(router.url) == {first}, timeout=30, message="first")
            reply = _client(router.url).completions.create(model=MODEL, prompt="Hi", max_tokens=2)
            assert reply.choices[0].text is not None
            cluster.create(slices, _endpoint_slice("smol-b", "smol-replicas", second))
            wait_for(lambda: _ready(router.url) == {first, second}, timeout=30, message="both")
            a = object_path("EndpointSlice", "ml", "smol-a")
            cluster.patch(
                a, {"endpoints": [{"addresses": ["127.0.0.1"], "conditions": {"ready": False}}]}
            )
            wait_for(lambda: _ready(router.url) == {second}, timeout=30, message="unready")
            cluster.http.delete(object_path("EndpointSlice", "ml", "smol-b")).raise_for_status()
            wait_for(lambda: _ready(router.url) == set(), timeout=30, message="deleted")
            assert "discovering replicas from Service ml/smol-replicas" in router.output


def test_a_tenants_conversations_stay_on_one_replica(replicas):
    """Sequential requests (no load to spill for): every user of a tenant lands where
    the tenant's system prompt (longer than the hashed prefix) is cached."""
    with _router(*(r.url for r in replicas)) as router:
        _wait_ready(router.url, 3)
        client = _client(router.url)
        for tenant in range(3):
            before = _counts(router.url, "requests_total", "replica")
            system = f"You answer for shop number {tenant}. " + "Be kind and brief. " * 60
            for user in range(3):
                client.chat.completions.create(
                    model=MODEL, messages=_chat(system, f"User {user}: hello?"), **GREEDY
                )
            after = _counts(router.url, "requests_total", "replica")
            grew = {r: after[r] - before.get(r, 0) for r in after if after[r] != before.get(r)}
            assert list(grew.values()) == [3], grew
        assert _counts(router.url, "decisions_total", "reason") == {"prefix-hit": 9}


def test_bad_input_gets_the_4xx_a_replica_would_give(replicas):
    with _router(replicas[0].url) as router:
        _wait_ready(router.url, 1)
        for url in (router.url, replicas[0].url):
            bad = httpx.post(
                url + "/v1/chat/completions",
                content=b"{not json",
                headers={"Content-Type": "application/json"},
            )
            assert bad.status_code == 400 and "message" in bad.json()["error"], bad.text
        with pytest.raises(openai.NotFoundError) as unknown:
            _client(router.url).chat.completions.create(
                model="nope", messages=_chat("a", "b"), **GREEDY
            )
        assert unknown.value.body["param"] == "model"
        huge = httpx.post(router.url + "/v1/completions", content=b"x" * (33 * 2**20))
        assert huge.status_code == 413 and huge.json()["error"]["code"] == 413


def test_after_a_replica_is_killed_every_request_succeeds(replicas):
    """SIGKILL under load: the next requests all succeed (a refused connection is tried
    on the other replica), and the dead one is counted and left out."""
    spare = _replica()
    spare.wait_healthy()
    with _router(replicas[0].url, spare.url, policy="round-robin") as router:
        _wait_ready(router.url, 2)
        client = _client(router.url)
        spare.proc.send_signal(signal.SIGKILL)
        spare.proc.wait(10)
        results = [
            client.completions.create(model=MODEL, prompt=f"Count {i}:", max_tokens=4)
            for i in range(6)
        ]
        assert all(len(r.choices) == 1 for r in results)
        assert _counts(router.url, "replica_ready", "replica")[spare.url] == 0
        # a request sent to it was refused and counted, unless the health poll (every
        # 0.5 s) left it out before any request reached it
        sent = _counts(router.url, "requests_total", "replica").get(spare.url, 0)
        errors = _counts(router.url, "upstream_errors_total", "replica").get(spare.url, 0)
        assert errors >= 1 or sent == 0, (sent, errors)


def test_a_stream_cut_mid_way_ends_with_an_error_event_and_done(replicas):
    victim = _replica()
    victim.wait_healthy()
    with _router(victim.url) as router:
        _wait_ready(router.url, 1)
        body = {
            "model": MODEL,
            "prompt": "Once upon a time",
            "max_tokens": 400,
            "stream": True,
            "ignore_eos": True,
        }
        with httpx.stream("POST", router.url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data:"))
            victim.proc.send_signal(signal.SIGKILL)
            rest = [line for line in lines if line.startswith("data:")]
    assert '"text"' in first
    assert rest[-1] == "data: [DONE]" and '"error"' in rest[-2] and "broke" in rest[-2]


def test_sigterm_drains_a_replica_without_client_errors(replicas):
    draining = _replica()
    draining.wait_healthy()
    with _router(draining.url, replicas[1].url, policy="round-robin") as router:
        _wait_ready(router.url, 2)
        client = _client(router.url)
        results: list = []

        def ask(i: int) -> None:
            try:
                results.append(
                    client.completions.create(
                        model=MODEL,
                        prompt=f"Story {i}:",
                        max_tokens=40,
                        extra_body={"ignore_eos": True},
                    )
                )
            except openai.APIError as exc:
                results.append(exc)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for thread in threads[:2]:
            thread.start()
        time.sleep(1.0)
        draining.proc.send_signal(signal.SIGTERM)
        for thread in threads[2:]:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert draining.proc.wait(60) == 0
    assert len(results) == 4 and not [r for r in results if isinstance(r, Exception)], results
    draining.__exit__()


def test_a_request_sent_while_no_replica_is_up_waits_for_one():
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with _router(url, extra=("--queue-timeout", "300")) as router:
        result: dict = {}

        def ask() -> None:
            result["reply"] = _client(router.url).completions.create(
                model=MODEL, prompt="Hello", max_tokens=4
            )

        asker = threading.Thread(target=ask)
        asker.start()
        time.sleep(2)
        queue = httpx.get(router.url + "/metrics").text
        assert "kubellm:router_queue_length 1" in queue and "reply" not in result
        with _replica(port) as late:
            late.wait_healthy()
            asker.join(120)
        assert result["reply"].choices[0].text is not None


def test_no_replica_within_the_queue_timeout_is_a_503_with_retry_after():
    with _router(f"http://127.0.0.1:{free_port()}", extra=("--queue-timeout", "1")) as router:
        refused = httpx.post(
            router.url + "/v1/completions", json={"model": MODEL, "prompt": "x"}, timeout=30
        )
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "5"
        assert "no replica became ready within 1 s" in refused.json()["error"]["message"]
