"""Llama-family decoder and its loaders. Knows nothing about paging or sparsity."""
