"""Batched next-token selection.

Order of operations (as vLLM): raw log-probabilities are kept for logprobs; then
logit_bias, min_tokens masking, penalties, and either argmax (greedy) or temperature, top-k,
top-p and min-p filtering followed by a draw. Draws use the exponential race
(argmax of p / E with E ~ Exp(1)). A seeded sequence's noise comes from its own
(CPU) generator, so it gives the same tokens whatever else is in the batch and on
any device; the noise of all unseeded sequences is one draw on the logits' device
(on a GPU, per-sequence CPU noise of a whole vocabulary would cost more than the
forward pass).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kubellm.runtime.core.sampling_params import SamplingParams
from kubellm.runtime.core.sequence import Sequence, TokenLogprobs
from kubellm.runtime.core.structured_output import GrammarCompiler

WORST_CASE = SamplingParams(max_tokens=1, temperature=0.7, top_k=50, top_p=0.9)


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


class Sampler:
    def __init__(self, seed: int, grammars: GrammarCompiler | None = None) -> None:
        self.seed = seed
        self.grammars = grammars  # masks the rows of structured-output sequences
        self.generators: dict[torch.device, torch.Generator] = {}  # unseeded draws, per device

    def __call__(self, logits: torch.Tensor, sequences: list[Sequence]) -> SamplerOutput:
        logits = logits.float()
        want_logprobs = any(r.params.logprobs is not None for r in sequences)
        raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
        logits = logits.clone()
        _add_logit_bias(logits, sequences)
        matchers = {i: r.matcher for i, r in enumerate(sequences) if r.matcher is not None}
        if matchers:
            self.grammars.mask(logits, matchers)
        _mask_stops_before_min_tokens(logits, sequences)
        _apply_penalties(logits, sequences)
        token_ids = self._choose(logits, sequences)
        logprobs = [
            _logprobs_of(raw_logprobs[i], token_ids[i], r.params.logprobs)
            if raw_logprobs is not None and r.params.logprobs is not None
            else None
            for i, r in enumerate(sequences)
        ]
        return SamplerOutput(token_ids, logprobs)

    def _choose(self, logits: torch.Tensor, sequences: list[Sequence]) -> list[int]:
        chosen = logits.argmax(dim=-1)
        random_rows = [i for i, r in enumerate(sequences) if not r.params.greedy]
        if random_rows:
            drawing = [sequences[i] for i in random_rows]
            rows = torch.tensor(random_rows, device=logits.device)
            probs = filtered_probs(logits[rows], [r.params for r in drawing])
            chosen[rows] = (probs / self._noise(probs, drawing)).argmax(dim=-1)
        return chosen.tolist()

    def _noise(self, probs: torch.Tensor, sequences: list[Sequence]) -> torch.Tensor:
        """Exp(1) noise per row: seeded rows from their own generators, the rest at once."""
        noise = torch.empty_like(probs).exponential_(generator=self._generator(probs.device))
        for row, sequence in enumerate(sequences):
            if sequence.generator is not None:
                own = torch.empty(probs.shape[1]).exponential_(generator=sequence.generator)
                noise[row] = own.to(probs.device)
        return noise

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self.generators:
            self.generators[device] = torch.Generator(device).manual_seed(self.seed)
        return self.generators[device]


def draw_worst_case(logits: torch.Tensor) -> list[int]:
    """A draw from every row with temperature, top-k and top-p: what a step allocates at
    most beyond its logits ([rows, vocab] copies and a sort; with a 128k vocabulary
    these, not the layers, can set the peak). The memory profile runs it on the largest
    step's logits."""
    logits = logits.float().clone()
    probs = filtered_probs(logits, [WORST_CASE] * logits.shape[0])
    noise = torch.empty_like(probs).exponential_()
    return (probs / noise).argmax(dim=-1).tolist()


def filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p: the distribution a draw is taken from."""
    temperature = torch.tensor([p.temperature for p in params], device=logits.device)
    logits = logits / temperature[:, None]
    vocab = logits.shape[1]
    top_k = [min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params]
    if any(k < vocab for k in top_k):
        k = torch.tensor(top_k, device=logits.device)
        kth = logits.sort(dim=-1, descending=True).values.gather(1, (k - 1)[:, None])
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    top_p = torch.tensor([p.top_p for p in params], device=logits.device)
    if bool((top_p < 1.0).any()):
        probs = _top_p(probs, top_p)
    min_p = torch.tensor([p.min_p for p in params], device=logits.device)
    if bool((min_p > 0.0).any()):
        threshold = min_p[:, None] * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < threshold, 0.0)
    return probs / probs.sum(dim=-1, keepdim=True)


def _top_p(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    drop_sorted = mass_before >= top_p[:, None]
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    return probs.masked_fill(drop, 0.0)


def _add_logit_bias(logits: torch.Tensor, sequences: list[Sequence]) -> None:
    for i, r in enumerate(sequences):
        if r.params.logit_bias:
            ids = torch.tensor(list(r.params.logit_bias), device=logits.device)
            bias = torch.tensor(list(r.params.logit_bias.values()), device=logits.device)
            logits[i, ids] += bias


def _mask_stops_before_min_tokens(logits: torch.Tensor, sequences: list[Sequence]) -> None:
    for i, r in enumerate(sequences):
        if r.num_output_tokens < r.params.min_tokens and r.stop_token_ids:
            logits[i, list(r.stop_token_ids)] = float("-inf")


def _apply_penalties(logits: torch.Tensor, sequences: list[Sequence]) -> None:
    """Repetition penalty over prompt and output tokens; presence/frequency over output only."""
    for i, r in enumerate(sequences):
        p = r.params
        if not p.has_penalties:
            continue
        row = logits[i]
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(r.token_ids)), device=row.device)
            values = row[seen]
            row[seen] = torch.where(
                values > 0, values / p.repetition_penalty, values * p.repetition_penalty
            )
        if p.presence_penalty or p.frequency_penalty:
            counts = torch.zeros_like(row)
            out = torch.tensor(r.output_token_ids, dtype=torch.int64, device=row.device)
            counts.scatter_add_(0, out, torch.ones_like(out, dtype=row.dtype))
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)


def score_tokens(logits: torch.Tensor, token_ids: list[int], top_n: int) -> list[TokenLogprobs]:
    """Each row's log-probability of its given token, with the row's `top_n` best (the
    prompt's logprobs: row i holds the logits that predict token_ids[i])."""
    raw = torch.log_softmax(logits.float(), dim=-1)
    return [_logprobs_of(row, token_id, top_n) for row, token_id in zip(raw, token_ids)]


def _logprobs_of(raw: torch.Tensor, token_id: int, top_n: int) -> TokenLogprobs:
    top = raw.topk(top_n) if top_n > 0 else None
    top_dict = {} if top is None else dict(zip(top.indices.tolist(), top.values.tolist()))
    return TokenLogprobs(token_id, float(raw[token_id]), top_dict)
