"""Exact attention over the paged KV cache in plain PyTorch: the reference backend, any device.

Decodes are batched: their pages are gathered into one padded tensor and attended in one call.
Prefill chunks go one sequence at a time: the chunk's queries see every cached token and,
causally, each other. Key statistics and page scores for page selection are plain tensor ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lserve.attention.backend import AttentionBackend, PoolCall
from lserve.attention.metadata import AttentionMetadata
from lserve.kv_cache.fp8 import FP8_DTYPE, SCALE_DTYPE, as_bytes, dequantize, quantize, write_rows


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> None:
    """Scatter new k, v (T, Hkv, D) into (num_pages, page_size, Hkv, D) caches at flat slots (T,);
    FP8 caches (with their (num_pages, Hkv, page_size) scales) take them quantized."""
    write_rows(k_cache, k_scale, k, slots)
    write_rows(v_cache, v_scale, v, slots)


def gather_pages(cache: torch.Tensor, page_table: torch.Tensor, length: int) -> torch.Tensor:
    """(num_pages, page_size, H, D) cache, (B, P) table -> (B, H, length, D), padded past each sequence."""
    b = page_table.shape[0]
    # index_select copies whole pages with memcpy; advanced indexing is several times slower on CPU.
    pages = cache.index_select(0, page_table.reshape(-1))  # (B * P, page_size, H, D)
    flat = pages.view(b, -1, *cache.shape[2:])[:, :length]
    return flat.transpose(1, 2)


def gather_kv(
    call: PoolCall, page_table: torch.Tensor, length: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """A pool's keys and values over `page_table` (B, P): (B, H, length, D) each, in `dtype`
    (an FP8 pool's dequantized)."""
    keys = gather_pages(call.k_cache, page_table, length)
    values = gather_pages(call.v_cache, page_table, length)
    if call.k_scale is None or call.v_scale is None:
        return keys, values
    return (dequantize(keys, gather_scales(call.k_scale, page_table, length), dtype),
            dequantize(values, gather_scales(call.v_scale, page_table, length), dtype))


def gather_scales(scales: torch.Tensor, page_table: torch.Tensor, length: int) -> torch.Tensor:
    """(num_pages, H, page_size) FP8 scales, (B, P) table -> (B, H, length), as `gather_pages`."""
    b = page_table.shape[0]
    pages = scales.index_select(0, page_table.reshape(-1))  # (B * P, H, page_size)
    return pages.view(b, -1, *scales.shape[1:]).transpose(1, 2).reshape(b, scales.shape[1], -1)[:, :, :length]


def window_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, sink: int, local: int) -> torch.Tensor:
    """(Q, K) bool: the streaming heads' Λ mask, causal included."""
    i, j = q_pos[:, None], k_pos[None, :]
    return (j <= i) & ((j < sink) | (i - j < local))


def listed_pages_mask(page_list: torch.Tensor, page_len: torch.Tensor, page_size: int, length: int) -> torch.Tensor:
    """(B, H, max_list) logical pages with (B, H) counts -> (B, H, length) bool over key positions."""
    b, h, width = page_list.shape
    npages = -(-length // page_size)
    used = torch.arange(width, device=page_list.device)[None, None, :] < page_len[:, :, None]
    allowed = torch.zeros((b, h, npages + 1), dtype=torch.bool, device=page_list.device)
    idx = torch.where(used, page_list.long().clamp(0, npages - 1), npages)  # unused entries hit a spare column
    allowed.scatter_(2, idx, True)
    return allowed[:, :, :npages].repeat_interleave(page_size, dim=2)[:, :, :length]


def update_key_stats(k_min: torch.Tensor, k_max: torch.Tensor, k: torch.Tensor, slots: torch.Tensor, logical: int) -> None:
    """Channel-wise key min/max per logical page for new keys k (T, H, D) at `slots` (T,).

    A logical page whose first slot is written in this batch starts afresh (whatever its
    statistics held belonged to an earlier owner of the page); the others merge."""
    rows = slots // logical
    fresh = rows[slots % logical == 0]
    if fresh.numel():
        k_min.index_fill_(0, fresh, float("inf"))
        k_max.index_fill_(0, fresh, float("-inf"))
    idx = rows.view(-1, 1, 1).expand_as(k)
    k_min.scatter_reduce_(0, idx, k.to(k_min.dtype), "amin", include_self=True)
    k_max.scatter_reduce_(0, idx, k.to(k_max.dtype), "amax", include_self=True)


def write_labels(
    k_label: torch.Tensor, channels: torch.Tensor, k: torch.Tensor, slots: torch.Tensor,
    scale: torch.Tensor | None = None,
) -> None:
    """Key labels of new keys k (T, H, D) at `slots` (T,): k_label (H, slots, r)[h, slot] = k[t, h, channels[h]];
    FP8 labels (with their (H, slots) `scale`) quantized as `kv_cache.fp8.quantize` over the r channels."""
    idx = channels.long()[None].expand(k.shape[0], -1, -1)  # (T, H, r)
    labels = torch.gather(k, 2, idx).transpose(0, 1)  # (H, T, r)
    if scale is not None:
        labels, row_scales = quantize(labels)
        scale.index_copy_(1, slots, row_scales)
    as_bytes(k_label).index_copy_(1, slots, as_bytes(labels.to(k_label.dtype)))


def empty_labels(heads: int, slots: int, r: int, fp8: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Zeroed key labels (heads, slots, r) for `write_labels`: float32, or E4M3 with their (heads, slots)
    float32 scales (`fp8`, the engine's `label_dtype="fp8"`)."""
    if not fp8:
        return torch.zeros((heads, slots, r), dtype=torch.float32), None
    return torch.zeros((heads, slots, r), dtype=FP8_DTYPE), torch.zeros((heads, slots), dtype=SCALE_DTYPE)


def read_labels(k_label: torch.Tensor, scale: torch.Tensor | None, slots: torch.Tensor) -> torch.Tensor:
    """The labels at `slots` (any shape) as float32 (H, *slots.shape, r), FP8 ones times their scales."""
    labels = k_label[:, slots].float()
    return labels * scale[:, slots, None] if scale is not None else labels


def channel_page_scores_torch(
    q: torch.Tensor, k_label: torch.Tensor, channels: torch.Tensor, page_table: torch.Tensor, seq_lens: torch.Tensor,
    page_size: int, aggregate: str = "sum", mass: bool = False, label_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Channel scores as `ops.page_scores.channel_page_scores` (`mass`: the rope_mass estimate):
    q (B, Hq, D) -> (B, Hkv, P) float32; FP8 labels take their `label_scale` (Hkv, slots)."""
    bsz, hq, d = q.shape
    hkv, _, r = k_label.shape
    width = page_table.shape[1]
    qc = torch.gather(q.view(bsz, hkv, hq // hkv, d).float(), 3,
                      channels.long()[None, :, None, :].expand(bsz, -1, hq // hkv, -1))  # (B, H, G, r)
    slots = page_table.long()[:, :, None] * page_size + torch.arange(page_size, device=q.device)  # (B, P, page)
    labels = read_labels(k_label, label_scale, slots)  # (H, B, P, page, r)
    pos = torch.arange(width * page_size, device=q.device).view(width, page_size)
    valid = pos[None] < seq_lens.view(-1, 1, 1)  # (B, P, page)
    if mass:
        qg = q.view(bsz, hkv, hq // hkv, d).float()
        tau = (d * qc.abs().sum(3) / qg.abs().sum(3).clamp_min(1e-30)).sqrt().clamp_min(1e-20)  # (B, H, G)
        s = torch.einsum("hbptr,bhgr->bhgpt", labels, qc) / tau[..., None, None]
        s = s.masked_fill(~valid[:, None, None], float("-inf"))
        return torch.logsumexp(s.transpose(2, 3).flatten(3), dim=3)  # over the group and the page's tokens
    if aggregate == "sum":
        s = torch.einsum("hbptr,bhr->bhpt", labels, qc.sum(2))
    else:
        s = torch.einsum("hbptr,bhgr->bhgpt", labels, qc).amax(2)
    return s.masked_fill(~valid[:, None], float("-inf")).amax(3)


def page_scores_torch(
    q: torch.Tensor, k_min: torch.Tensor, k_max: torch.Tensor, page_table: torch.Tensor, seq_lens: torch.Tensor,
    page_size: int, logical: int, aggregate: str = "max", midrange: bool = False,
) -> torch.Tensor:
    """Quest (or midrange) scores as `ops.page_scores.page_scores`: q (B, Hq, D) -> (B, Hkv, P)
    float32, -inf past each sequence."""
    bsz, hq, d = q.shape
    hkv = k_min.shape[1]
    sub = page_size // logical
    width = page_table.shape[1]
    rows = page_table.long()[:, :, None] * sub + torch.arange(sub, device=q.device)  # (B, P, sub)
    kmax = k_max[rows].float()  # (B, P, sub, H, D)
    kmin = k_min[rows].float()
    qg = q.view(bsz, hkv, hq // hkv, d).float()
    if midrange:
        s = torch.einsum("bhgd,bpshd->bhgps", qg * 0.5, kmax + kmin)
    else:
        s = (torch.einsum("bhgd,bpshd->bhgps", qg.clamp(min=0), kmax)
             + torch.einsum("bhgd,bpshd->bhgps", qg.clamp(max=0), kmin))
    agg = s.amax(dim=2) if aggregate == "max" else s.sum(dim=2)  # (B, H, P, sub)
    start = (torch.arange(width, device=q.device)[:, None] * page_size
             + torch.arange(sub, device=q.device)[None, :] * logical)  # (P, sub)
    valid = start[None] < seq_lens.view(-1, 1, 1)
    return agg.masked_fill(~valid[:, None], float("-inf")).amax(dim=3)


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def _write(self, call: PoolCall, k: torch.Tensor, v: torch.Tensor, md: AttentionMetadata) -> None:
        write_kv(call.k_cache, call.v_cache, k, v, call.slot_mapping, call.k_scale, call.v_scale)
        if call.k_label is not None and call.label_channels is not None:
            write_labels(call.k_label, call.label_channels, k, call.slot_mapping, call.label_scale)
        elif call.k_min is not None and call.k_max is not None:
            logical = self.cache.paged.logical_page_size
            assert logical is not None
            update_key_stats(call.k_min, call.k_max, k, call.slot_mapping, logical)

    def _page_scores(
        self, call: PoolCall, q: torch.Tensor, page_table: torch.Tensor, seq_lens: torch.Tensor, page_size: int,
        kv_heads: torch.Tensor | None = None,
    ) -> torch.Tensor:
        assert self.selector is not None
        # this backend gathers a pool's heads before attending (`_attend_heads`): q holds only them
        assert kv_heads is None, "the torch backend scores gathered heads"
        aggregate = self.selector.aggregate
        if call.k_label is not None and call.label_channels is not None:
            return channel_page_scores_torch(q, call.k_label, call.label_channels, page_table, seq_lens, page_size,
                                             aggregate, mass=self.selector.score == "rope_mass",
                                             label_scale=call.label_scale)
        logical = self.cache.paged.logical_page_size
        assert logical is not None and call.k_min is not None and call.k_max is not None
        return page_scores_torch(q, call.k_min, call.k_max, page_table, seq_lens, page_size, logical, aggregate,
                                 midrange=self.selector.score == "midrange")

    def _prefill(
        self, call: PoolCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, md: AttentionMetadata,
        out: torch.Tensor,
    ) -> None:
        start = md.num_decodes
        for i in range(md.num_decodes, md.num_seqs):
            qlen, slen = md.query_lens_cpu[i], md.seq_lens_cpu[i]
            chunk = slice(start, start + qlen)
            out[chunk] = self._prefill_seq(call, q[chunk], k[chunk], v[chunk], md, i, slen)
            start += qlen

    def _head_groups(self, streaming: torch.Tensor | None) -> list[tuple[bool, torch.Tensor | None]]:
        """[(is_streaming, KV head indices or None for all)]: one SDPA call per head kind."""
        if streaming is None:
            return [(False, None)]
        kv_heads = torch.arange(streaming.shape[0], device=streaming.device)
        return [(kind, kv_heads[streaming == kind]) for kind in (False, True) if bool((streaming == kind).any())]

    def _q_heads(self, kv_idx: torch.Tensor, num_kv_heads: int, num_q_heads: int) -> torch.Tensor:
        group = num_q_heads // num_kv_heads
        return (kv_idx[:, None] * group + torch.arange(group, device=kv_idx.device)[None, :]).reshape(-1)

    def _decode(
        self, call: PoolCall, q: torch.Tensor, md: AttentionMetadata, lists: tuple[torch.Tensor, torch.Tensor] | None
    ) -> torch.Tensor:
        if call.window is not None:
            return self._decode_window(call, q, md)
        n = md.num_decodes
        length = max(md.seq_lens_cpu[:n])
        npages = -(-length // md.page_size)
        keys, values = gather_kv(call, call.page_table[:n, :npages], length, q.dtype)
        pos = torch.arange(length, device=q.device)
        ragged = min(md.seq_lens_cpu[:n]) != length
        if ragged:
            # The padded slots (page 0, the unwritten tail of a last page) may hold anything, NaN
            # included, and a masked NaN still poisons the output (NaN - inf, 0 * NaN): zero them.
            # Only the pad region is touched, and only in the gathered copies, never in the cache.
            for i, seq_len in enumerate(md.seq_lens_cpu[:n]):
                if seq_len < length:
                    keys[i, :, seq_len:] = 0
                    values[i, :, seq_len:] = 0
        valid = pos[None, :] < md.seq_lens[:n, None]  # (n, L)
        streaming = call.streaming
        if streaming is None and lists is None:  # plain dense decode: one call
            mask = valid.view(n, 1, 1, length) if ragged else None
            o = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=mask, scale=self.scale,
                                               enable_gqa=True)
            return o.squeeze(2)
        out = torch.empty_like(q)
        hkv = keys.shape[1]
        sink, local = self.windows(call, decode=True)
        for is_stream, kv_idx in self._head_groups(streaming):
            kv_idx = kv_idx if kv_idx is not None else torch.arange(hkv, device=q.device)
            q_idx = self._q_heads(kv_idx, hkv, q.shape[1])
            mask = valid[:, None, :]  # (n, 1, L)
            if is_stream:
                last = (md.seq_lens[:n] - 1)[:, None]
                win = (pos[None, :] < sink) | (last - pos[None, :] < local)
                mask = mask & win[:, None, :]
            elif lists is not None:
                allowed = listed_pages_mask(lists[0][:, kv_idx], lists[1][:, kv_idx], md.page_size, length)
                mask = mask & allowed  # (n, h, L)
            mask = mask.repeat_interleave(len(q_idx) // mask.shape[1], dim=1)[:, :, None, :]
            o = F.scaled_dot_product_attention(q[:, q_idx].unsqueeze(2), keys[:, kv_idx], values[:, kv_idx],
                                               attn_mask=mask, scale=self.scale, enable_gqa=True)
            out[:, q_idx] = o.squeeze(2).nan_to_num(0.0)  # a row with no listed key reads nothing
        return out

    def _decode_window(self, call: PoolCall, q: torch.Tensor, md: AttentionMetadata) -> torch.Tensor:
        """Decode rows of a sliding-window layer: each row gathers only the pages its window
        covers (a fixed count), so the cost does not grow with the context."""
        n, page = md.num_decodes, md.page_size
        sink, local = call.window  # type: ignore[misc]
        assert sink == 0, "sliding windows have no sink"
        lens = md.seq_lens[:n].long()
        width = -(-local // page) + 1  # a window of `local` tokens touches at most this many pages
        first = (lens - local).clamp(min=0) // page
        idx = first[:, None] + torch.arange(width, device=q.device)[None, :]  # (n, width) logical pages
        used = idx < (lens[:, None] + page - 1) // page
        pages = torch.gather(call.page_table[:n].long(), 1, idx.clamp(max=call.page_table.shape[1] - 1))
        keys, values = gather_kv(call, torch.where(used, pages, 0), width * page, q.dtype)
        pos = (idx[:, :, None] * page + torch.arange(page, device=q.device)).reshape(n, -1)  # (n, width * page)
        visible = used.repeat_interleave(page, dim=1) & (pos < lens[:, None]) & (lens[:, None] - 1 - pos < local)
        # unread slots may hold anything, NaN included: zero them in the gathered copies
        keys = keys.masked_fill(~visible[:, None, :, None], 0.0)
        values = values.masked_fill(~visible[:, None, :, None], 0.0)
        o = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=visible[:, None, None, :],
                                           scale=self.scale, enable_gqa=True)
        return o.squeeze(2)

    def _prefill_seq(
        self, call: PoolCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, md: AttentionMetadata,
        seq: int, seq_len: int,
    ) -> torch.Tensor:
        qlen = q.shape[0]
        qh = q.transpose(0, 1).unsqueeze(0)  # (1, Hq, qlen, D)
        # a sliding-window layer's chunk sees nothing before its first query's window: read from there
        first_page = 0
        if call.window is not None and call.window[0] == 0:
            first_page = max(seq_len - qlen - call.window[1] + 1, 0) // md.page_size
        if qlen == seq_len and call.k_scale is None:  # no cached prefix: the new K/V are the whole sequence
            keys, values = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)
        else:  # (an FP8 pool's chunk attends to its stored, quantized K/V, as the Triton kernel does)
            npages = -(-seq_len // md.page_size)
            table = call.page_table[seq : seq + 1, first_page:npages]
            keys, values = gather_kv(call, table, seq_len - first_page * md.page_size, q.dtype)
        qpos = torch.arange(seq_len - qlen, seq_len, device=q.device)
        kpos = torch.arange(first_page * md.page_size if qlen != seq_len else 0, seq_len, device=q.device)
        hkv = keys.shape[1]
        out = torch.empty_like(qh)
        sink, local = self.windows(call, decode=False)
        for is_stream, kv_idx in self._head_groups(call.streaming):
            if is_stream:
                mask = window_mask(qpos, kpos, sink, local)
                causal = False
            else:
                causal = qlen == seq_len  # SDPA's own causal mask is aligned to the first key
                mask = None if causal else kpos[None, :] <= qpos[:, None]
            if kv_idx is None:
                q_sel, k_sel, v_sel = qh, keys, values
            else:
                q_idx = self._q_heads(kv_idx, hkv, q.shape[1])
                q_sel, k_sel, v_sel = qh[:, q_idx], keys[:, kv_idx], values[:, kv_idx]
            o = F.scaled_dot_product_attention(q_sel, k_sel, v_sel, attn_mask=mask, is_causal=causal,
                                               scale=self.scale, enable_gqa=True)
            if kv_idx is None:
                out = o
            else:
                out[:, q_idx] = o
        return out[0].transpose(0, 1)
