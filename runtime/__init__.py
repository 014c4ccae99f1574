"""The kubellm runtime: a continuous-batching engine over a paged KV cache."""

from kubellm.runtime.config import BUILTIN_MODEL, EngineConfig, ModelConfig
from kubellm.runtime.engine import LLMEngine
from kubellm.runtime.llm import LLM
from kubellm.runtime.outputs import CompletionOutput, RequestOutput
from kubellm.runtime.sampling_params import SamplingParams

__all__ = [
    "BUILTIN_MODEL",
    "LLM",
    "CompletionOutput",
    "EngineConfig",
    "LLMEngine",
    "ModelConfig",
    "RequestOutput",
    "SamplingParams",
]
