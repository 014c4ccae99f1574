"""The engine: requests in, one scheduled batch per `step()`, tokens and text out."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable

import torch

from kubellm.runtime.config import EngineConfig
from kubellm.runtime.core.admission import Admission, Admitted
from kubellm.runtime.core.detokenizer import IncrementalDetokenizer
from kubellm.runtime.core.kv_cache import KVCacheManager
from kubellm.runtime.core.outputs import CompletionOutput, EngineStats, RequestOutput, StepDelta
from kubellm.runtime.core.request import Request
from kubellm.runtime.core.sampler import Sampler, draw_worst_case, score_tokens
from kubellm.runtime.core.scheduler import Scheduler, SchedulerOutput
from kubellm.runtime.core.sequence import Sequence, TokenLogprobs
from kubellm.runtime.core.structured_output import GrammarCompiler
from kubellm.runtime.executor.distributed import SINGLE_PROCESS
from kubellm.runtime.executor.model_runner import ModelRunner
from kubellm.runtime.executor.platform import choose_platform
from kubellm.runtime.executor.step_plan import StepPlan
from kubellm.runtime.executor.workers import WorkerGroup
from kubellm.runtime.model.source import resolve

logger = logging.getLogger(__name__)


class LLMEngine:
    """Rank 0: the scheduler, the sampler, the detokenizers and the requests. With
    `tensor_parallel_size` T and `pipeline_parallel_size` P it starts T x P - 1 worker
    processes that run the other shards and stages."""

    def __init__(self, config: EngineConfig) -> None:
        started = time.perf_counter()
        self.config = config
        source = resolve(config.model, config.revision, config.download_dir, config.quantization)
        self.model_config = source.config
        source.config.check_tensor_parallel(config.tensor_parallel_size)
        source.config.check_pipeline_parallel(config.pipeline_parallel_size)
        platform = choose_platform(config, source.stays_quantized)
        self.tokenizer = source.load_tokenizer()
        self.max_model_len = config.resolve_max_model_len(source.config)
        self.workers = self._start_workers(config, platform, source.config.num_layers)
        try:
            parallel = self.workers.parallel if self.workers else SINGLE_PROCESS
            self.runner = ModelRunner(
                config, source, self.max_model_len, platform, parallel, draw=draw_worst_case
            )
        except BaseException:
            if self.workers:
                self.workers.kill()
            raise
        num_blocks = self.runner.num_blocks
        self.kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens)
        self.eos_token_ids = frozenset(source.config.eos_token_ids) | frozenset(
            [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        )
        self.grammars = GrammarCompiler(
            self.tokenizer, source.config.vocab_size, sorted(self.eos_token_ids)
        )
        self.admission = Admission(
            self.tokenizer, source.config.vocab_size, self.max_model_len, self.grammars
        )
        self.sampler = Sampler(config.seed, self.grammars)
        self._requests: dict[str, Request] = {}
        self._in_flight: deque[tuple[SchedulerOutput, StepPlan]] = deque()  # launched, in order
        self.batches_in_flight = config.pipeline_parallel_size  # one per stage (1: no overlap)
        self._sequences: dict[str, tuple[Request, int]] = {}
        self.load_seconds = time.perf_counter() - started
        logger.info(
            "loaded %s in %.1f s on %s (the %s platform, %s, tensor parallel %d, %d stages); "
            "KV cache: %d blocks x %d tokens = %d tokens",
            config.model,
            self.load_seconds,
            platform.device,
            platform.name,
            str(platform.dtype).removeprefix("torch."),
            config.tensor_parallel_size,
            config.pipeline_parallel_size,
            num_blocks,
            config.block_size,
            num_blocks * config.block_size,
        )

    @staticmethod
    def _start_workers(config: EngineConfig, platform, num_layers: int) -> WorkerGroup | None:
        if config.world_size == 1:
            return None
        if torch.distributed.is_initialized():
            raise ValueError(
                "a multi-rank engine is already running in this process: shut it down "
                "(LLM.shutdown()) before starting another"
            )
        return WorkerGroup(config, platform, num_layers)

    def on_worker_lost(self, callback: Callable[[str], None]) -> None:
        """Have `callback(reason)` called (from another thread) if a worker process dies."""
        if self.workers:
            self.workers.watch(callback)

    def shutdown(self) -> None:
        """Stop the workers (nothing to do with one rank)."""
        if self.workers:
            self.workers.shutdown()
            self.workers = None

    # ---- requests in -------------------------------------------------------------------

    def add_request(self, request_id: str, admitted: Admitted) -> None:
        """Queue an admitted prompt (`Admission.admit`) for `params.n` sequences."""
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        params, token_ids = admitted.params, admitted.token_ids
        request = Request(request_id, admitted.text, token_ids, [], [])
        for index in range(params.n):
            seed = None if params.seed is None else params.seed + index
            sequence_id = request_id if params.n == 1 else f"{request_id}#{index}"
            sequence = Sequence(
                sequence_id, token_ids, params, self.eos_token_ids, self.max_model_len, seed
            )
            if admitted.grammar is not None:
                sequence.matcher = self.grammars.matcher(admitted.grammar)
            request.sequences.append(sequence)
            request.detokenizers.append(
                IncrementalDetokenizer(self.tokenizer, params.stop, params.skip_special_tokens)
            )
            self._sequences[sequence_id] = (request, index)
        self._requests[request_id] = request
        leader, *siblings = request.sequences
        shares_prompt = self.kv.enable_prefix_caching and params.prompt_logprobs is None
        if shares_prompt and len(token_ids) > self.config.block_size:
            for sibling in siblings:  # the prompt fills a block: compute it once
                sibling.prompt_leader = leader
        for sequence in request.sequences:
            self.scheduler.add(sequence)

    def abort_request(self, request_id: str) -> None:
        """Stop generating for a request (all its sequences) and free its blocks."""
        request = self._requests.get(request_id)
        if request is None:
            return
        for sequence in request.sequences:
            self.scheduler.abort(sequence)

    def has_unfinished_requests(self) -> bool:
        """Whether `step()` has work: sequences to run, or batches in flight to collect
        (even of sequences aborted since: the stages wait to hand their logits over)."""
        return self.scheduler.has_unfinished() or bool(self._in_flight)

    def stats(self) -> EngineStats:
        kv = self.kv
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_usage=1 - kv.num_free_blocks / kv.num_blocks,
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_queries=kv.prefix_queries,
            prefix_cache_hits=kv.prefix_hits,
            num_blocks=kv.num_blocks,
            block_size=self.config.block_size,
        )

    # ---- one step ----------------------------------------------------------------------

    def step(self) -> list[StepDelta]:
        """Finish one batch; return what each sequence that got a token gained. With
        several pipeline stages up to one batch per stage is in flight: new ones are
        launched (of sequences not in flight) before the oldest is collected."""
        while len(self._in_flight) < self.batches_in_flight:
            out = self.scheduler.schedule()
            if not out.scheduled:
                break
            plan = out.plan(self.config.block_size)
            if self.workers:
                self.workers.send("execute", plan)
            self.runner.launch(plan)
            self._in_flight.append((out, plan))
        if not self._in_flight:
            return []
        out, plan = self._in_flight.popleft()
        logits, prompt_logits = self.runner.collect(plan)
        if prompt_logits is not None:
            self._record_prompt_logprobs(out, prompt_logits)
        to_sample = [s.sequence for s in out.scheduled if s.samples]
        tokens: dict[str, int] = {}
        logprobs: dict[str, TokenLogprobs | None] = {}
        if to_sample:
            sampled = self.sampler(logits, to_sample)
            for sequence, token_id, token_logprobs in zip(
                to_sample, sampled.token_ids, sampled.logprobs
            ):
                tokens[sequence.sequence_id] = token_id
                logprobs[sequence.sequence_id] = token_logprobs
        advanced = self.scheduler.update(out, tokens)
        for sequence in advanced:
            if sequence.matcher is not None:
                self._advance_grammar(sequence)
        deltas = [self._advance(r, logprobs[r.sequence_id]) for r in advanced]
        self.scheduler.remove_finished(advanced)
        return deltas

    @staticmethod
    def _advance_grammar(sequence: Sequence) -> None:
        """The sampled token moves the sequence's grammar on; a grammar that has ended
        (it accepted a stop token) ends the sequence."""
        sequence.matcher.accept_token(sequence.token_ids[-1])
        if sequence.matcher.is_terminated() and not sequence.is_finished:
            sequence.finish("stop")

    def _advance(self, sequence: Sequence, logprobs: TokenLogprobs | None) -> StepDelta:
        """The sequence's delta. Its text is its own business: when detokenizing it fails
        (a tokenizer bug on some token), that sequence ends with the error and the batch
        goes on; its blocks are freed with the step's other finished sequences."""
        try:
            return self._advance_text(sequence, logprobs)
        except Exception as exc:
            logger.exception("sequence %s failed", sequence.sequence_id)
            sequence.finish("abort")
            request, index = self._sequences[sequence.sequence_id]
            return StepDelta(
                request_id=request.request_id,
                index=index,
                new_token_ids=[],
                new_text="",
                new_logprobs=[],
                finish_reason="abort",
                stop_reason=None,
                num_prompt_tokens=len(sequence.prompt_token_ids),
                queue_seconds=sequence.queue_seconds,
                error=f"{type(exc).__name__}: {exc}",
            )

    @staticmethod
    def _record_prompt_logprobs(out: SchedulerOutput, prompt_logits: torch.Tensor) -> None:
        """Score each prompt token from the logits of the position before it."""
        row = 0
        for item in out.scheduled:
            positions = item.prompt_positions
            if not positions:
                continue
            sequence = item.sequence
            targets = [sequence.prompt_token_ids[p + 1] for p in positions]
            scored = score_tokens(
                prompt_logits[row : row + len(targets)], targets, sequence.params.prompt_logprobs
            )
            sequence.prompt_logprobs[positions.start + 1 : positions.stop + 1] = scored
            row += len(targets)

    def _advance_text(self, sequence: Sequence, logprobs: TokenLogprobs | None) -> StepDelta:
        request, index = self._sequences[sequence.sequence_id]
        detokenizer = request.detokenizers[index]
        token_id = sequence.token_ids[-1]
        if logprobs is not None:
            sequence.logprobs.append(logprobs)
        ended_on_stop_token = sequence.is_finished and sequence.finish_reason == "stop"
        if not ended_on_stop_token:
            past_min = sequence.num_output_tokens > sequence.params.min_tokens
            stop = detokenizer.add(token_id, check_stop=past_min)
            if stop is not None:
                sequence.finish("stop", stop)
        return StepDelta(
            request_id=request.request_id,
            index=index,
            new_token_ids=[token_id],
            new_text=detokenizer.take_delta(sequence.is_finished),
            new_logprobs=[logprobs] if logprobs is not None else [],
            prompt_logprobs=sequence.prompt_logprobs if sequence.num_output_tokens == 1 else None,
            finish_reason=sequence.finish_reason,
            stop_reason=sequence.stop_reason,
            num_prompt_tokens=len(sequence.prompt_token_ids),
            queue_seconds=sequence.queue_seconds,
        )

    # ---- results out -------------------------------------------------------------------

    def take_output(self, request_id: str) -> RequestOutput:
        """The sequence's full result; forgets the sequence once all its sequences ended."""
        request = self._requests[request_id]
        outputs = [
            CompletionOutput(
                index=i,
                text=detokenizer.text,
                token_ids=sequence.output_token_ids,
                finish_reason=sequence.finish_reason,
                stop_reason=sequence.stop_reason,
                logprobs=sequence.logprobs if sequence.params.logprobs is not None else None,
            )
            for i, (sequence, detokenizer) in enumerate(
                zip(request.sequences, request.detokenizers)
            )
        ]
        result = RequestOutput(
            request_id,
            request.prompt,
            request.prompt_token_ids,
            outputs,
            num_cached_tokens=min(r.num_cached_tokens for r in request.sequences),
            prompt_logprobs=request.sequences[0].prompt_logprobs,
        )
        if result.finished:
            del self._requests[request_id]
            for sequence in request.sequences:
                del self._sequences[sequence.sequence_id]
        return result
