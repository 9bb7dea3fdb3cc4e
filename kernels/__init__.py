"""Fused scoring kernels: each op has a torch reference (CPU path, test oracle) and a Triton fast path."""
