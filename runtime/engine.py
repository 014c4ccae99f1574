"""The engine: requests in, one scheduled batch per `step()`, tokens and text out."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import torch

from kubellm.runtime.config import EngineConfig
from kubellm.runtime.cuda_graphs import DecodeGraphs, graph_batch_sizes
from kubellm.runtime.detokenizer import IncrementalDetokenizer
from kubellm.runtime.kv_cache import KVCacheManager
from kubellm.runtime.memory_profile import activation_peak_bytes
from kubellm.runtime.model.source import resolve
from kubellm.runtime.model.weights import load_weights
from kubellm.runtime.model_runner import ModelRunner
from kubellm.runtime.outputs import CompletionOutput, RequestOutput, StepDelta
from kubellm.runtime.request import Request, TokenLogprobs
from kubellm.runtime.sampler import Sampler, score_tokens
from kubellm.runtime.sampling_params import SamplingParams
from kubellm.runtime.scheduler import Scheduler, SchedulerOutput

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class _Group:
    """A prompt and the n sequences generated from it."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    sequences: list[Request]
    detokenizers: list[IncrementalDetokenizer]


def resolve_device(name: str) -> torch.device:
    """auto: $KUBELLM_DEVICE when set (as for `kubellm serve --device`), else CUDA when
    there is a GPU, else CPU."""
    if name == "auto":
        name = os.environ.get("KUBELLM_DEVICE", "auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_attention_backend(name: str, device: torch.device) -> str:
    if name != "auto":
        return name
    return "triton" if device.type == "cuda" else "torch"


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        started = time.perf_counter()
        self.config = config
        source = resolve(config.model, config.revision)
        self.model_config = source.config
        self.tokenizer = source.load_tokenizer()
        self.max_model_len = config.resolve_max_model_len(source.config)
        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, device)
        backend = resolve_attention_backend(config.attention_backend, device)
        model = ModelRunner.build(source.config, self.max_model_len, backend, device, dtype)
        load_weights(model, source.tensors())
        num_blocks = config.num_kv_blocks or self._blocks_from_memory(model, dtype, device)
        config.check_pool_fits(self.max_model_len, num_blocks)
        self.kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens)
        self.runner = ModelRunner(model, num_blocks, config.block_size, device, dtype)
        if device.type == "cuda" and not config.enforce_eager:
            self._capture_decode_graphs(backend)
        self.sampler = Sampler(config.seed)
        self.eos_token_ids = frozenset(source.config.eos_token_ids) | frozenset(
            [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        )
        self._groups: dict[str, _Group] = {}
        self._sequences: dict[str, tuple[_Group, int]] = {}
        self.load_seconds = time.perf_counter() - started
        logger.info(
            "loaded %s in %.1f s on %s (%s); KV cache: %d blocks x %d tokens = %d tokens",
            config.model, self.load_seconds, device, str(dtype).removeprefix("torch."),
            num_blocks, config.block_size, num_blocks * config.block_size,
        )  # fmt: skip

    def _blocks_from_memory(self, model, dtype: torch.dtype, device: torch.device) -> int:
        """CPU: `kv_cache_memory_gib`. CUDA: what `gpu_memory_utilization` of the device
        leaves once the weights are in and the largest step's activations are set aside
        (measured by a profiling forward pass)."""
        bytes_per_token = self.model_config.kv_bytes_per_token(dtype.itemsize)
        if device.type == "cuda":
            tokens = min(self.config.max_num_batched_tokens, self.max_model_len)
            activations = activation_peak_bytes(
                model, tokens, self.config.max_num_seqs, self.config.block_size, device, dtype
            )
            free, total = torch.cuda.mem_get_info(device)
            used = total - free  # weights, CUDA context, other processes
            budget = int(total * self.config.gpu_memory_utilization) - used - activations
            logger.info(
                "KV pool budget: %.1f GiB (%.0f%% of %.1f GiB, minus %.1f GiB in use and "
                "%.1f GiB of activations at %d tokens over %d sequences)",
                budget / 2**30, 100 * self.config.gpu_memory_utilization, total / 2**30,
                used / 2**30, activations / 2**30, tokens, self.config.max_num_seqs,
            )  # fmt: skip
            if budget <= 0:
                raise ValueError(
                    "no GPU memory is left for the KV cache: raise gpu_memory_utilization "
                    "or lower max_num_batched_tokens"
                )
        else:
            budget = int(self.config.kv_cache_memory_gib * 2**30)
        return max(1, budget // (bytes_per_token * self.config.block_size))

    def _capture_decode_graphs(self, backend: str) -> None:
        runner = self.runner
        if not runner.model.attention_backend.supports_cuda_graphs:
            logger.info("no CUDA graphs: the %s attention backend cannot be captured", backend)
            return
        graphs = DecodeGraphs(
            runner.model, runner.kv_caches, graph_batch_sizes(self.config.max_num_seqs),
            self.max_model_len, self.config.block_size,
        )  # fmt: skip
        graphs.capture()
        runner.decode_graphs = graphs

    # ---- requests in -------------------------------------------------------------------

    def tokenize(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt, add_special_tokens=True)

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> None:
        """Queue a prompt (text or token ids) for `params.n` sequences. Bad input raises
        ValueError and changes nothing."""
        if request_id in self._groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        text = prompt if isinstance(prompt, str) else None
        token_ids = self.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        self.check_prompt(token_ids)
        self.check_logit_bias(params)
        group = _Group(request_id, text, token_ids, [], [])
        for index in range(params.n):
            seed = None if params.seed is None else params.seed + index
            sequence_id = request_id if params.n == 1 else f"{request_id}#{index}"
            request = Request(
                sequence_id, token_ids, params, self.eos_token_ids, self.max_model_len, seed
            )
            group.sequences.append(request)
            group.detokenizers.append(
                IncrementalDetokenizer(self.tokenizer, params.stop, params.skip_special_tokens)
            )
            self._sequences[sequence_id] = (group, index)
        self._groups[request_id] = group
        leader, *siblings = group.sequences
        shares_prompt = self.kv.enable_prefix_caching and params.prompt_logprobs is None
        if shares_prompt and len(token_ids) > self.config.block_size:
            for sibling in siblings:  # the prompt fills a block: compute it once
                sibling.prompt_leader = leader
        for request in group.sequences:
            self.scheduler.add(request)

    def check_prompt(self, token_ids: list[int]) -> None:
        """Raise ValueError unless `token_ids` is a prompt this engine can serve."""
        if not token_ids:
            raise ValueError("the prompt must not be empty")
        vocab = self.model_config.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in token_ids):
            raise ValueError(f"prompt token ids must be integers in [0, {vocab})")
        if len(token_ids) > self.max_model_len:
            raise ValueError(
                f"This model's maximum context length is {self.max_model_len} tokens. "
                f"However, your prompt contains {len(token_ids)} input tokens."
            )

    def check_logit_bias(self, params: SamplingParams) -> None:
        """Raise ValueError unless every biased token is in this model's vocabulary."""
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in params.logit_bias):
            raise ValueError(f"logit_bias keys must be token ids in [0, {vocab})")

    def abort_request(self, request_id: str) -> None:
        """Stop generating for a request (all its sequences) and free its blocks."""
        group = self._groups.get(request_id)
        if group is None:
            return
        for request in group.sequences:
            self.scheduler.abort(request)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- one step ----------------------------------------------------------------------

    def step(self) -> list[StepDelta]:
        """Run one batch; return what each sequence that got a token gained."""
        out = self.scheduler.schedule()
        if not out.scheduled:
            return []
        logits, prompt_logits = self.runner.execute(out)
        if prompt_logits is not None:
            self._record_prompt_logprobs(out, prompt_logits)
        to_sample = [s.request for s in out.scheduled if s.samples]
        tokens: dict[str, int] = {}
        logprobs: dict[str, TokenLogprobs | None] = {}
        if to_sample:
            sampled = self.sampler(logits, to_sample)
            for request, token_id, token_logprobs in zip(
                to_sample, sampled.token_ids, sampled.logprobs
            ):
                tokens[request.request_id] = token_id
                logprobs[request.request_id] = token_logprobs
        advanced = self.scheduler.update(out, tokens)
        deltas = [self._advance_text(r, logprobs[r.request_id]) for r in advanced]
        self.scheduler.remove_finished(advanced)
        return deltas

    @staticmethod
    def _record_prompt_logprobs(out: SchedulerOutput, prompt_logits: torch.Tensor) -> None:
        """Score each prompt token from the logits of the position before it."""
        row = 0
        for item in out.scheduled:
            positions = item.prompt_positions
            if not positions:
                continue
            request = item.request
            targets = [request.prompt_token_ids[p + 1] for p in positions]
            scored = score_tokens(prompt_logits[row : row + len(targets)], targets,
                                  request.params.prompt_logprobs)  # fmt: skip
            request.prompt_logprobs[positions.start + 1 : positions.stop + 1] = scored
            row += len(targets)

    def _advance_text(self, request: Request, logprobs: TokenLogprobs | None) -> StepDelta:
        group, index = self._sequences[request.request_id]
        detokenizer = group.detokenizers[index]
        token_id = request.token_ids[-1]
        if logprobs is not None:
            request.logprobs.append(logprobs)
        ended_on_stop_token = request.is_finished and request.finish_reason == "stop"
        if not ended_on_stop_token:
            past_min = request.num_output_tokens > request.params.min_tokens
            stop = detokenizer.add(token_id, check_stop=past_min)
            if stop is not None:
                request.finish("stop", stop)
        return StepDelta(
            request_id=group.request_id,
            index=index,
            new_token_ids=[token_id],
            new_text=detokenizer.take_delta(request.is_finished),
            new_logprobs=[logprobs] if logprobs is not None else [],
            prompt_logprobs=request.prompt_logprobs if request.num_output_tokens == 1 else None,
            finish_reason=request.finish_reason,
            stop_reason=request.stop_reason,
            num_prompt_tokens=len(request.prompt_token_ids),
            queue_seconds=request.queue_seconds,
        )

    # ---- results out -------------------------------------------------------------------

    def take_output(self, request_id: str) -> RequestOutput:
        """The request's full result; forgets the request once all its sequences ended."""
        group = self._groups[request_id]
        outputs = [
            CompletionOutput(
                index=i,
                text=detokenizer.text,
                token_ids=request.output_token_ids,
                finish_reason=request.finish_reason,
                stop_reason=request.stop_reason,
                logprobs=request.logprobs if request.params.logprobs is not None else None,
            )
            for i, (request, detokenizer) in enumerate(zip(group.sequences, group.detokenizers))
        ]
        result = RequestOutput(
            request_id,
            group.prompt,
            group.prompt_token_ids,
            outputs,
            num_cached_tokens=min(r.num_cached_tokens for r in group.sequences),
            prompt_logprobs=group.sequences[0].prompt_logprobs,
        )
        if result.finished:
            del self._groups[request_id]
            for request in group.sequences:
                del self._sequences[request.request_id]
        return result
