"""The operator's own REST client (`Kube`) against kmock's KubernetesEmulator."""

from __future__ import annotations

import asyncio

import kopf

from kubellm.operator.kube import Kube, collection_path

NS = "kube-client"


def test_a_401_logs_in_again_without_failing_the_requests_that_share_the_client(
    cluster, monkeypatch
):
    """Rotated tokens meet a few requests while many others share the client (as the
    operator's handlers do): each of those logs in again, and every request gets its
    answer (none meets a session closed under it)."""
    monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig))
    path = collection_path("Service", NS)

    async def requests_while_tokens_rotate() -> list[list]:
        kube = Kube.login(kopf.OperatorSettings())
        answers: list[list] = [[] for _ in range(32)]
        rotated = asyncio.Event()

        async def one_after_another(mine: list) -> None:
            while not rotated.is_set():
                mine.append(await kube.get(path))

        async def rotate() -> None:
            """One rotation at a time: the next once every client has had a new answer
            (so the request that met a rotation is done before the next one)."""
            for served in range(1, 6):
                await asyncio.sleep(0.03)
                cluster.emulator.inject("GET", path, 401, 1)
                while cluster.emulator.faults_served < served:
                    await asyncio.sleep(0.001)
                before = [len(mine) for mine in answers]
                while any(len(mine) == n for mine, n in zip(answers, before)):
                    await asyncio.sleep(0.001)
            rotated.set()

        try:
            await asyncio.gather(rotate(), *(one_after_another(mine) for mine in answers))
        finally:
            await kube.close()
        return answers

    answers = asyncio.run(requests_while_tokens_rotate())
    assert cluster.emulator.faults_served == 5
    assert all(len(mine) >= 3 for mine in answers)
    assert all(answer["kind"] == "ServiceList" for mine in answers for answer in mine)
