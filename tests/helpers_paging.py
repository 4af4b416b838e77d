"""Page tables for kernel tests: sequences in a shuffled pool (gaps, pages out of order)."""

from __future__ import annotations

import random

import torch


def shuffled_tables(seq_lens: list[int], page_size: int, rng: random.Random,
                    spare: int = 3) -> tuple[list[list[int]], int, torch.Tensor]:
    """(page lists per sequence, pages in the pool, the padded (B, max pages) int32 table); the
    pool has `spare` pages no sequence owns."""
    num_pages = sum(-(-n // page_size) for n in seq_lens) + spare
    ids = list(range(num_pages))
    rng.shuffle(ids)
    tables = []
    for n in seq_lens:
        k = -(-n // page_size)
        tables.append(ids[:k])
        ids = ids[k:]
    width = max(len(t) for t in tables)
    table = torch.zeros((len(seq_lens), width), dtype=torch.int32)
    for i, t in enumerate(tables):
        table[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
    return tables, num_pages, table
