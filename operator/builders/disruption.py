"""A PodDisruptionBudget (replicas > 1): node drains take one replica down at a time."""

from __future__ import annotations

from typing import Any

from kubellm.operator.naming import child_metadata, selector_labels


def build_disruption_budget(cr: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": child_metadata(cr),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": selector_labels(cr["metadata"]["name"])},
        },
    }
