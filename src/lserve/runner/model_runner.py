"""Runs one engine step on the model: build flat inputs, plan attention, forward, sample.

Driven only by `StepData` (runner/step.py), plain data from the engine; keeps its own state per
request (token ids, seat, page table row, sampling settings). Knows the model, the KV tensors and
the attention backend; knows nothing about tokenizers, queues, `Request` objects or HTTP.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from lserve.attention.backend import AttentionBackend, StepPageCounts
from lserve.attention.metadata import AttentionMetadata, build_metadata, to_device
from lserve.kv_cache.ring_pages import RingPages
from lserve.kv_cache.manager import SeatPageRows
from lserve.model.llama import LlamaForCausalLM
from lserve.request import INFLIGHT_TOKEN, TokenLogprobEntry
from lserve.runner.cuda_graphs import DecodeGraphs
from lserve.runner.sampler import RowContext, Sampler, token_logprobs
from lserve.runner.step import NewRequestData, ScheduledChunk, StepData
from lserve.runner.structured import apply_bitmask
from lserve.sampling_params import SamplingParams

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
    page_counts: StepPageCounts | None = None
    """The KV pages the step's decode rows read (set by `ModelRunner.launch`)."""
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


@dataclass
class RequestState:
    """What the runner keeps of a request between steps."""

    token_ids: list[int]
    """Known tokens (prompt, then output); a token in flight is not here yet."""
    num_prompt_tokens: int
    params: SamplingParams
    eos_token_ids: frozenset[int]
    seat: int
    num_pages: int
    num_prompt_logprobs: int
    prefill_only: bool = False

    @classmethod
    def of(cls, new: NewRequestData) -> RequestState:
        return cls(list(new.token_ids), new.num_prompt_tokens, new.sampling_params, new.eos_token_ids, new.seat,
                   len(new.page_ids), new.num_prompt_logprobs, new.prefill_only)

    def apply(self, chunk: ScheduledChunk) -> None:
        """Take the chunk's new token ids (idempotent: they are written at their own index)."""
        if chunk.new_token_ids:
            del self.token_ids[chunk.token_start:]
            self.token_ids.extend(chunk.new_token_ids)

    def inputs(self, start: int, stop: int) -> list[int]:
        """Token ids start..stop-1; those not known yet (in flight) are `INFLIGHT_TOKEN`."""
        known = len(self.token_ids)
        if stop <= known:
            return self.token_ids[start:stop]
        return self.token_ids[start:known] + [INFLIGHT_TOKEN] * (stop - max(start, known))

    def row_context(self, chunk: ScheduledChunk) -> RowContext | None:
        """What the sampler needs beyond the logits (None: nothing). Penalties read the output's
        values, so a request with one never has a token in flight here (the engine sends it
        first); the length counts tokens in flight."""
        p = self.params
        if not p.needs_row_context:
            return None
        stops = frozenset(p.stop_token_ids or ()) | (frozenset() if p.ignore_eos else self.eos_token_ids)
        return RowContext(
            seen_token_ids=self.token_ids if p.repetition_penalty != 1.0 else (),
            output_token_ids=self.token_ids[self.num_prompt_tokens:] if p.presence_penalty or p.frequency_penalty
            else (),
            num_generated=chunk.start + chunk.num_tokens - self.num_prompt_tokens,
            stop_token_ids=stops if p.min_tokens else frozenset(),
        )


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        backend: AttentionBackend,
        page_size: int,
        device: torch.device,
        seed: int,
    ) -> None:
        self.model = model
        self.backend = backend
        self.page_size = page_size
        self.device = device
        self.sampler = Sampler(device, seed)
        self.graphs: DecodeGraphs | None = None
        """Set by the engine on CUDA: pure decode steps replay captured graphs."""
        self._last: LaunchedStep | None = None
        """The last launched step that sampled (its tokens feed in-flight inputs of the next)."""

        self.requests: dict[str, RequestState] = {}
        self.seat_rows = SeatPageRows()
        """Every seat's page table as rows of one array, kept from the steps' page ids: a step's
        tables are a slice of rows, not a conversion of lists."""
        self.ring_pages = {name: RingPages(geometry, tensors)
                           for name, (tensors, geometry) in backend.cache.seat_pools().items()}
        """Per ring or window pool, the pages each seat holds (taken as its window moves)."""

    @torch.inference_mode()
    def execute(self, step: StepData) -> dict[str, int]:
        """Run the step; return a sampled token per request that samples."""
        return self.launch(step).tokens()

    def update_states(self, step: StepData) -> None:
        """Apply the step's changes to the runner's per-request state: drop ended and preempted
        requests, take new ones whole and running ones' new tokens and pages; then the fork copies.

        A fork's source may have ended in this very step (a shared prefix is released once its
        last sequence forked) and its seat been given to a new request: the ring and window
        pages of fork sources are returned only after the copies."""
        sources = {fork.src_seat for fork in step.forks}
        after_forks: list[int] = []
        for rid in (*step.preempted_ids, *step.finished_ids):
            state = self.requests.pop(rid, None)
            if state is not None:
                self._clear_seat(state.seat, after_forks if state.seat in sources else None)
        for rid in step.finished_ids:
            self.sampler.forget(rid)
            if self.backend.selector is not None:
                self.backend.selector.forget(rid)
        for new in step.new_requests:
            self.requests[new.request_id] = RequestState.of(new)
            self._clear_seat(new.seat, after_forks if new.seat in sources else None)
            self.seat_rows.append(new.seat, 0, new.page_ids)
        for chunk in step.scheduled:
            state = self.requests[chunk.request_id]
            state.apply(chunk)
            if chunk.new_page_ids:
                self.seat_rows.append(state.seat, chunk.page_start, chunk.new_page_ids)
                state.num_pages = chunk.page_start + len(chunk.new_page_ids)
        cache = self.backend.cache
        pools = cache.seat_pools()
        for fork in step.forks:  # queued before the step, after the prefix's own steps
            cache.paged.copy_pages([a for a, _ in fork.page_pairs], [b for _, b in fork.page_pairs])
            for name, pages in self.ring_pages.items():
                pools[name][0].copy_pages(*pages.fork(fork.src_seat, fork.dst_seat, fork.num_tokens))
        for seat in after_forks:
            for pages in self.ring_pages.values():
                pages.release(seat)

    def _clear_seat(self, seat: int, defer_pools: list[int] | None = None) -> None:
        """Drop what a seat holds: its page table row and its ring and window pages (those are
        left for later when `defer_pools` is given: the seat goes on that list)."""
        self.seat_rows.clear(seat)
        if defer_pools is not None:
            defer_pools.append(seat)
            return
        for pages in self.ring_pages.values():
            pages.release(seat)

    @torch.inference_mode()
    def launch(self, step: StepData) -> LaunchedStep:
        """Queue the step on the device and return without waiting for it. An input token that a
        previous launch sampled and the host has not read yet (`INFLIGHT_TOKEN`) is taken from
        that launch's tokens on the device."""
        self.update_states(step)
        chunks = step.scheduled
        states = [self.requests[c.request_id] for c in chunks]
        token_ids: list[int] = []
        positions: list[int] = []
        for c, state in zip(chunks, states):
            token_ids.extend(state.inputs(c.start, c.start + c.num_tokens))
            positions.extend(range(c.start, c.start + c.num_tokens))
        md = self.plan(chunks, states, step.num_decodes)
        backend = self.backend
        backend.prepare(md)
        ids, pos = to_device([np.asarray(token_ids, dtype=np.int64), np.asarray(positions, dtype=np.int64)],
                             self.device)
        self._fill_inflight(ids, token_ids, chunks)
        sampling = [i for i, c in enumerate(chunks) if c.samples]
        # the sampling rows' index, without a copy that would wait for the device
        rows: slice | torch.Tensor = slice(None)
        if len(sampling) != len(chunks):
            rows = to_device([np.asarray(sampling, dtype=np.int64)], self.device)[0]
        graphs = self.graphs
        num_decodes = step.num_decodes
        step_logprobs: StepLogprobs | None = None
        if graphs is not None and num_decodes == len(chunks) and graphs.bucket(num_decodes) is not None:
            mode = backend.selector.mode if backend.selector is not None else "none"
            logits = graphs.run(md, ids, pos, mode)[rows]
            backend.collect_stored_pages(md)
        else:
            def attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> torch.Tensor:
                return backend.forward(q, k, v, layer_idx, md)

            hidden = self.model(ids, pos, attn)
            backend.collect_stored_pages(md)
            step_logprobs = self._prompt_logprobs(hidden, chunks, states)
            if not sampling:
                return self._launched(LaunchedStep.of([], None, step_logprobs))
            ends = md.query_start_loc[1:].long() - 1
            logits = self.model.compute_logits(hidden[ends[rows]])
        if not sampling:
            return self._launched(LaunchedStep([], None))
        ids_ = [chunks[i].request_id for i in sampling]
        params = [states[i].params for i in sampling]
        wants = [j for j, p in enumerate(params) if p.logprobs is not None]
        raw = logits[wants] if wants else None  # a copy (list indexing): masks and penalties come in place
        if step.grammar_bitmask is not None:
            apply_bitmask(logits, step.grammar_bitmask)
        tokens = self.sampler.sample(logits, ids_, params, [states[i].row_context(chunks[i]) for i in sampling])
        if raw is not None:
            if step_logprobs is None:
                step_logprobs = StepLogprobs()
            ks = [params[j].logprobs or 0 for j in wants]
            step_logprobs.sample_ids = [ids_[j] for j in wants]
            step_logprobs.sample_k = ks
            step_logprobs.sample = token_logprobs(raw, tokens[wants], max(ks))
        launched = LaunchedStep.of(ids_, tokens, step_logprobs)
        self._last = launched
        return self._launched(launched)

    def _launched(self, launched: LaunchedStep) -> LaunchedStep:
        launched.page_counts = self.backend.last_page_counts
        return launched

    def _prompt_logprobs(
        self, hidden: torch.Tensor, chunks: Sequence[ScheduledChunk], states: Sequence[RequestState]
    ) -> StepLogprobs | None:
        """Log-probabilities of the prompt tokens that this step's prefill chunks predict, for the
        requests that ask for them: the hidden state at position p scores prompt token p + 1."""
        out: StepLogprobs | None = None
        offset = 0
        for c, state in zip(chunks, states):
            n, start = c.num_tokens, c.start
            k = state.params.prompt_logprobs
            stop = min(start + n, state.num_prompt_tokens - 1)
            if k is not None and stop > start and state.num_prompt_logprobs < state.num_prompt_tokens - 1:
                out = out or StepLogprobs()
                targets = torch.tensor(state.token_ids[start + 1 : stop + 1], device=hidden.device)
                parts = []
                for a in range(0, stop - start, PROMPT_LOGPROB_ROWS):
                    b = min(a + PROMPT_LOGPROB_ROWS, stop - start)
                    logits = self.model.compute_logits(hidden[offset + a : offset + b])
                    parts.append(token_logprobs(logits, targets[a:b], k))
                out.prompt_runs.append((c.request_id, start + 1, stop - start, k))
                out.prompt.append([torch.cat(col) for col in zip(*parts)])
            offset += n
        return out

    def _fill_inflight(self, ids: torch.Tensor, token_ids: list[int], chunks: Sequence[ScheduledChunk]) -> None:
        """Write the ids of in-flight tokens from the last launch's tokens, on the device. Only a
        decoding request's one input token can be in flight (a preempted request is recomputed
        only after its token arrived)."""
        if INFLIGHT_TOKEN not in token_ids:
            return
        last = self._last
        rows = {rid: i for i, rid in enumerate(last.request_ids)} if last is not None else {}
        dst, src = [], []
        flat = 0
        for c in chunks:
            for j in range(c.num_tokens):
                if token_ids[flat + j] == INFLIGHT_TOKEN:
                    row = rows.get(c.request_id)
                    if row is None or last is None or last.device_tokens is None:
                        raise RuntimeError(f"request {c.request_id}: an input token is in flight but "
                                           "the last launched step did not sample it")
                    dst.append(flat + j)
                    src.append(row)
            flat += c.num_tokens
        assert last is not None and last.device_tokens is not None
        dst_t, src_t = to_device([np.asarray(dst, dtype=np.int64), np.asarray(src, dtype=np.int64)], self.device)
        ids[dst_t] = last.device_tokens[src_t]

    def plan(self, chunks: Sequence[ScheduledChunk], states: Sequence[RequestState], num_decodes: int
             ) -> AttentionMetadata:
        """Attention metadata of the step, built once and shared by every layer. The ring and
        window pools' pages: each sequence takes those its row reads and writes, and right after
        the tables are built returns those its next row's window no longer reaches (the device
        runs this step before any later one can reuse them)."""
        seats = [state.seat for state in states]
        width = max(state.num_pages for state in states)
        tables = {}
        for name, pages in self.ring_pages.items():
            for i, (c, seat) in enumerate(zip(chunks, seats)):
                pages.prepare(seat, c.start, c.start + c.num_tokens, prefill=i >= num_decodes)
            tables[name] = pages.rows(seats, width)
            for c, state in zip(chunks, states):
                # a request with two or more known tokens left continues its prefill, else it decodes;
                # a shared prefix keeps its prefill window: each forked sequence's first row (its last
                # prompt token) is a prefill row over it
                end = c.start + c.num_tokens
                pages.trim(state.seat, end, prefill_next=state.prefill_only or len(state.token_ids) - end >= 2)
        return build_metadata(
            query_lens=[c.num_tokens for c in chunks],
            seq_lens=[c.start + c.num_tokens for c in chunks],
            page_tables=self.seat_rows.rows(seats, width),
            num_decodes=num_decodes,
            page_size=self.page_size,
            device=self.device,
            seats=seats,
            ring_table=tables.get("ring"),
            request_ids=[c.request_id for c in chunks],
            window_table=tables.get("window"),
        )
