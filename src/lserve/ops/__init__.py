"""Triton kernels, one op per file, each with a PyTorch reference in reference.py (kernels issue)."""
