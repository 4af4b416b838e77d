"""Block-sparse paged prefill: FlashAttention-2 online softmax over a list of KV pages per query tile.

A program owns one (query tile, query head) of a varlen batch: BLOCK_M consecutive new tokens of
one sequence (a prefill chunk; the chunk's K/V are already in the cache, after its cached prefix).
KV tiles are BLOCK_N keys (one page or several, looked up per key row). What a program visits:
- dense heads: every tile up to the diagonal, the causal mask only on the tiles that cross it;
- streaming heads: the sink tiles, then the tiles of the local window, with the exact token mask
  j <= i and (j < sink or i - j < local);
- with an explicit page list (per query tile and KV head): the listed pages, causal mask.
Dense and streaming heads run in the same launch; the per-step plan (`plan_tiles`) only says
which sequence and rows each tile covers. Reference: `ops.reference.sparse_prefill_ref`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from lserve.ops.paged_inputs import check_paged_attention, pack_sparse_args


@dataclass(frozen=True)
class PrefillTiles:
    """Query tiles of a step: tile i covers rows row_start[i].. of sequence seq[i]'s new tokens."""

    seq: torch.Tensor
    """(num_tiles,) int32"""
    row_start: torch.Tensor
    """(num_tiles,) int32"""
    num_tiles: int
    block_m: int


def plan_tiles(query_lens: list[int], block_m: int, device: torch.device, first_seq: int = 0) -> PrefillTiles:
    """Cut every sequence's new tokens into tiles of `block_m` rows (host lists -> two small tensors)."""
    seq, rows = [], []
    for i, n in enumerate(query_lens):
        for r in range(0, n, block_m):
            seq.append(first_seq + i)
            rows.append(r)
    return PrefillTiles(
        torch.tensor(seq, dtype=torch.int32, device=device),
        torch.tensor(rows, dtype=torch.int32, device=device),
        len(seq),
        block_m,
    )


@triton.jit
def _attend_tile(
    acc, m_i, l_i, q, kc_ptr, vc_ptr, page_row_ptr, t, q_pos, seq_len, sink, local, kvh, qk_scale,
    stride_cp, stride_ct, stride_ch,
    HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, TILE: tl.constexpr, CAUSAL: tl.constexpr,
    streaming, USE_TMA: tl.constexpr,
):
    """Online-softmax update of one query tile with KV tile `t` (keys t*TILE..; a tile spans
    TILE / PAGE_SIZE pages, looked up per key row). Scores are in log2 units."""
    d = tl.arange(0, HEAD_DIM)
    k_pos = t * TILE + tl.arange(0, TILE)
    if USE_TMA:  # one page per tile, fetched by the bulk tensor copy engine (kc_ptr is a descriptor)
        page = tl.load(page_row_ptr + t)
        k = kc_ptr.load([page * PAGE_SIZE, kvh * HEAD_DIM])
        v = vc_ptr.load([page * PAGE_SIZE, kvh * HEAD_DIM])
        if CAUSAL:  # a page on the diagonal may end past the sequence: drop its unwritten tail
            kv_ok = (k_pos < seq_len)[:, None]
            k = tl.where(kv_ok, k, 0.0)
            v = tl.where(kv_ok, v, 0.0)
    else:
        page = tl.load(page_row_ptr + k_pos // PAGE_SIZE, mask=k_pos < seq_len, other=0).to(tl.int64)
        addr = page * stride_cp + (k_pos % PAGE_SIZE) * stride_ct + kvh * stride_ch
        if CAUSAL:  # a page on the diagonal may end past the sequence: its unwritten tail is never read
            kv_ok = (k_pos < seq_len)[:, None]
            k = tl.load(kc_ptr + addr[:, None] + d[None, :], mask=kv_ok, other=0.0)
            v = tl.load(vc_ptr + addr[:, None] + d[None, :], mask=kv_ok, other=0.0)
        else:
            k = tl.load(kc_ptr + addr[:, None] + d[None, :])
            v = tl.load(vc_ptr + addr[:, None] + d[None, :])
    s = tl.dot(q, tl.trans(k)) * qk_scale
    if CAUSAL:
        visible = k_pos[None, :] <= q_pos[:, None]
        in_window = (k_pos[None, :] < sink) | (q_pos[:, None] - k_pos[None, :] < local)
        visible = visible & (in_window | (streaming == 0))
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    if CAUSAL:  # a row may see nothing yet: keep exp2 away from (-inf) - (-inf)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_safe = m_new
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@triton.jit
def _prefill_kernel(
    q_ptr, kc_ptr, vc_ptr, out_ptr, page_table_ptr, seq_lens_ptr, qsl_ptr, tile_seq_ptr, tile_row_ptr,
    stream_ptr, list_ptr, list_len_ptr, head_map_ptr,
    sink, local, qk_scale,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cp, stride_ct, stride_ch, stride_pt_b, stride_list_t, stride_list_h, stride_len_t,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr,
    HAS_STREAM: tl.constexpr, HAS_LIST: tl.constexpr, HAS_MAP: tl.constexpr,
):
    tile = tl.num_programs(0) - 1 - tl.program_id(0)  # long tiles first: a shorter tail
    kvh = tl.program_id(1) // GROUP  # the cache's KV head
    if HAS_MAP:  # the cache holds some of the model's heads: q and out rows are the model's
        head = tl.load(head_map_ptr + kvh) * GROUP + tl.program_id(1) % GROUP
    else:
        head = tl.program_id(1)
    s_idx = tl.load(tile_seq_ptr + tile)
    row0 = tl.load(tile_row_ptr + tile)
    q_start = tl.load(qsl_ptr + s_idx)
    q_len = tl.load(qsl_ptr + s_idx + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + s_idx)
    ctx = seq_len - q_len
    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len
    q_pos = ctx + rows
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + (q_start + rows)[:, None] * stride_qt + head * stride_qh + d[None, :],
                mask=row_ok[:, None], other=0.0)
    page_row_ptr = page_table_ptr + s_idx * stride_pt_b
    first_pos = ctx + row0
    last_pos = ctx + tl.minimum(row0 + BLOCK_M, q_len) - 1
    num_tiles = last_pos // BLOCK_N + 1
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    is_stream = False
    if HAS_STREAM:
        is_stream = tl.load(stream_ptr + kvh) != 0
    if HAS_LIST:  # tiles are the listed pages
        n_list = tl.load(list_len_ptr + tile * stride_len_t + kvh)
        for idx in range(0, n_list):
            t = tl.load(list_ptr + tile * stride_list_t + kvh * stride_list_h + idx)
            acc, m_i, l_i = _attend_tile(
                acc, m_i, l_i, q, kc_ptr, vc_ptr, page_row_ptr, t, q_pos, seq_len, sink, local, kvh, qk_scale,
                stride_cp, stride_ct, stride_ch, HEAD_DIM, PAGE_SIZE, PAGE_SIZE, True, False, USE_TMA)
    else:
        # Two loops serve both head kinds (fewer loops: less shared memory for the pipeliner):
        # tiles every row of the query tile sees whole go unmasked; the rest go through the masked
        # loop, walked as up to three ranges A, B, C with jumps between them.
        # Dense heads: unmasked [0, full), masked C = the diagonal tiles.
        # Streaming heads: masked A = sink tiles, B = the window's ragged start, C = the diagonal;
        # unmasked = the window's interior (seen by every row of the tile).
        full_tiles = (first_pos + 1) // BLOCK_N  # tiles at or before every row's own position
        sink_tiles = tl.minimum(tl.cdiv(sink, BLOCK_N), num_tiles)
        local_first = tl.maximum(tl.maximum(first_pos - local + 1, 0) // BLOCK_N, sink_tiles)
        inner_first = tl.maximum(tl.cdiv(tl.maximum(last_pos - local + 1, 0), BLOCK_N), local_first)
        inner_end = tl.maximum(full_tiles, inner_first)
        u_lo = tl.where(is_stream, inner_first, 0)
        u_hi = tl.where(is_stream, inner_end, full_tiles)
        len_a = tl.where(is_stream, sink_tiles, 0)
        len_b = tl.where(is_stream, inner_first - local_first, 0)
        b_start = local_first
        c_start = u_hi
        n_masked = len_a + len_b + num_tiles - c_start
        for t in range(u_lo, u_hi):
            acc, m_i, l_i = _attend_tile(
                acc, m_i, l_i, q, kc_ptr, vc_ptr, page_row_ptr, t, q_pos, seq_len, sink, local, kvh, qk_scale,
                stride_cp, stride_ct, stride_ch, HEAD_DIM, PAGE_SIZE, BLOCK_N, False, False, USE_TMA)
        for idx in range(0, n_masked):
            t = tl.where(idx < len_a, idx,
                         tl.where(idx < len_a + len_b, b_start + idx - len_a, c_start + idx - len_a - len_b))
            acc, m_i, l_i = _attend_tile(
                acc, m_i, l_i, q, kc_ptr, vc_ptr, page_row_ptr, t, q_pos, seq_len, sink, local, kvh, qk_scale,
                stride_cp, stride_ct, stride_ch, HEAD_DIM, PAGE_SIZE, BLOCK_N, True, is_stream, USE_TMA)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + (q_start + rows)[:, None] * stride_ot + head * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def sparse_prefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    tiles: PrefillTiles,
    scale: float,
    streaming_heads: torch.Tensor | None = None,
    sink: int = 0,
    local: int = 0,
    page_list: torch.Tensor | None = None,
    page_list_len: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    block_n: int = 64,
    use_tma: bool = False,
    num_warps: int = 4,
    num_stages: int = 2,
    kv_head_map: torch.Tensor | None = None,
    group: int | None = None,
) -> torch.Tensor:
    """q (T, Hq, D) of prefill chunks -> (T, Hq, D). The chunks' K/V must already be in the cache.

    page_table (B, max_pages) int32, seq_lens (B,) int32 (cached + new), query_start_loc (B + 1,)
    int32 offsets of each sequence's rows in q; tiles from `plan_tiles`. streaming_heads (Hkv,) or
    None; page_list (num_tiles, Hkv, max_list) int32 page indices with page_list_len (num_tiles, Hkv).
    q may be a strided view (its last dimension contiguous).

    A cache that holds some of the model's KV heads (one pool of several) takes `kv_head_map`
    (Hkv,) int64, the model KV head of each cache head, with `group` (query heads per KV head) and
    `out`: q then holds all of the model's query heads and the result goes into those heads' rows
    of `out`, the other rows left as they are (no gather or scatter copies).
    """
    hq, d = q.shape[1:]
    if kv_head_map is not None:
        hkv = k_cache.shape[2]
        if out is None or group is None or kv_head_map.shape != (hkv,) or hkv * group > hq:
            raise ValueError("kv_head_map needs `out`, `group` and one entry per cache head")
        page_size, _ = check_paged_attention(q[:, : hkv * group], k_cache, v_cache, page_table, page_list,
                                             page_list_len)
    else:
        page_size, hkv = check_paged_attention(q, k_cache, v_cache, page_table, page_list, page_list_len)
        group = hq // hkv
    if block_n & (block_n - 1) or block_n < 16:
        raise ValueError(f"block_n must be a power of two >= 16, got {block_n}")
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.stride(-1) != 1:
        raise ValueError(f"out {tuple(out.shape)} does not match q {tuple(q.shape)}")
    if tiles.num_tiles == 0:
        return out
    stream, lst, lst_len = pack_sparse_args(q.device, streaming_heads, page_list, page_list_len)
    k_src, v_src = k_cache, v_cache
    if use_tma:  # Hopper and newer: K/V pages through tensor descriptors, one page per KV tile
        from triton.tools.tensor_descriptor import TensorDescriptor

        block_n = page_size
        rows = k_cache.shape[0] * page_size
        k_src = TensorDescriptor.from_tensor(k_cache.view(rows, hkv * d), [page_size, d])
        v_src = TensorDescriptor.from_tensor(v_cache.view(rows, hkv * d), [page_size, d])
    _prefill_kernel[(tiles.num_tiles, hkv * group)](
        q, k_src, v_src, out, page_table, seq_lens, query_start_loc, tiles.seq, tiles.row_start,
        stream, lst, lst_len, kv_head_map if kv_head_map is not None else seq_lens,
        sink, local, scale * 1.4426950408889634,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), page_table.stride(0),
        lst.stride(0), lst.stride(1), lst_len.stride(0),
        GROUP=group, HEAD_DIM=d, PAGE_SIZE=page_size, BLOCK_M=tiles.block_m,
        BLOCK_N=max(block_n, page_size), USE_TMA=use_tma,
        HAS_STREAM=streaming_heads is not None, HAS_LIST=page_list is not None, HAS_MAP=kv_head_map is not None,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
