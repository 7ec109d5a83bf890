"""Triton kernels for the rewritten hot regions, each file beside its pure-PyTorch reference.

Empty until the kernels issue lands; importing it never imports Triton.
"""
