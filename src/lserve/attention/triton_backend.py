"""Attention with lserve's Triton kernels: KV append, block-sparse prefill, split-K decode.

The default backend on CUDA. Per step, `prepare` plans the prefill query tiles once; every layer
then appends its K/V and runs the decode rows and the prefill rows of the flat batch.
"""

from __future__ import annotations

import torch

from lserve.attention.backend import AttentionBackend
from lserve.attention.metadata import AttentionMetadata
from lserve.ops.kv_append import kv_append
from lserve.ops.sparse_decode import sparse_decode
from lserve.ops.sparse_prefill import PrefillTiles, plan_tiles, sparse_prefill


# Tuned on an H200 (benchmarks/attention_kernels.py --sweep, head dim 128, bf16): on Hopper the
# prefill reads K/V pages through tensor descriptors (the bulk copy engine), one page per KV tile;
# older GPUs gather rows with ordinary loads. The CPU interpreter keeps the defaults.
HOPPER_PREFILL = dict(block_n=64, num_warps=4, num_stages=2, use_tma=True)
GPU_PREFILL = dict(block_n=128, num_warps=8, num_stages=2)
GPU_DECODE = dict(block_n=128, num_warps=4, num_stages=3)


def prefill_config(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    return HOPPER_PREFILL if torch.cuda.get_device_capability(device)[0] >= 9 else GPU_PREFILL


def prefill_block_m(device: torch.device) -> int:
    """Query rows per prefill tile."""
    return 128 if device.type == "cuda" else 16


class TritonAttentionBackend(AttentionBackend):
    name = "triton"

    _tiles: PrefillTiles | None = None
    _prefill_kw: dict | None = None

    def prepare(self, md: AttentionMetadata) -> None:
        device = md.seq_lens.device
        if self._prefill_kw is None:
            self._prefill_kw = prefill_config(device)
        prefill_lens = list(md.query_lens_cpu[md.num_decodes :])
        self._tiles = plan_tiles(prefill_lens, prefill_block_m(device), device, first_seq=md.num_decodes)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_idx: int, md: AttentionMetadata
    ) -> torch.Tensor:
        k_cache, v_cache = self.kv.k[layer_idx], self.kv.v[layer_idx]
        kv_append(k, v, md.slot_mapping, k_cache, v_cache)
        streaming = self._streaming[layer_idx]
        sp = self.sparsity
        out = torch.empty_like(q)
        nd = md.num_decodes
        if nd:
            out[:nd] = sparse_decode(
                q[:nd], k_cache, v_cache, md.page_table[:nd], md.seq_lens[:nd], self.scale,
                streaming_heads=streaming, sink=sp.decode_sink if sp else 0, local=sp.decode_local if sp else 0,
                page_list=md.decode_page_list, page_list_len=md.decode_page_list_len,
                max_seq_len=max(md.seq_lens_cpu[:nd]), **(GPU_DECODE if q.is_cuda else {}),
            )
        if md.num_prefills:
            assert self._tiles is not None, "prepare() was not called for this step"
            sparse_prefill(
                q, k_cache, v_cache, md.page_table, md.seq_lens, md.query_start_loc, self._tiles, self.scale,
                streaming_heads=streaming, sink=sp.prefill_sink if sp else 0, local=sp.prefill_local if sp else 0,
                out=out, **(self._prefill_kw or {}),
            )
        return out
