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
from lserve.attention.metadata import AttentionMetadata, build_metadata
from lserve.kv_cache.layout import RingGeometry
from lserve.kv_cache.manager import SeatPageRows
from lserve.model.llama import LlamaForCausalLM
from lserve.request import Request
from lserve.runner.cuda_graphs import DecodeGraphs
from lserve.runner.sampler import Sampler


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

    @torch.inference_mode()
    def execute(self, inputs: Sequence[StepInput], num_decodes: int) -> dict[str, int]:
        """Run the scheduled tokens (decodes first); return a sampled token per request that samples."""
        token_ids: list[int] = []
        positions: list[int] = []
        for s in inputs:
            start = s.request.num_computed_tokens
            token_ids.extend(s.request.token_ids(start, start + s.num_new_tokens))
            positions.extend(range(start, start + s.num_new_tokens))
        md = self.plan(inputs, num_decodes)
        backend = self.backend
        backend.prepare(md)
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        sampling = [i for i, s in enumerate(inputs) if s.samples]
        graphs = self.graphs
        if graphs is not None and num_decodes == len(inputs) and graphs.bucket(num_decodes) is not None:
            mode = backend.selector.mode if backend.selector is not None else "none"
            logits = graphs.run(md, ids, pos, mode)[sampling]
        else:
            def attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> torch.Tensor:
                return backend.forward(q, k, v, layer_idx, md)

            hidden = self.model(ids, pos, attn)
            if not sampling:
                return {}
            ends = md.query_start_loc[1:].long() - 1
            logits = self.model.compute_logits(hidden[ends[sampling]])
        if not sampling:
            return {}
        reqs = [inputs[i].request for i in sampling]
        tokens = self.sampler.sample(
            logits,
            [r.request_id for r in reqs],
            [r.sampling_params for r in reqs],
            [r.all_token_ids if r.sampling_params.repetition_penalty != 1.0 else () for r in reqs],
        )
        return {r.request_id: t for r, t in zip(reqs, tokens)}

    def plan(self, inputs: Sequence[StepInput], num_decodes: int) -> AttentionMetadata:
        """Attention metadata of the step, built once and shared by every layer."""
        seats = [s.seat for s in inputs]
        tables: list[list[int]] | np.ndarray = [s.page_ids for s in inputs]
        if self.page_rows is not None:
            tables = self.page_rows.rows(seats, max(len(s.page_ids) for s in inputs))
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
