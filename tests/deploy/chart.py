"""The Helm chart through Helm's own Go SDK (helm-python-sdk)."""

from __future__ import annotations

from typing import Any

import helm_python
import yaml

from tests.operator.manifests import ROOT

CHART = ROOT / "charts" / "kubellm"
RELEASE, NAMESPACE = "kubellm", "kubellm-system"


def render(values: dict[str, Any] | None = None) -> dict[str, str]:
    chart = helm_python.Chart.load(str(CHART))
    return chart.render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)


def rendered_objects(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    objects = []
    for path, text in render(values).items():
        if path.endswith(".yaml"):
            objects += [d for d in yaml.safe_load_all(text) if d]
    return objects
