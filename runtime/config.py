"""Configuration: the model's architecture and the engine's knobs."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

BUILTIN_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of a Llama-family decoder (Llama 2/3, Mistral, SmolLM, Qwen2)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face `config.json` dictionary."""
        num_heads = cfg["num_attention_heads"]
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=_rope_theta(cfg),
            rope_scaling=_rope_scaling(cfg),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=cfg.get("attention_bias", cfg.get("model_type") == "qwen2"),
            eos_token_ids=eos_ids,
        )

    def tensor_parallel_sizes(self) -> list[int]:
        """The TP sizes this model can be split into: heads, KV heads (or their replicas),
        MLP columns and vocabulary divide evenly."""
        return [size for size in range(1, self.num_heads + 1) if not self._indivisible(size)]

    def check_tensor_parallel(self, size: int) -> None:
        """Raise ValueError, naming the numbers, unless the model splits over `size` ranks."""
        problems = self._indivisible(size)
        if problems:
            sizes = ", ".join(map(str, self.tensor_parallel_sizes()))
            raise ValueError(
                f"tensor_parallel_size {size} does not divide this model's {'; '.join(problems)}: "
                f"choose one of {sizes}"
            )

    def check_pipeline_parallel(self, stages: int) -> None:
        """Raise ValueError, naming the numbers, unless every stage gets a layer."""
        if stages > self.num_layers:
            raise ValueError(
                f"pipeline_parallel_size {stages} is more than this model's "
                f"{self.num_layers} layers: choose at most {self.num_layers}"
            )

    def _indivisible(self, size: int) -> list[str]:
        problems = []
        if self.num_heads % size:
            problems.append(f"{self.num_heads} attention heads")
        if self.num_kv_heads % size and size % self.num_kv_heads:
            problems.append(f"{self.num_kv_heads} KV heads (nor does {size} divide by them)")
        if self.intermediate_size % size:
            problems.append(f"intermediate size {self.intermediate_size}")
        if self.vocab_size % size:
            problems.append(f"vocabulary of {self.vocab_size}")
        return problems


def _rope_theta(cfg: dict[str, Any]) -> float:
    params = cfg.get("rope_parameters") or {}
    return float(cfg.get("rope_theta") or params.get("rope_theta") or 10000.0)


def _rope_scaling(cfg: dict[str, Any]) -> dict[str, Any] | None:
    """Only scaling types that change the frequencies are kept ('default' is none)."""
    scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    if not scaling:
        return None
    kind = scaling.get("rope_type") or scaling.get("type")
    return None if kind in (None, "default") else dict(scaling, rope_type=kind)


DTYPES = ("float32", "float16", "bfloat16")
QUANTIZATION_METHODS = ("gptq", "awq", "gguf")  # vLLM's names
ATTENTION_BACKENDS = ("torch", "triton", "cpu")
DEVICES = ("cpu", "cuda")


def setting(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """An EngineConfig field: its default, help and choices live here once; `kubellm
    serve` and `kubellm generate` make their flags (and KUBELLM_* variables) from them."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class EngineConfig:
    """The engine's knobs, named after vLLM's where they mean the same."""

    model: str = setting(
        BUILTIN_MODEL, "the built-in model, a .gguf file, an HF directory or a hub id (org/name)"
    )
    revision: str | None = setting(None, "hub revision (branch, tag or commit) of the model")
    download_dir: str | None = setting(
        None, "where hub models are downloaded (default: the Hugging Face cache under HF_HOME)"
    )
    max_model_len: int | None = setting(None, "context length (default: the model's own)")
    block_size: int = setting(16, "tokens per KV-cache block")
    num_kv_blocks: int | None = setting(
        None, "KV-cache blocks per rank (default: from memory, see the next two)"
    )
    kv_cache_memory_gib: float = setting(2.0, "on CPU, GiB of KV cache per rank")
    gpu_memory_utilization: float = setting(
        0.9, "on CUDA, the share of each GPU's memory for weights, activations and KV cache"
    )
    tensor_parallel_size: int = setting(
        1, "ranks one model is split over (GPUs on CUDA, processes on CPU)"
    )
    pipeline_parallel_size: int = setting(
        1, "stages the model's layers are split into, each over tensor_parallel_size ranks"
    )
    nnodes: int = setting(
        1,
        "machines the engine's ranks span, tensor_parallel_size x pipeline_parallel_size "
        "/ nnodes on each",
    )
    node_rank: int = setting(
        0, "this machine's number among nnodes: 0 serves the API, the others run --headless"
    )
    master_addr: str = setting(
        "127.0.0.1", "with nnodes > 1: node 0's address, where the nodes meet"
    )
    master_port: int = setting(
        29501, "with nnodes > 1: node 0's port where the nodes meet (one node: any free port)"
    )
    distributed_timeout: float = setting(
        600.0, "with nnodes > 1: seconds every node gets to join before the start fails"
    )
    max_num_seqs: int = setting(256, "most requests in one batch")
    max_num_batched_tokens: int = setting(
        2048, "token budget of one step (prefill chunks and decodes together)"
    )
    enable_prefix_caching: bool = setting(True, "reuse the KV blocks of shared prompt prefixes")
    swap_space: float = setting(
        0,
        "only 0: preempted requests are recomputed (mostly from "
        "the prefix cache), never swapped to host memory",
    )
    dtype: str = setting(
        "auto",
        "weights and activations; auto: bfloat16 on GPUs that have it, else float32",
        ("auto", *DTYPES),
    )
    quantization: str | None = setting(
        None,
        "default: the checkpoint's own, its 4-bit weights kept packed; none: dequantized at load",
        ("none", *QUANTIZATION_METHODS),
    )
    device: str = setting("auto", "auto: cuda when there is a GPU, else cpu", ("auto", *DEVICES))
    attention_backend: str = setting(
        "auto",
        "auto: triton on CUDA, cpu (kubellm's C kernels) for float32 on CPUs with AVX2, else torch",
        ("auto", *ATTENTION_BACKENDS),
    )
    enforce_eager: bool = setting(
        False, "on CUDA, run decode steps eagerly instead of replaying CUDA graphs"
    )
    tokenizer_mode: str = setting("auto", "only auto: the checkpoint's fast tokenizer", ("auto",))
    trust_remote_code: bool = setting(
        False, "accepted for vLLM's command lines: kubellm never runs a checkpoint's own code"
    )
    seed: int = setting(0, "seed of the unseeded requests' sampling")

    def __post_init__(self) -> None:
        positive = ("block_size", "max_num_seqs", "max_num_batched_tokens")
        positive += ("tensor_parallel_size", "pipeline_parallel_size", "nnodes")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2, got {self.max_model_len}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be at least 1, got {self.num_kv_blocks}")
        if self.kv_cache_memory_gib <= 0:
            raise ValueError("kv_cache_memory_gib must be positive")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        self._check_nodes()
        for f in fields(self):
            choices, value = f.metadata["choices"], getattr(self, f.name)
            if choices and value is not None and value not in choices:
                raise ValueError(f"{f.name} must be one of {', '.join(choices)}; got {value!r}")
        self._refuse_what_kubellm_does_differently()

    def _refuse_what_kubellm_does_differently(self) -> None:
        """vLLM settings users copy whose meaning kubellm does not have: refused, saying
        what kubellm does instead (never accepted and ignored)."""
        if self.swap_space:
            raise ValueError(
                f"swap_space {self.swap_space:g} is not supported: kubellm preempts by "
                f"recomputation (a preempted request's full blocks stay in the prefix cache, "
                f"so little is recomputed), not by swapping KV blocks to host memory; drop "
                f"--swap-space"
            )

    def _check_nodes(self) -> None:
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(
                f"node_rank {self.node_rank} is not one of nnodes {self.nnodes}'s node ranks "
                f"0..{self.nnodes - 1}"
            )
        if self.world_size % self.nnodes:
            raise ValueError(
                f"tensor_parallel_size {self.tensor_parallel_size} x pipeline_parallel_size "
                f"{self.pipeline_parallel_size} = {self.world_size} ranks do not divide evenly "
                f"over nnodes {self.nnodes}: make the product a multiple of {self.nnodes}"
            )
        if not 0 < self.master_port < 65536:
            raise ValueError(f"master_port must be in 1..65535, got {self.master_port}")
        if self.distributed_timeout <= 0:
            raise ValueError(
                f"distributed_timeout must be positive, got {self.distributed_timeout:g}"
            )

    @property
    def world_size(self) -> int:
        """Ranks of one engine: tensor_parallel_size x pipeline_parallel_size."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def ranks_per_node(self) -> int:
        return self.world_size // self.nnodes

    def ranks_of_node(self, node: int) -> range:
        """The world ranks node `node` runs: a contiguous share, so a stage's tensor-parallel
        group stays on one node whenever the stage fits in it."""
        return range(node * self.ranks_per_node, (node + 1) * self.ranks_per_node)

    def node_of(self, rank: int) -> int:
        return rank // self.ranks_per_node

    def local_rank(self, rank: int) -> int:
        """Rank `rank`'s index on its node (its GPU there)."""
        return rank % self.ranks_per_node

    def resolve_max_model_len(self, model: ModelConfig) -> int:
        """The context length to serve: the model's own unless asked for less."""
        if self.max_model_len is None:
            return model.max_position_embeddings
        if self.max_model_len > model.max_position_embeddings:
            raise ValueError(
                f"max_model_len {self.max_model_len} exceeds the model's context length "
                f"{model.max_position_embeddings}"
            )
        return self.max_model_len

    def check_pool_fits(self, max_model_len: int, num_blocks: int) -> None:
        """One request of the longest allowed length must fit in the KV pool on its own."""
        pool_tokens = num_blocks * self.block_size
        if max_model_len > pool_tokens:
            raise ValueError(
                f"max_model_len {max_model_len} is larger than the KV cache can hold "
                f"({num_blocks} blocks x {self.block_size} = {pool_tokens} tokens): "
                f"lower max_model_len or give the cache more memory "
                f"(kv_cache_memory_gib / num_kv_blocks)"
            )
