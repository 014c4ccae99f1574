"""The operator tests' emulated cluster: one per test module (a module that needs one per
test defines its own `cluster`)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.operator.emulator import Cluster, emulated_cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    with emulated_cluster(tmp_path_factory.mktemp("emulator")) as running:
        yield running
