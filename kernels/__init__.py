"""Triton kernels and their launchers, installed as ``msflow_fast.kernels``.

Kernels know nothing of modules or autograd: each launcher allocates its outputs, owns the
grid and is called with keyword arguments.
"""
