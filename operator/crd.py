"""The LLMDeployment CustomResourceDefinition, written once, here.

`crds/llmdeployment.yaml` (and the chart's copy) is this module's output:
`python -m kubellm.operator.crd > crds/llmdeployment.yaml`; a test keeps them equal.
The operator applies the same schema's defaults itself (`defaults.py`), so what it
builds never depends on whether the API server defaulted an object.
"""

from __future__ import annotations

import sys
from typing import Any

import yaml

GROUP = "kubellm.dev"
VERSION = "v1alpha1"
KIND = "LLMDeployment"
PLURAL = "llmdeployments"

Schema = dict[str, Any]


def _obj(description: str, properties: dict[str, Schema], **extra: Any) -> Schema:
    """An object whose absent value defaults to {} so its own defaults apply."""
    return {
        "type": "object",
        "description": description,
        "default": {},
        "properties": properties,
        **extra,
    }


def _str(description: str, default: str | None = None, **extra: Any) -> Schema:
    schema: Schema = {"type": "string", "description": description, **extra}
    if default is not None:
        schema["default"] = default
    return schema


def _int(description: str, default: int | None = None, **extra: Any) -> Schema:
    schema: Schema = {"type": "integer", "description": description, **extra}
    if default is not None:
        schema["default"] = default
    return schema


def _bool(description: str, default: bool) -> Schema:
    return {"type": "boolean", "description": description, "default": default}


def _int_or_string(description: str) -> Schema:
    return {"x-kubernetes-int-or-string": True, "description": description, "nullable": True}


def _secret_ref(description: str) -> Schema:
    return {
        "type": "object",
        "description": description,
        "nullable": True,
        "required": ["name", "key"],
        "properties": {
            "name": _str("Secret name (same namespace)", minLength=1),
            "key": _str("Key inside the Secret", minLength=1),
        },
    }


def _free_list(description: str) -> Schema:
    return {
        "type": "array",
        "description": description,
        "default": [],
        "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
    }


QUANTITY = r"^([0-9]+(\.[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$"
SOURCE = r"^(hf://[^/\s]+/[^/\s]+|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/\S*)?|builtin://[a-z0-9][-a-z0-9.]*)$"

MODEL = _obj(
    "Which model to serve and where it comes from",
    {
        "source": _str(
            "hf://<org>/<name> (downloaded once into the cache PVC), "
            "pvc://<claim>/<path> (already on a PersistentVolumeClaim), or "
            "builtin://smollm2-135m-instruct (ships in the runtime image; no GPU needed)",
            "builtin://smollm2-135m-instruct",
            pattern=SOURCE,
        ),
        "revision": _str("Hugging Face revision (hf:// only); default main", nullable=True),
        "servedName": _str(
            "The name clients send as `model`; default metadata.name", nullable=True
        ),
        "hfTokenSecretRef": _secret_ref("Secret key holding HF_TOKEN for gated models"),
    },
    **{
        "x-kubernetes-validations": [
            {
                "rule": "!has(self.revision) || self.source.startsWith('hf://')",
                "message": "revision applies to hf:// sources only",
            },
            {
                "rule": "!has(self.hfTokenSecretRef) || self.source.startsWith('hf://')",
                "message": "hfTokenSecretRef applies to hf:// sources only (nothing is downloaded)",
            },
        ]
    },
)

ENGINE = _obj(
    "Runtime settings; each one set to other than its default (the runtime's own) "
    "becomes a KUBELLM_* variable of `kubellm serve`",
    {
        "maxModelLen": _int("Context length; default the model's own", nullable=True, minimum=2),
        "gpuMemoryUtilization": {
            "type": "number",
            "description": "Share of GPU memory for weights and KV cache",
            "default": 0.9,
            "exclusiveMinimum": True,
            "minimum": 0,
            "maximum": 1,
        },
        "blockSize": _int("Tokens per KV-cache block", 16, minimum=1, maximum=256),
        "maxNumSeqs": _int("Most requests in one batch", 256, minimum=1),
        "maxNumBatchedTokens": _int("Token budget of one step", 2048, minimum=1),
        "enablePrefixCaching": _bool("Reuse KV blocks of shared prompt prefixes", True),
        "tensorParallelSize": _int(
            "GPUs each pipeline stage of one replica spreads its layers over", 1, minimum=1
        ),
        "pipelineParallelSize": _int(
            "Stages one replica splits the model's layers into (each tensorParallelSize GPUs)",
            1,
            minimum=1,
        ),
        "dtype": _str(
            "Weights and activations", "auto", enum=["auto", "float32", "float16", "bfloat16"]
        ),
        "quantization": _str(
            "How quantized weights are read; unset: the checkpoint's own (GPTQ, AWQ, GGUF "
            "4-bit kept packed); none: dequantized at load",
            nullable=True,
            enum=["none", "gptq", "awq", "gguf"],
        ),
        "toolCallParser": _str(
            'The model\'s tool-call format, read for tool_choice "auto" (hermes: Qwen2.5, '
            "Hermes, and models whose template knows no tools); unset: inferred from the "
            "model's chat template at load",
            nullable=True,
            enum=["hermes", "llama3_json", "mistral"],
        ),
        "shutdownTimeoutSeconds": _int(
            "On pod termination, how long in-flight requests get to finish", 30, minimum=0
        ),
        "extraArgs": {
            "type": "array",
            "description": "Extra `kubellm serve` arguments",
            "default": [],
            "items": {"type": "string"},
        },
    },
)

RESOURCES = _obj(
    "Compute for each replica",
    {
        "gpus": _int("GPUs per pod; 0 runs on CPU", 1, minimum=0),
        "gpuResourceName": _str("Extended resource name of the GPUs", "nvidia.com/gpu"),
        "cpu": _str(
            "CPU request and limit, e.g. '4'", nullable=True, pattern=r"^[0-9]+(\.[0-9]+|m)?$"
        ),
        "memory": _str("Memory request and limit, e.g. '32Gi'", nullable=True, pattern=QUANTITY),
    },
)

CACHE = _obj(
    "The model cache PVC, mounted at HF_HOME (ignored for builtin:// and pvc://)",
    {
        "enabled": _bool("Create the cache PVC", True),
        "size": _str(
            "Cache PVC size; raising it grows an existing claim where its StorageClass "
            "allows volume expansion (a claim never shrinks)",
            "50Gi",
            pattern=QUANTITY,
        ),
        "storageClassName": _str("StorageClass; default the cluster's", nullable=True),
        "accessMode": _str(
            "ReadWriteMany shares one cache across nodes; with ReadWriteOnce the replicas "
            "must share one node",
            "ReadWriteOnce",
            enum=["ReadWriteOnce", "ReadWriteMany", "ReadWriteOncePod"],
        ),
    },
)

ROUTING_POLICIES = ["prefix", "least-load", "round-robin", "none"]
ROUTING = _obj(
    "How requests reach the replicas",
    {
        "policy": _str(
            "prefix: a router (`kubellm route`) keeps requests that share a prompt prefix "
            "on the replica whose cache holds it, within bounded loads; least-load; "
            "round-robin; none: the Service selects the replicas directly",
            "prefix",
            enum=ROUTING_POLICIES,
        ),
        "image": _str("The router's image; default the operator's own", nullable=True),
        "inferencePool": _bool(
            "Also emit a Gateway API InferencePool (inference.networking.k8s.io/v1) "
            "selecting the replicas, for a gateway with an endpoint picker",
            False,
        ),
        "endpointPicker": _obj(
            "The InferencePool's endpoint picker, which you deploy (e.g. with the "
            "Inference Extension's chart)",
            {
                "name": _str("Its Service; default <name>-epp", nullable=True),
                "port": _int("Its port", 9002, minimum=1, maximum=65535),
                "failureMode": _str(
                    "What the gateway does while the picker does not answer",
                    "FailClose",
                    enum=["FailClose", "FailOpen"],
                ),
            },
        ),
    },
)

AUTOSCALING = {
    "type": "object",
    "description": "Replicas sized by load, down to zero: the operator owns spec.replicas "
    "(through the scale subresource) while this is set",
    "required": ["maxReplicas"],
    "properties": {
        "minReplicas": _int(
            "Fewest replicas; 0 lets an idle deployment scale to zero (its router holds the "
            "first request while a replica starts)",
            1,
            minimum=0,
        ),
        "maxReplicas": _int("Most replicas", minimum=1),
        "targetRequests": _int(
            "In-flight plus waiting requests per replica the autoscaler aims for", 100, minimum=1
        ),
        "scaleDownDelaySeconds": _int(
            "How long the load must stay lower before replicas are removed", 300, minimum=0
        ),
    },
    "x-kubernetes-validations": [
        {
            "rule": "self.minReplicas <= self.maxReplicas",
            "message": "autoscaling.minReplicas cannot exceed autoscaling.maxReplicas",
        }
    ],
}

SPEC = _obj(
    "The desired state of an LLM deployment",
    {
        "model": MODEL,
        "replicas": _int("Pods serving the model", 1, minimum=0),
        "image": _str("Runtime image; default the operator's configured one", nullable=True),
        "engine": ENGINE,
        "resources": RESOURCES,
        "cache": CACHE,
        "shm": _obj(
            "The /dev/shm memory volume",
            {
                "sizeLimit": _str(
                    "Size of /dev/shm; default 1Gi, or 8Gi per GPU with tensor parallelism "
                    "(it counts against the pod's memory)",
                    nullable=True,
                    pattern=QUANTITY,
                )
            },
        ),
        "probes": _obj(
            "Health probes",
            {
                "startupTimeoutSeconds": _int(
                    "How long a pod may take to download and load the model before it is restarted",
                    1800,
                    minimum=10,
                )
            },
        ),
        "service": _obj(
            "The Service in front of the pods",
            {
                "type": _str(
                    "Service type", "ClusterIP", enum=["ClusterIP", "NodePort", "LoadBalancer"]
                ),
                "port": _int("Service port (to the pods' 8000)", 80, minimum=1, maximum=65535),
            },
        ),
        "routing": ROUTING,
        "autoscaling": AUTOSCALING,
        "apiKeySecretRef": _secret_ref("Secret key holding the API key clients must send"),
        "rollout": _obj(
            "Rolling update; default GPU-safe (maxSurge 0) when GPUs are requested",
            {
                "maxSurge": _int_or_string("Extra pods during a rollout"),
                "maxUnavailable": _int_or_string("Pods that may be down during a rollout"),
            },
        ),
        "env": _free_list("Extra container environment variables (EnvVar objects)"),
        "nodeSelector": {
            "type": "object",
            "description": "Node labels the pods must match",
            "default": {},
            "additionalProperties": {"type": "string"},
        },
        "tolerations": _free_list("Pod tolerations (e.g. for GPU node taints)"),
        "affinity": {
            "type": "object",
            "description": "Pod affinity rules",
            "nullable": True,
            "x-kubernetes-preserve-unknown-fields": True,
        },
    },
    **{
        "x-kubernetes-validations": [
            {
                "rule": "self.resources.gpus == 0 || self.engine.tensorParallelSize * "
                "self.engine.pipelineParallelSize <= self.resources.gpus || "
                "(self.engine.tensorParallelSize * self.engine.pipelineParallelSize) % "
                "self.resources.gpus == 0",
                "message": "engine.tensorParallelSize x engine.pipelineParallelSize (one "
                "replica's ranks, one GPU each) must fit in resources.gpus (one pod) or be "
                "a multiple of it (a replica of several pods, a LeaderWorkerSet group)",
            },
            {
                "rule": "self.resources.gpus > 0 || (self.engine.tensorParallelSize == 1 && "
                "self.engine.pipelineParallelSize == 1)",
                "message": "tensor and pipeline parallelism need GPUs (resources.gpus)",
            },
            {
                "rule": "!has(self.autoscaling) || self.autoscaling.minReplicas > 0 || "
                "self.routing.policy != 'none'",
                "message": "autoscaling.minReplicas 0 needs a router to hold requests while no "
                "replica runs: set routing.policy to prefix (or another policy), or "
                "autoscaling.minReplicas to 1 or more",
            },
        ]
    },
)

CONDITION = {
    "type": "object",
    "required": ["type", "status"],
    "properties": {
        "type": {"type": "string"},
        "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
        "reason": {"type": "string"},
        "message": {"type": "string"},
        "lastTransitionTime": {"type": "string", "format": "date-time"},
    },
}

STATUS = {
    "type": "object",
    "description": "What the operator observed",
    "properties": {
        "replicas": {"type": "integer"},
        "readyReplicas": {"type": "integer"},
        "selector": {"type": "string"},
        "endpoint": {"type": "string"},
        "observedGeneration": {"type": "integer"},
        "router": {
            "type": "object",
            "description": "The router in front of the replicas (routing.policy other than none)",
            "properties": {
                "policy": {"type": "string"},
                "replicas": {"type": "integer"},
                "readyReplicas": {"type": "integer"},
            },
        },
        "autoscaling": {
            "type": "object",
            "description": "The autoscaler's last evaluation (spec.autoscaling set)",
            "properties": {
                "load": {
                    "type": "integer",
                    "description": "In-flight plus waiting requests; absent when not read",
                },
                "heldRequests": {
                    "type": "integer",
                    "description": "Requests the routers hold for want of a ready replica",
                },
                "desiredReplicas": {"type": "integer"},
                "reason": {"type": "string"},
                "lastScaleTime": {"type": "string", "format": "date-time"},
                "window": {
                    "type": "array",
                    "description": "Recommendations within scaleDownDelaySeconds (time in "
                    "seconds since the epoch): the delay survives an operator restart",
                    "items": {
                        "type": "object",
                        "properties": {
                            "time": {"type": "number"},
                            "replicas": {"type": "integer"},
                        },
                    },
                },
            },
        },
        "conditions": {
            "type": "array",
            "items": CONDITION,
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
        },
    },
}


def _printer_columns() -> list[dict[str, Any]]:
    def column(name: str, path: str, kind: str = "string", **extra: Any) -> dict[str, Any]:
        return {"name": name, "type": kind, "jsonPath": path, **extra}

    return [
        column("Model", ".spec.model.source"),
        column("Ready", ".status.readyReplicas", "integer"),
        column("Desired", ".spec.replicas", "integer"),
        column("Load", ".status.autoscaling.load", "integer"),
        column("Status", '.status.conditions[?(@.type=="Ready")].reason'),
        column("Endpoint", ".status.endpoint", priority=1),
        column("Age", ".metadata.creationTimestamp", "date"),
    ]


def crd() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": "llmdeployment",
                "shortNames": ["llmd"],
                "categories": ["all", "kubellm"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "An LLM served over the OpenAI API by kubellm",
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": SPEC,
                                "status": STATUS,
                            },
                        }
                    },
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.replicas",
                            "statusReplicasPath": ".status.replicas",
                            "labelSelectorPath": ".status.selector",
                        },
                    },
                    "additionalPrinterColumns": _printer_columns(),
                }
            ],
        },
    }


def render() -> str:
    header = "# Generated by `python -m kubellm.operator.crd`; edit operator/crd.py instead.\n"
    return header + yaml.safe_dump(crd(), sort_keys=False, width=100)


if __name__ == "__main__":
    sys.stdout.write(render())
