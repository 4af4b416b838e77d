"""Token sampling: greedy, temperature, top-k, top-p, min-p, penalties (repetition, presence,
frequency), logit bias, allowed tokens and a minimum length, seedable per request."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lserve.sampling_params import SamplingParams


@dataclass(frozen=True)
class RowContext:
    """What a row's logits processing needs beyond its logits (`SamplingParams.needs_row_context`)."""

    seen_token_ids: Sequence[int] = ()
    """Prompt and output tokens (repetition penalty)."""
    output_token_ids: Sequence[int] = ()
    """Output tokens (presence and frequency penalties)."""
    num_generated: int = 0
    """Tokens generated before the one being sampled (min_tokens)."""
    stop_token_ids: frozenset[int] = frozenset()
    """EOS and the request's stop tokens, kept from being sampled before min_tokens."""


class Sampler:
    """Picks one token per row of logits. A request with a seed draws from its own generator."""

    def __init__(self, device: torch.device, seed: int) -> None:
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self._request_generators: dict[str, torch.Generator] = {}

    def forget(self, request_id: str) -> None:
        self._request_generators.pop(request_id, None)

    def _generator_for(self, request_id: str, params: SamplingParams) -> torch.Generator:
        if params.seed is None:
            return self.generator
        gen = self._request_generators.get(request_id)
        if gen is None:
            gen = torch.Generator(device=self.device).manual_seed(params.seed)
            self._request_generators[request_id] = gen
        return gen

    def sample(
        self,
        logits: torch.Tensor,
        request_ids: Sequence[str],
        params: Sequence[SamplingParams],
        contexts: Sequence[RowContext | None],
    ) -> torch.Tensor:
        """logits (N, V) float32 -> (N,) int64 token ids on the logits' device, without waiting for
        the device (a step can be launched before the previous one's tokens are read). The logits
        of rows with a context are processed in place."""
        for i, (p, ctx) in enumerate(zip(params, contexts)):
            if ctx is not None:
                process_logits(logits[i], p, ctx)
        tokens = logits.argmax(dim=-1)
        for i, p in enumerate(params):
            if not p.is_greedy:
                probs = filtered_probs(logits[i], p)
                tokens[i] = torch.multinomial(probs, 1, generator=self._generator_for(request_ids[i], p))[0]
        return tokens


def process_logits(row: torch.Tensor, p: SamplingParams, ctx: RowContext) -> None:
    """One row's penalties, bias, allowed tokens and minimum length, in place (vLLM's order)."""
    if ctx.num_generated < p.min_tokens and ctx.stop_token_ids:
        row[torch.tensor(sorted(ctx.stop_token_ids), device=row.device, dtype=torch.long)] = float("-inf")
    if p.repetition_penalty != 1.0:
        apply_repetition_penalty(row, ctx.seen_token_ids, p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and ctx.output_token_ids:
        ids, counts = torch.tensor(list(ctx.output_token_ids), device=row.device, dtype=torch.long).unique(
            return_counts=True)
        row[ids] -= p.frequency_penalty * counts.to(row.dtype) + p.presence_penalty
    if p.logit_bias:
        ids = torch.tensor(list(p.logit_bias), device=row.device, dtype=torch.long)
        row[ids] += torch.tensor(list(p.logit_bias.values()), device=row.device, dtype=row.dtype)
    if p.allowed_token_ids is not None:
        keep = torch.tensor(p.allowed_token_ids, device=row.device, dtype=torch.long)
        masked = torch.full_like(row, float("-inf"))
        masked[keep] = row[keep]
        row.copy_(masked)


def apply_repetition_penalty(row: torch.Tensor, seen: Sequence[int], penalty: float) -> None:
    """CTRL-style penalty on every token seen in the prompt or output (in place)."""
    if not seen:
        return
    idx = torch.tensor(sorted(set(seen)), device=row.device, dtype=torch.long)
    vals = row[idx]
    row[idx] = torch.where(vals > 0, vals / penalty, vals * penalty)


def filtered_probs(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Probabilities (V,) after temperature, top-k, top-p and min-p filtering."""
    logits = row / p.temperature
    if p.top_k > 0 and p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        cum = sorted_probs.cumsum(-1)
        drop = (cum - sorted_probs) >= p.top_p  # keep the smallest prefix whose mass reaches top_p
        drop[0] = False
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    if p.min_p > 0.0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    return probs / probs.sum()




def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> list[torch.Tensor]:
    """Raw log-probabilities of rows of logits (N, V): the given tokens' (N,), their ranks (N,)
    (1 = most likely) and the top k (N, k) values and ids, all on the logits' device."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(1, tokens[:, None].long())[:, 0]
    rank = (lp > chosen[:, None]).sum(dim=-1) + 1
    top = lp.topk(k, dim=-1) if k > 0 else (lp[:, :0], torch.zeros((lp.shape[0], 0), dtype=torch.long,
                                                                        device=lp.device))
    return [chosen, rank, top[0], top[1]]
