"""The operator configures `kubellm serve` only through KUBELLM_* variables: every one it
sets must be a flag the runtime's parser knows, with a value it accepts."""

from __future__ import annotations

from kubellm.operator.builders import build_children
from kubellm.runtime.serve import parse_args
from tests.operator.manifests import custom_resource


def test_every_variable_the_operator_sets_is_understood_by_kubellm_serve():
    spec = {
        "model": {"source": "hf://org/m", "revision": "v2", "servedName": "m"},
        "engine": {
            "maxModelLen": 4096,
            "gpuMemoryUtilization": 0.8,
            "blockSize": 32,
            "maxNumSeqs": 8,
            "maxNumBatchedTokens": 1024,
            "enablePrefixCaching": False,
            "dtype": "bfloat16",
            "shutdownTimeoutSeconds": 45,
        },
    }
    deployment = next(
        o
        for o in build_children(custom_resource(**spec), "img", "router-img").desired
        if o["kind"] == "Deployment"
    )
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    ours = {k: v for k, v in env.items() if k.startswith("KUBELLM_")}
    args = parse_args([], ours)  # an unknown value would exit here
    flags = {f"KUBELLM_{name.upper()}" for name in vars(args)}
    assert set(ours) <= flags, set(ours) - flags
    assert (args.model, args.revision, args.served_model_name) == ("org/m", "v2", "m")
    assert (args.host, args.port) == ("0.0.0.0", 8000)
    assert (args.max_model_len, args.block_size, args.max_num_seqs) == (4096, 32, 8)
    assert args.max_num_batched_tokens == 1024 and args.enable_prefix_caching is False
    assert args.gpu_memory_utilization == 0.8 and args.dtype == "bfloat16"
    assert args.shutdown_timeout == 45 and args.tensor_parallel_size == 1


def test_the_crd_engine_defaults_are_the_runtime_defaults():
    from dataclasses import fields

    from kubellm.operator.builders.deployment import ENGINE_ENV
    from kubellm.operator.crd import ENGINE
    from kubellm.runtime.api.tool_parsers import AUTO_PARSERS
    from kubellm.runtime.config import DTYPES, QUANTIZATION_METHODS, EngineConfig

    runtime = parse_args([], {})
    for field, variable in ENGINE_ENV.items():
        flag = variable.removeprefix("KUBELLM_").lower()
        assert ENGINE["properties"][field].get("default") == getattr(runtime, flag), field
    assert ENGINE["properties"]["dtype"]["enum"] == ["auto", *DTYPES]
    assert ENGINE["properties"]["toolCallParser"]["enum"] == sorted(AUTO_PARSERS)
    assert ENGINE["properties"]["quantization"]["enum"] == ["none", *QUANTIZATION_METHODS]
    engine_flags = {f.name for f in fields(EngineConfig)}
    assert engine_flags <= set(vars(runtime))  # every engine setting is a flag, made once


def test_the_operator_passes_only_what_differs_from_the_default():
    deployment = next(
        o
        for o in build_children(custom_resource(engine={"maxNumSeqs": 8}), "img", "r").desired
        if o["kind"] == "Deployment"
    )
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    engine_env = {e["name"] for e in container["env"]} & {
        f"KUBELLM_{n}"
        for n in (
            "MAX_NUM_SEQS",
            "BLOCK_SIZE",
            "DTYPE",
            "MAX_NUM_BATCHED_TOKENS",
            "ENABLE_PREFIX_CACHING",
            "TENSOR_PARALLEL_SIZE",
            "GPU_MEMORY_UTILIZATION",
            "SHUTDOWN_TIMEOUT",
        )
    }
    assert engine_env == {"KUBELLM_MAX_NUM_SEQS"}


def test_a_tool_call_parser_reaches_the_runtime():
    deployment = next(
        o
        for o in build_children(
            custom_resource(engine={"toolCallParser": "hermes"}), "img", "r"
        ).desired
        if o["kind"] == "Deployment"
    )
    env = {
        e["name"]: e.get("value")
        for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    args = parse_args([], {k: v for k, v in env.items() if k.startswith("KUBELLM_")})
    assert args.tool_call_parser == "hermes"


def test_every_variable_the_operator_gives_the_router_is_understood_by_kubellm_route():
    from kubellm.router.main import parse_args as route_args

    secret = {"name": "a", "key": "k"}
    cr = custom_resource(routing={"policy": "least-load"}, apiKeySecretRef=secret)
    desired = build_children(cr, "img", "router-img").desired
    router = next(
        o for o in desired if o["metadata"]["name"] == "llama-router" and o["kind"] == "Deployment"
    )
    container = router["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["kubellm", "route"] and container["image"] == "router-img"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert set(env) == {
        "KUBELLM_DISCOVER",
        "KUBELLM_POLICY",
        "KUBELLM_HOST",
        "KUBELLM_PORT",
        "KUBELLM_API_KEY",
    }
    args = route_args([], {k: v for k, v in env.items() if v is not None})  # a bad value exits
    assert (args.discover, args.policy) == ("llama-replicas.ml", "least-load")
    assert (args.host, args.port) == ("0.0.0.0", 8000)
