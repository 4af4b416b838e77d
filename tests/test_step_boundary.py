"""The step boundary: the runner is driven by `StepData` alone (plain, picklable data).

An engine serves mixed traffic (chunked prefill, a pool small enough to preempt, seeded sampling
with penalties, a grammar, prompt log-probabilities, n > 1 forks, async scheduling) while every
`StepData` it hands its runner is pickled and recorded. A second runner, in a separately built
engine whose scheduler never runs, is then driven by the unpickled records only, and samples the
same tokens at every step.
"""

from __future__ import annotations

import pickle

from lserve import LLM, SamplingParams
from lserve.engine.core import EngineCore
from lserve.runner.step import NewRequestData, ScheduledChunk, StepData
from lserve.sampling_params import StructuredOutputsParams
from tests.passkey import FILLER


def _recording(core: EngineCore, log: list) -> None:
    """Wrap the runner's two entry points: each step is pickled on its way in (and sent through
    a pickle round trip), each launch's sampled tokens recorded on their way out. After each
    launch the runner's own state of every scheduled request must equal the engine's."""
    runner = core.runner
    launch, update = runner.launch, runner.update_states

    def launched(step: StepData):  # noqa: ANN202
        blob = pickle.dumps(step)
        out = launch(pickle.loads(blob))
        log.append(("launch", blob, out))
        for chunk in step.scheduled:
            req, state = core.scheduler.find(chunk.request_id), runner.requests[chunk.request_id]
            if req is None:  # a shared prefix, computed and set aside
                req = core.scheduler.prefixes[chunk.request_id]
            assert state.token_ids == req.token_ids(0, req.num_tokens - req.num_inflight_tokens)
            table = core.kv_manager.page_tables[chunk.request_id]
            assert state.seat == core.kv_manager.seats[chunk.request_id] and state.num_pages == len(table)
            assert runner.seat_rows.rows([state.seat], len(table))[0].tolist() == table
        return out

    def updated(step: StepData) -> None:
        blob = pickle.dumps(step)
        update(pickle.loads(blob))
        log.append(("update", blob, None))

    runner.launch, runner.update_states = launched, updated


def test_a_runner_driven_by_pickled_steps_alone_samples_the_same_tokens() -> None:
    kw = dict(dtype="float32", device="cpu", page_size=16, num_kv_pages=20, max_num_batched_tokens=96)
    llm = LLM(**kw)
    log: list = []
    _recording(llm.engine.core, log)
    story = "Here is a story. " + FILLER * 6 + "\nThe story is about"
    prompts = [story, "Write a phone number:", "Count: one, two,", story + " a cat"]
    params = [
        SamplingParams(temperature=0.9, seed=1, max_tokens=24, repetition_penalty=1.3, presence_penalty=0.5,
                       ignore_eos=True),
        SamplingParams(temperature=1.0, seed=2, max_tokens=12,
                       structured_outputs=StructuredOutputsParams(regex=r"[0-9]{3}-[0-9]{4}")),
        SamplingParams(temperature=0, max_tokens=20, prompt_logprobs=2, logprobs=1, ignore_eos=True),
        SamplingParams(temperature=0.8, seed=7, n=3, max_tokens=16, min_tokens=4, ignore_eos=True),
    ]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert all(len(c.token_ids) > 0 for o in outs for c in o.outputs)
    core = llm.engine.core
    assert core.scheduler.num_preemptions > 0, "the pool was meant to preempt"
    steps = [pickle.loads(blob) for _, blob, _ in log]
    assert any(s.new_requests for s in steps) and any(s.forks for s in steps)
    assert any(s.grammar_bitmask is not None for s in steps) and any(s.preempted_ids for s in steps)
    assert any(c.new_token_ids for s in steps for c in s.scheduled), "running requests sent their new tokens"
    for s in steps:  # plain data all the way down
        assert isinstance(s, StepData)
        assert all(type(n) is NewRequestData for n in s.new_requests)
        assert all(type(c) is ScheduledChunk for c in s.scheduled)

    fresh = LLM(**kw).engine.core.runner  # its own model, KV cache and sampler; its engine never steps
    for kind, blob, recorded in log:
        step = pickle.loads(blob)
        if kind == "update":
            fresh.update_states(step)
            continue
        got = fresh.launch(step)
        assert got.tokens() == recorded.tokens()
        sample, prompt = got.logprobs()
        want_sample, want_prompt = recorded.logprobs()
        assert sample.keys() == want_sample.keys() and prompt.keys() == want_prompt.keys()
    assert fresh.requests == {} and not fresh.sampler._request_generators, "every ended request's state was dropped"
