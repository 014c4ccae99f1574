"""The kubellm runtime: a continuous-batching engine over a paged KV cache."""

from kubellm.runtime.config import BUILTIN_MODEL, EngineConfig, ModelConfig
from kubellm.runtime.core.engine import LLMEngine
from kubellm.runtime.core.outputs import CompletionOutput, RequestOutput
from kubellm.runtime.core.sampling_params import SamplingParams
from kubellm.runtime.llm import LLM

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
