"""The fused ops of spanbert_fast: one module per op, one public function each.

Each op module (:mod:`.attention`, :mod:`.layer_norm`, :mod:`.bias_gelu`,
:mod:`.span_boundary_head`, :mod:`.linear_cross_entropy`) checks its public arguments once,
asks :mod:`.dispatch` for a backend, and holds its ``torch.library`` custom ops (opaque
nodes with fake (meta) implementations for ``torch.compile``) with their autograd, which
saves what the backward needs: a Triton backward never reruns a forward kernel or GEMM
(attention, layer_norm and span_boundary_head have dedicated forward/backward op pairs;
see :mod:`.registration`).

Backends
--------
``torch``  plain PyTorch; runs anywhere, differentiates through plain autograd, and
           ``torch.compile`` traces straight through it. Attention is
           :mod:`.torch_backend` (SDPA, padded and packed); the other ops are the single
           fused torch calls of :mod:`.reference`, the oracle the tests compare against.
``triton`` the fused kernels of :mod:`spanbert_fast.kernels`, one file per op, named after it.

``backend="auto"`` takes ``triton`` on CUDA tensors when the op's kernel has no reason to
refuse them and ``torch`` otherwise (with one warning naming the reason when CUDA inputs
fall back); ``SPANBERT_FAST_BACKEND=torch|triton`` overrides ``auto``. An explicit backend
that cannot run raises :class:`BackendUnavailableError` listing every reason and the inputs'
shapes and dtypes, never a silent substitution.
"""

from __future__ import annotations

from . import reference, torch_backend
from .attention import attention
from .bias_gelu import bias_gelu
from .checks import values_checked
from .dispatch import BACKENDS, OPS, BackendUnavailableError, resolve_backend
from .layer_norm import layer_norm
from .linear_cross_entropy import linear_cross_entropy
from .span_boundary_head import span_boundary_head

__all__ = [
    "BACKENDS",
    "OPS",
    "BackendUnavailableError",
    "resolve_backend",
    "values_checked",
    "attention",
    "layer_norm",
    "bias_gelu",
    "span_boundary_head",
    "linear_cross_entropy",
    "reference",
    "torch_backend",
]
