"""Pure builders: from an LLMDeployment to the plain dicts of its children."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kubellm.operator.builders.cache import build_cache_claim
from kubellm.operator.builders.deployment import build_deployment, uses_cache_claim
from kubellm.operator.builders.disruption import build_disruption_budget
from kubellm.operator.builders.service import build_service
from kubellm.operator.defaults import with_defaults


@dataclass
class Children:
    """What should exist for one CR, and which kinds of child should not."""

    desired: list[dict[str, Any]] = field(default_factory=list)
    absent: list[str] = field(default_factory=list)  # kinds to delete if present


def build_children(cr: dict[str, Any], runtime_image: str) -> Children:
    spec = with_defaults(cr.get("spec"))
    children = Children()
    if uses_cache_claim(spec):
        children.desired.append(build_cache_claim(cr, spec))
    children.desired.append(build_deployment(cr, spec, runtime_image))
    children.desired.append(build_service(cr, spec))
    if spec["replicas"] > 1:
        children.desired.append(build_disruption_budget(cr))
    else:
        children.absent.append("PodDisruptionBudget")
    return children
