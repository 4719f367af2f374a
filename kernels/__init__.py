"""Triton kernels of spanbert_fast, installed as ``spanbert_fast.kernels``.

One kernel and its launcher per module (checks inputs, builds the grid, launches). No
``nn.Module`` and no imports from the API layer: ``spanbert_fast.ops`` picks a backend and
calls into these modules. Importing this package imports nothing, so it works without triton.
"""
