"""Paged KV cache: page pools, per-request page tables, tensor layout and memory sizing."""
