"""The batched sampler against its per-row reference (`filtered_probs`): the same distribution
for every mix of temperature, top-k, top-p and min-p, nothing outside the filters, greedy rows
untouched, and a seeded request's draws independent of what else is in the batch."""

from __future__ import annotations

import pytest
import torch

from lserve.runner.sampler import Sampler, filtered_probs
from lserve.sampling_params import SamplingParams

V = 12
CASES = [
    dict(temperature=1.0),
    dict(temperature=0.5, top_k=4),
    dict(temperature=1.3, top_p=0.7),
    dict(temperature=1.5, min_p=0.05),
    dict(temperature=1.0, top_k=6, top_p=0.8, min_p=0.05),
]


def test_batched_draws_follow_the_reference_distribution() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(len(CASES), V, generator=gen) * 2
    params = [SamplingParams(**c) for c in CASES]
    sampler = Sampler(torch.device("cpu"), seed=1)
    draws = 10_000
    counts = torch.zeros(len(CASES), V)
    for _ in range(draws):
        tokens = sampler.sample(logits.clone(), [f"r{i}" for i in range(len(CASES))], params, [None] * len(CASES))
        counts[torch.arange(len(CASES)), tokens] += 1
    for i, p in enumerate(params):
        want = filtered_probs(logits[i].clone(), p)
        got = counts[i] / draws
        assert float((got - want).abs().sum()) / 2 < 0.025, (CASES[i], got, want)  # total variation
        assert not bool(((want == 0) & (got > 0)).any()), "a filtered-out token was drawn"


def test_greedy_rows_and_seeded_rows_do_not_depend_on_the_batch() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 500, generator=gen)
    seeded = SamplingParams(temperature=0.8, top_p=0.9, seed=42)
    greedy = SamplingParams(temperature=0.0)
    free = SamplingParams(temperature=1.0, top_k=50)

    def run(batch: list[tuple[str, SamplingParams, int]], steps: int = 5) -> list[list[int]]:
        sampler = Sampler(torch.device("cpu"), seed=7)
        out: list[list[int]] = [[] for _ in batch]
        for _ in range(steps):
            rows = torch.stack([logits[row] for _, _, row in batch])
            tokens = sampler.sample(rows, [rid for rid, _, _ in batch], [p for _, p, _ in batch], [None] * len(batch))
            for j, t in enumerate(tokens.tolist()):
                out[j].append(t)
        return out

    alone = run([("s", seeded, 0)])[0]
    mixed = run([("f", free, 1), ("g", greedy, 2), ("s", seeded, 0), ("f2", free, 3)])
    assert mixed[2] == alone  # the seeded request drew the same tokens
    assert mixed[1] == [int(logits[2].argmax())] * 5
    assert run([("s", seeded, 0)])[0] == alone


@pytest.mark.parametrize("top_k", [1, 3])
def test_top_k_never_leaves_the_k_best(top_k: int) -> None:
    logits = torch.randn(8, 300, generator=torch.Generator().manual_seed(top_k))
    sampler = Sampler(torch.device("cpu"), seed=0)
    params = [SamplingParams(temperature=2.0, top_k=top_k)] * 8
    best = logits.topk(top_k, dim=-1).indices
    for _ in range(50):
        tokens = sampler.sample(logits.clone(), [str(i) for i in range(8)], params, [None] * 8)
        assert bool((best == tokens[:, None]).any(dim=-1).all())


def test_batched_logits_processing_equals_the_per_row_reference() -> None:
    from lserve.runner.sampler import RowContext, process_batch, process_logits

    rng = torch.Generator().manual_seed(11)
    vocab = 64
    params = [
        SamplingParams(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.7),
        SamplingParams(temperature=0.0),  # no context
        SamplingParams(logit_bias={3: 2.0, 9: -1.5}, allowed_token_ids=[3, 4, 9, 20], min_tokens=4, max_tokens=8),
        SamplingParams(repetition_penalty=0.8, min_tokens=2, max_tokens=8),
        SamplingParams(frequency_penalty=-1.0, logit_bias={0: 5.0}),
    ]
    contexts = [
        RowContext(seen_token_ids=[1, 2, 2, 5, 7], output_token_ids=[2, 5, 5, 5]),
        None,
        RowContext(num_generated=1, stop_token_ids=frozenset({4, 63})),
        RowContext(seen_token_ids=[6, 6, 8], num_generated=3, stop_token_ids=frozenset({8})),  # past min_tokens
        RowContext(output_token_ids=[0, 0, 1]),
    ]
    logits = torch.randn(len(params), vocab, generator=rng) * 3
    want = logits.clone()
    for i, (p, c) in enumerate(zip(params, contexts)):
        if c is not None:
            process_logits(want[i], p, c)
    got = logits.clone()
    process_batch(got, params, contexts)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    assert torch.allclose(got[torch.isfinite(got)], want[torch.isfinite(want)], atol=1e-6)
    assert torch.equal(got[1], logits[1])  # a row without a context is untouched
