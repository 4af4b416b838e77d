"""Exact attention over the paged KV cache in plain PyTorch: the reference backend, any device.

Decodes are batched: their pages are gathered into one padded tensor and attended in one call.
Prefill chunks go one sequence at a time: the chunk's queries see every cached token and,
causally, each other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lserve.attention.backend import AttentionBackend
from lserve.attention.metadata import AttentionMetadata


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor
) -> None:
    """Scatter new k, v (T, Hkv, D) into (num_pages, page_size, Hkv, D) caches at flat slots (T,)."""
    num_pages, page_size = k_cache.shape[:2]
    k_cache.view(num_pages * page_size, *k_cache.shape[2:]).index_copy_(0, slots, k)
    v_cache.view(num_pages * page_size, *v_cache.shape[2:]).index_copy_(0, slots, v)


def gather_pages(cache: torch.Tensor, page_table: torch.Tensor, length: int) -> torch.Tensor:
    """(num_pages, page_size, H, D) cache, (B, P) table -> (B, H, length, D), padded past each sequence."""
    b = page_table.shape[0]
    # index_select copies whole pages with memcpy; advanced indexing is several times slower on CPU.
    pages = cache.index_select(0, page_table.reshape(-1))  # (B * P, page_size, H, D)
    flat = pages.view(b, -1, *cache.shape[2:])[:, :length]
    return flat.transpose(1, 2)


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_idx: int, md: AttentionMetadata
    ) -> torch.Tensor:
        k_cache, v_cache = self.kv.k[layer_idx], self.kv.v[layer_idx]
        write_kv(k_cache, v_cache, k, v, md.slot_mapping)
        out = torch.empty_like(q)
        if md.num_decodes:
            out[: md.num_decodes] = self._decode(q[: md.num_decodes], k_cache, v_cache, md)
        start = md.num_decodes
        for i in range(md.num_decodes, md.num_seqs):
            qlen, slen = md.query_lens_cpu[i], md.seq_lens_cpu[i]
            chunk = slice(start, start + qlen)
            out[chunk] = self._prefill(q[chunk], k[chunk], v[chunk], k_cache, v_cache, md, i, slen)
            start += qlen
        return out

    def _decode(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, md: AttentionMetadata
    ) -> torch.Tensor:
        n = md.num_decodes
        length = max(md.seq_lens_cpu[:n])
        npages = -(-length // md.page_size)
        table = md.page_table[:n, :npages]
        keys = gather_pages(k_cache, table, length)
        values = gather_pages(v_cache, table, length)
        mask = None
        if min(md.seq_lens_cpu[:n]) != length:  # padding to hide past the shorter sequences
            pos = torch.arange(length, device=q.device)
            mask = (pos[None, :] < md.seq_lens[:n, None]).view(n, 1, 1, length)
            # The padded slots (page 0, the unwritten tail of a last page) may hold anything, NaN
            # included, and a masked NaN still poisons the output (NaN - inf, 0 * NaN): zero them.
            # Only the pad region is touched, and only in the gathered copies, never in the cache.
            for i, seq_len in enumerate(md.seq_lens_cpu[:n]):
                if seq_len < length:
                    keys[i, :, seq_len:] = 0
                    values[i, :, seq_len:] = 0
        o = F.scaled_dot_product_attention(
            q.unsqueeze(2), keys, values, attn_mask=mask, scale=self.scale, enable_gqa=True
        )  # (n, Hq, 1, D)
        return o.squeeze(2)

    def _prefill(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        md: AttentionMetadata,
        seq: int,
        seq_len: int,
    ) -> torch.Tensor:
        qlen = q.shape[0]
        qh = q.transpose(0, 1).unsqueeze(0)  # (1, Hq, qlen, D)
        if qlen == seq_len:  # no cached prefix: the new K/V are the whole sequence, no gather needed
            keys, values = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qh, keys, values, is_causal=True, scale=self.scale, enable_gqa=True)
        else:
            npages = -(-seq_len // md.page_size)
            table = md.page_table[seq : seq + 1, :npages]
            keys = gather_pages(k_cache, table, seq_len)
            values = gather_pages(v_cache, table, seq_len)
            qpos = torch.arange(seq_len - qlen, seq_len, device=q.device)
            kpos = torch.arange(seq_len, device=q.device)
            mask = kpos[None, :] <= qpos[:, None]
            o = F.scaled_dot_product_attention(qh, keys, values, attn_mask=mask, scale=self.scale, enable_gqa=True)
        return o[0].transpose(0, 1)
