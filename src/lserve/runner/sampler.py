"""Token sampling: greedy, temperature, top-k, top-p, min-p and repetition penalty, seedable per request."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lserve.sampling_params import SamplingParams


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
        seen_token_ids: Sequence[Sequence[int]],
    ) -> torch.Tensor:
        """logits (N, V) float32 -> (N,) int64 token ids on the logits' device, without waiting for
        the device (a step can be launched before the previous one's tokens are read)."""
        for i, p in enumerate(params):
            if p.repetition_penalty != 1.0:
                apply_repetition_penalty(logits[i], seen_token_ids[i], p.repetition_penalty)
        tokens = logits.argmax(dim=-1)
        for i, p in enumerate(params):
            if not p.is_greedy:
                probs = filtered_probs(logits[i], p)
                tokens[i] = torch.multinomial(probs, 1, generator=self._generator_for(request_ids[i], p))[0]
        return tokens


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
