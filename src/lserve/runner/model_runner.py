"""Runs one engine step on the model: build flat inputs, plan attention, forward, sample.

Knows the model, the KV tensors and the attention backend; knows nothing about tokenizers,
queues or HTTP.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from lserve.attention.backend import AttentionBackend
from lserve.attention.metadata import AttentionMetadata, build_metadata, to_device
from lserve.kv_cache.layout import RingGeometry
from lserve.kv_cache.manager import SeatPageRows
from lserve.model.llama import LlamaForCausalLM
from lserve.request import INFLIGHT_TOKEN, Request
from lserve.runner.cuda_graphs import DecodeGraphs
from lserve.runner.sampler import Sampler


@dataclass
class LaunchedStep:
    """A step queued on the device; `tokens()` waits for it (and nothing launched after it) and
    reads its sampled tokens."""

    request_ids: list[str]
    device_tokens: torch.Tensor | None
    """(len(request_ids),) int64 on the device; None when no request samples."""
    host_tokens: torch.Tensor | None = None
    """On a GPU: a pinned copy of `device_tokens`, filled by a copy queued right after sampling."""
    ready: torch.cuda.Event | None = None
    """Recorded after that copy: waiting on it does not wait for steps launched later."""
    _tokens: dict[str, int] | None = None

    @classmethod
    def of(cls, request_ids: list[str], device_tokens: torch.Tensor) -> LaunchedStep:
        if not device_tokens.is_cuda:
            return cls(request_ids, device_tokens)
        # `.tolist()` on the device tensor would wait for the whole stream, including the step
        # launched after this one: copy now, and wait later for this copy only
        host = torch.empty(device_tokens.shape, dtype=device_tokens.dtype, pin_memory=True)
        host.copy_(device_tokens, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return cls(request_ids, device_tokens, host, ready)

    def tokens(self) -> dict[str, int]:
        if self._tokens is None:
            if self.ready is not None and self.host_tokens is not None:
                self.ready.synchronize()
                values = self.host_tokens.tolist()
            else:
                values = self.device_tokens.tolist() if self.device_tokens is not None else []
            self._tokens = dict(zip(self.request_ids, values))
        return self._tokens


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
        if graphs is not None and num_decodes == len(inputs) and graphs.bucket(num_decodes) is not None:
            mode = backend.selector.mode if backend.selector is not None else "none"
            logits = graphs.run(md, ids, pos, mode)[rows]
            backend.collect_stored_pages(md)
        else:
            def attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> torch.Tensor:
                return backend.forward(q, k, v, layer_idx, md)

            hidden = self.model(ids, pos, attn)
            backend.collect_stored_pages(md)
            if not sampling:
                return LaunchedStep([], None)
            ends = md.query_start_loc[1:].long() - 1
            logits = self.model.compute_logits(hidden[ends[rows]])
        if not sampling:
            return LaunchedStep([], None)
        reqs = [inputs[i].request for i in sampling]
        tokens = self.sampler.sample(
            logits,
            [r.request_id for r in reqs],
            [r.sampling_params for r in reqs],
            [r.all_token_ids if r.sampling_params.repetition_penalty != 1.0 else () for r in reqs],
        )
        step = LaunchedStep.of([r.request_id for r in reqs], tokens)
        self._last = step
        return step

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
        )
