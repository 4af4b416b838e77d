"""Runs one engine step on the model: build flat inputs, plan attention, forward, sample.

Knows the model, the KV tensors and the attention backend; knows nothing about tokenizers,
queues or HTTP.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from lserve.attention.backend import AttentionBackend
from lserve.attention.metadata import AttentionMetadata, build_metadata, to_device
from lserve.kv_cache.layout import RingGeometry
from lserve.kv_cache.manager import SeatPageRows
from lserve.model.llama import LlamaForCausalLM
from lserve.request import INFLIGHT_TOKEN, Request, TokenLogprobEntry
from lserve.runner.cuda_graphs import DecodeGraphs
from lserve.runner.sampler import RowContext, Sampler, token_logprobs
from lserve.runner.structured import apply_grammar_masks

PROMPT_LOGPROB_ROWS = 1024
"""Prompt positions whose full-vocabulary logits are computed at once (a chunk of 8K prompt tokens
would otherwise need 8K x vocabulary floats)."""



@dataclass
class StepLogprobs:
    """Log-probabilities a step computed, on the device until the step is read: per sampled row
    that asked (`sample_ids`, each with its k) and per run of prompt positions (`prompt_runs`:
    request id, index of the first prompt token scored, count, k)."""

    sample_ids: list[str] = field(default_factory=list)
    sample_k: list[int] = field(default_factory=list)
    sample: list[torch.Tensor] = field(default_factory=list)
    prompt_runs: list[tuple[str, int, int, int]] = field(default_factory=list)
    prompt: list[list[torch.Tensor]] = field(default_factory=list)

    def tensors(self) -> list[torch.Tensor]:
        return [*self.sample, *(t for part in self.prompt for t in part)]

    @staticmethod
    def _entries(values: list[list], k: int, row: int) -> TokenLogprobEntry:
        lp, rank, top_v, top_i = values
        return (lp[row], rank[row], list(zip(top_i[row][:k], top_v[row][:k])))

    def read(self, host: list[torch.Tensor]) -> tuple[dict[str, TokenLogprobEntry], dict[str, tuple[int, list]]]:
        """(sampled row logprobs by request, prompt logprobs by request: first index and entries)
        from the host copies of `tensors()`."""
        values = [t.tolist() for t in host]
        sample: dict[str, TokenLogprobEntry] = {}
        if self.sample_ids:
            part = values[:4]
            sample = {rid: self._entries(part, k, i) for i, (rid, k) in enumerate(zip(self.sample_ids, self.sample_k))}
        prompt: dict[str, tuple[int, list[TokenLogprobEntry]]] = {}
        at = 4 if self.sample_ids else 0
        for (rid, first, count, k), _ in zip(self.prompt_runs, self.prompt):
            part = values[at:at + 4]
            at += 4
            prompt[rid] = (first, [self._entries(part, k, j) for j in range(count)])
        return sample, prompt


@dataclass
class LaunchedStep:
    """A step queued on the device; `tokens()` waits for it (and nothing launched after it) and
    reads its sampled tokens, `logprobs()` the log-probabilities it computed."""

    request_ids: list[str]
    device_tokens: torch.Tensor | None
    """(len(request_ids),) int64 on the device; None when no request samples."""
    step_logprobs: StepLogprobs | None = None
    host: list[torch.Tensor] | None = None
    """On a GPU: pinned copies of the tokens and log-probabilities, filled by copies queued right
    after sampling."""
    ready: torch.cuda.Event | None = None
    """Recorded after those copies: waiting on it does not wait for steps launched later."""
    _tokens: dict[str, int] | None = None

    @classmethod
    def of(cls, request_ids: list[str], device_tokens: torch.Tensor | None,
           step_logprobs: StepLogprobs | None = None) -> LaunchedStep:
        tensors = ([device_tokens] if device_tokens is not None else []) \
            + (step_logprobs.tensors() if step_logprobs is not None else [])
        if not tensors or not tensors[0].is_cuda:
            return cls(request_ids, device_tokens, step_logprobs, tensors)
        # `.tolist()` on a device tensor would wait for the whole stream, including the step
        # launched after this one: copy now, and wait later for these copies only
        host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
        for h, t in zip(host, tensors):
            h.copy_(t, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return cls(request_ids, device_tokens, step_logprobs, host, ready)

    def _host(self) -> list[torch.Tensor]:
        if self.ready is not None:
            self.ready.synchronize()
        return self.host or []

    def tokens(self) -> dict[str, int]:
        if self._tokens is None:
            host = self._host()
            values = host[0].tolist() if self.device_tokens is not None else []
            self._tokens = dict(zip(self.request_ids, values))
        return self._tokens

    def logprobs(self) -> tuple[dict[str, TokenLogprobEntry], dict[str, tuple[int, list[TokenLogprobEntry]]]]:
        """Sampled tokens' log-probabilities by request, and prompt runs' (first prompt index, entries)."""
        if self.step_logprobs is None:
            return {}, {}
        host = self._host()
        return self.step_logprobs.read(host[1:] if self.device_tokens is not None else host)


def row_context(req: Request) -> RowContext | None:
    """What the sampler needs of a request beyond its logits (None: nothing). Penalties read the
    output's values, so a request with one never has a token in flight here (the engine reads it
    first); the length counts tokens in flight."""
    p = req.sampling_params
    if not p.needs_row_context:
        return None
    stops = frozenset(p.stop_token_ids or ()) | (frozenset() if p.ignore_eos else req.eos_token_ids)
    return RowContext(
        seen_token_ids=req.all_token_ids if p.repetition_penalty != 1.0 else (),
        output_token_ids=req.output_token_ids if p.presence_penalty or p.frequency_penalty else (),
        num_generated=len(req.output_token_ids) + req.num_inflight_tokens,
        stop_token_ids=stops if p.min_tokens else frozenset(),
    )


@dataclass(frozen=True)
class StepInput:
    """One scheduled request as the runner sees it."""

    request: Request
    num_new_tokens: int
    page_ids: list[int]
    samples: bool
    seat: int = 0


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        backend: AttentionBackend,
        page_size: int,
        device: torch.device,
        seed: int,
        ring: RingGeometry | None = None,
        page_rows: SeatPageRows | None = None,
    ) -> None:
        self.model = model
        self.ring = ring
        self.page_rows = page_rows
        """The KV manager's page tables by seat: step tables are sliced from it (no list conversion)."""
        self.backend = backend
        self.page_size = page_size
        self.device = device
        self.sampler = Sampler(device, seed)
        self.graphs: DecodeGraphs | None = None
        """Set by the engine on CUDA: pure decode steps replay captured graphs."""
        self._last: LaunchedStep | None = None
        """The last launched step that sampled (its tokens feed in-flight inputs of the next)."""

    @torch.inference_mode()
    def execute(self, inputs: Sequence[StepInput], num_decodes: int) -> dict[str, int]:
        """Run the scheduled tokens (decodes first); return a sampled token per request that samples."""
        return self.launch(inputs, num_decodes).tokens()

    @torch.inference_mode()
    def launch(self, inputs: Sequence[StepInput], num_decodes: int) -> LaunchedStep:
        """Queue the step on the device and return without waiting for it. An input token that a
        previous launch sampled and the host has not read yet (`INFLIGHT_TOKEN`) is taken from
        that launch's tokens on the device."""
        token_ids: list[int] = []
        positions: list[int] = []
        for s in inputs:
            start = s.request.num_computed_tokens
            token_ids.extend(s.request.token_ids(start, start + s.num_new_tokens))
            positions.extend(range(start, start + s.num_new_tokens))
        md = self.plan(inputs, num_decodes)
        backend = self.backend
        backend.prepare(md)
        ids, pos = to_device([np.asarray(token_ids, dtype=np.int64), np.asarray(positions, dtype=np.int64)],
                             self.device)
        self._fill_inflight(ids, token_ids, inputs)
        sampling = [i for i, s in enumerate(inputs) if s.samples]
        # the sampling rows' index, without a copy that would wait for the device
        rows: slice | torch.Tensor = slice(None)
        if len(sampling) != len(inputs):
            rows = to_device([np.asarray(sampling, dtype=np.int64)], self.device)[0]
        graphs = self.graphs
        step_logprobs: StepLogprobs | None = None
        if graphs is not None and num_decodes == len(inputs) and graphs.bucket(num_decodes) is not None:
            mode = backend.selector.mode if backend.selector is not None else "none"
            logits = graphs.run(md, ids, pos, mode)[rows]
            backend.collect_stored_pages(md)
        else:
            def attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> torch.Tensor:
                return backend.forward(q, k, v, layer_idx, md)

            hidden = self.model(ids, pos, attn)
            backend.collect_stored_pages(md)
            step_logprobs = self._prompt_logprobs(hidden, inputs)
            if not sampling:
                return LaunchedStep.of([], None, step_logprobs)
            ends = md.query_start_loc[1:].long() - 1
            logits = self.model.compute_logits(hidden[ends[rows]])
        if not sampling:
            return LaunchedStep([], None)
        reqs = [inputs[i].request for i in sampling]
        wants = [i for i, r in enumerate(reqs) if r.sampling_params.logprobs is not None]
        raw = logits[wants] if wants else None  # a copy (list indexing): masks and penalties come in place
        apply_grammar_masks(logits, [r.structured for r in reqs])
        tokens = self.sampler.sample(logits, [r.request_id for r in reqs], [r.sampling_params for r in reqs],
                                     [row_context(r) for r in reqs])
        if raw is not None:
            if step_logprobs is None:
                step_logprobs = StepLogprobs()
            ks = [reqs[i].sampling_params.logprobs or 0 for i in wants]
            step_logprobs.sample_ids = [reqs[i].request_id for i in wants]
            step_logprobs.sample_k = ks
            step_logprobs.sample = token_logprobs(raw, tokens[wants], max(ks))
        step = LaunchedStep.of([r.request_id for r in reqs], tokens, step_logprobs)
        self._last = step
        return step

    def _prompt_logprobs(self, hidden: torch.Tensor, inputs: Sequence[StepInput]) -> StepLogprobs | None:
        """Log-probabilities of the prompt tokens that this step's prefill chunks predict, for the
        requests that ask for them: the hidden state at position p scores prompt token p + 1."""
        out: StepLogprobs | None = None
        offset = 0
        for s in inputs:
            req, n = s.request, s.num_new_tokens
            k = req.sampling_params.prompt_logprobs
            start = req.num_computed_tokens
            stop = min(start + n, req.num_prompt_tokens - 1)
            if k is not None and stop > start and len(req.prompt_logprobs) < req.num_prompt_tokens - 1:
                out = out or StepLogprobs()
                targets = torch.tensor(req.prompt_token_ids[start + 1 : stop + 1], device=hidden.device)
                parts = []
                for a in range(0, stop - start, PROMPT_LOGPROB_ROWS):
                    b = min(a + PROMPT_LOGPROB_ROWS, stop - start)
                    logits = self.model.compute_logits(hidden[offset + a : offset + b])
                    parts.append(token_logprobs(logits, targets[a:b], k))
                out.prompt_runs.append((req.request_id, start + 1, stop - start, k))
                out.prompt.append([torch.cat(col) for col in zip(*parts)])
            offset += n
        return out

    def _fill_inflight(self, ids: torch.Tensor, token_ids: list[int], inputs: Sequence[StepInput]) -> None:
        """Write the ids of in-flight tokens from the last launch's tokens, on the device. Only a
        decoding request's one input token can be in flight (a preempted request is recomputed
        only after its token arrived)."""
        if INFLIGHT_TOKEN not in token_ids:
            return
        last = self._last
        rows = {rid: i for i, rid in enumerate(last.request_ids)} if last is not None else {}
        dst, src = [], []
        flat = 0
        for s in inputs:
            for j in range(s.num_new_tokens):
                if token_ids[flat + j] == INFLIGHT_TOKEN:
                    row = rows.get(s.request.request_id)
                    if row is None or last is None or last.device_tokens is None:
                        raise RuntimeError(f"request {s.request.request_id}: an input token is in flight but "
                                           "the last launched step did not sample it")
                    dst.append(flat + j)
                    src.append(row)
            flat += s.num_new_tokens
        assert last is not None and last.device_tokens is not None
        dst_t, src_t = to_device([np.asarray(dst, dtype=np.int64), np.asarray(src, dtype=np.int64)], self.device)
        ids[dst_t] = last.device_tokens[src_t]

    def plan(self, inputs: Sequence[StepInput], num_decodes: int) -> AttentionMetadata:
        """Attention metadata of the step, built once and shared by every layer."""
        seats = [s.seat for s in inputs]
        tables: list[list[int]] | np.ndarray
        if self.page_rows is not None:
            tables = self.page_rows.rows(seats, max(len(s.page_ids) for s in inputs))
        else:
            tables = [s.page_ids for s in inputs]
        return build_metadata(
            query_lens=[s.num_new_tokens for s in inputs],
            seq_lens=[s.request.num_computed_tokens + s.num_new_tokens for s in inputs],
            page_tables=tables,
            num_decodes=num_decodes,
            page_size=self.page_size,
            device=self.device,
            seats=seats,
            ring=self.ring,
            request_ids=[s.request.request_id for s in inputs],
            window=self.backend.cache.window_geometry,
        )
