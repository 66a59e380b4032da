"""Triton kernels, one module per op family; each exposes AOT_SPECS for an ahead-of-time compile check."""
