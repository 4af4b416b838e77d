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
        process_batch(logits, params, contexts)
        tokens = logits.argmax(dim=-1)
        rows = [i for i, p in enumerate(params) if not p.is_greedy]
        if rows:
            sampled = [params[i] for i in rows]
            vocab = logits.shape[1]
            width = max(_candidates(p, vocab) for p in sampled)
            noise = self._exponential_noise(width, vocab, [request_ids[i] for i in rows], sampled)
            tokens[rows] = sample_rows(logits[rows], sampled, noise)
        return tokens

    def _exponential_noise(self, width: int, vocab: int, request_ids: Sequence[str],
                           params: Sequence[SamplingParams]) -> torch.Tensor:
        """Exp(1) noise (rows, width), one value per candidate token: a seeded request's row from
        its own generator and as wide as its own candidates (the same draws whatever else is in
        the batch), the other rows from the engine's generator in one call."""
        noise = torch.ones((len(params), width), device=self.device)
        free = [i for i, p in enumerate(params) if p.seed is None]
        if free:
            noise[free] = torch.empty((len(free), width), device=self.device).exponential_(generator=self.generator)
        for i, p in enumerate(params):
            if p.seed is not None:
                noise[i, : _candidates(p, vocab)].exponential_(generator=self._generator_for(request_ids[i], p))
        return noise.clamp_(min=torch.finfo(noise.dtype).tiny)  # p / 0 would pick a filtered token


def _candidates(p: SamplingParams, vocab: int) -> int:
    """Tokens a row can draw from before top-p and min-p: its top-k, else the vocabulary."""
    return p.top_k if 0 < p.top_k < vocab else vocab


def sample_rows(logits: torch.Tensor, params: Sequence[SamplingParams], noise: torch.Tensor) -> torch.Tensor:
    """One token per row of logits (N, V), all rows at once: temperature; the rows' candidates in
    descending order (`topk` when every row has a top-k, else one sort); top-k, top-p and min-p
    masks; then the exponential race (argmax of p / E with E ~ Exp(1) draws token i with
    probability p_i, as a multinomial draw does). `noise` (N, candidates) is Exp(1)."""
    dev = logits.device
    temps = torch.tensor([p.temperature for p in params], device=dev, dtype=logits.dtype)
    x = logits / temps[:, None]
    vocab = x.shape[1]
    width = noise.shape[1]
    needs_order = width < vocab or any(p.top_p < 1.0 for p in params)
    if not needs_order:
        probs = torch.softmax(x, dim=-1)
        min_p = torch.tensor([p.min_p for p in params], device=dev, dtype=probs.dtype)
        probs = probs.masked_fill(probs < min_p[:, None] * probs.max(dim=-1, keepdim=True).values, 0.0)
        return (probs / noise).argmax(dim=-1)
    if width < vocab:  # every row has a top-k: the tokens past it are masked anyway
        values, order = x.topk(width, dim=-1)
    else:
        values, order = x.sort(dim=-1, descending=True)
    ks = torch.tensor([_candidates(p, vocab) for p in params], device=dev)
    kth = values.gather(1, (ks - 1)[:, None])
    values = values.masked_fill(values < kth, float("-inf"))  # ties with the k-th value stay, as a threshold
    probs = torch.softmax(values, dim=-1)
    top_p = torch.tensor([p.top_p for p in params], device=dev, dtype=probs.dtype)
    drop = (probs.cumsum(dim=-1) - probs) >= top_p[:, None]  # keep the smallest prefix reaching top_p
    min_p = torch.tensor([p.min_p for p in params], device=dev, dtype=probs.dtype)
    drop |= probs < min_p[:, None] * probs[:, :1]
    drop[:, 0] = False
    probs = probs.masked_fill(drop, 0.0)
    picked = (probs / noise).argmax(dim=-1, keepdim=True)
    return order.gather(1, picked)[:, 0]


def process_batch(logits: torch.Tensor, params: Sequence[SamplingParams],
                  contexts: Sequence[RowContext | None]) -> None:
    """Every row's minimum length, penalties, bias and allowed tokens, in place, with one tensor
    operation each over the rows that have a context (`process_logits` is the per-row reference):
    the host gathers each kind's (row, token) pairs, the device applies them."""
    rows = [i for i, c in enumerate(contexts) if c is not None]
    if not rows:
        return
    dev, vocab = logits.device, logits.shape[1]
    ps = [params[i] for i in rows]
    cs = [c for c in (contexts[i] for i in rows) if c is not None]
    x = logits[rows]

    def pairs(token_lists: list[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        r = [j for j, tokens in enumerate(token_lists) for _ in tokens]
        t = [int(tok) for tokens in token_lists for tok in tokens]
        return (torch.tensor(r, dtype=torch.long, device=dev), torch.tensor(t, dtype=torch.long, device=dev))

    def column(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=x.dtype, device=dev)[:, None]

    stops = [sorted(c.stop_token_ids) if c.num_generated < p.min_tokens else [] for p, c in zip(ps, cs)]
    if any(stops):
        x[pairs(stops)] = float("-inf")
    if any(p.repetition_penalty != 1.0 for p in ps):
        seen = torch.zeros(x.shape, dtype=torch.bool, device=dev)
        seen[pairs([c.seen_token_ids if p.repetition_penalty != 1.0 else () for p, c in zip(ps, cs)])] = True
        penalty = column([p.repetition_penalty for p in ps])
        x = torch.where(seen, torch.where(x > 0, x / penalty, x * penalty), x)
    if any(p.presence_penalty or p.frequency_penalty for p in ps):
        counts = torch.zeros(x.shape, dtype=x.dtype, device=dev)
        idx = pairs([c.output_token_ids for c in cs])
        counts.index_put_(idx, torch.ones(idx[0].shape, dtype=x.dtype, device=dev), accumulate=True)
        x = x - (column([p.frequency_penalty for p in ps]) * counts
                 + column([p.presence_penalty for p in ps]) * (counts > 0).to(x.dtype))
    if any(p.logit_bias for p in ps):
        idx = pairs([list(p.logit_bias or {}) for p in ps])
        bias = [b for p in ps for b in (p.logit_bias or {}).values()]
        x.index_put_(idx, torch.tensor(bias, dtype=x.dtype, device=dev), accumulate=True)
    if any(p.allowed_token_ids is not None for p in ps):
        keep = torch.zeros(x.shape, dtype=torch.bool, device=dev)
        keep[[j for j, p in enumerate(ps) if p.allowed_token_ids is None]] = True
        keep[pairs([p.allowed_token_ids or [] for p in ps])] = True
        x = x.masked_fill(~keep, float("-inf"))
    logits[rows] = x


def process_logits(row: torch.Tensor, p: SamplingParams, ctx: RowContext) -> None:
    """One row's penalties, bias, allowed tokens and minimum length, in place (vLLM's order): the
    reference of `process_batch`."""
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
    """Probabilities (V,) after temperature, top-k, top-p and min-p filtering: one row at a time,
    the reference of `sample_rows` (tests and benchmarks/sampler.py)."""
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
