"""``span_boundary_head``: SpanBERT's span-boundary objective MLP over gathered boundaries.

``[hidden[left]; hidden[right]; position_table[rel_pos]] -> Linear -> GELU -> LayerNorm ->
Linear -> GELU -> LayerNorm``, as in the original release's ``BertPairTargetPredictionHead``.
"""

from __future__ import annotations

import torch

from . import reference
from .checks import (FLOAT_DTYPES, check_index_range, check_matmul_dtypes, check_same_device,
                     check_shape, check_tensor)
from .registration import register_op, run

register_op(
    "span_boundary_head",
    [("hidden", "Tensor"), ("left_index", "Tensor"), ("right_index", "Tensor"),
     ("rel_pos", "Tensor"), ("position_table", "Tensor"), ("w1", "Tensor"), ("b1", "Tensor"),
     ("ln1_weight", "Tensor"), ("ln1_bias", "Tensor"), ("w2", "Tensor"), ("b2", "Tensor"),
     ("ln2_weight", "Tensor"), ("ln2_bias", "Tensor"), ("eps", "float")],
    reference.span_boundary_head,
    lambda hidden, left, *rest: hidden.new_empty((left.shape[0], hidden.shape[1])),
)

def span_boundary_head(
    hidden: torch.Tensor,
    left_index: torch.Tensor,
    right_index: torch.Tensor,
    rel_pos: torch.Tensor,
    position_table: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    ln1_weight: torch.Tensor,
    ln1_bias: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    ln2_weight: torch.Tensor,
    ln2_bias: torch.Tensor,
    eps: float = 1e-12,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """The SBO MLP over gathered span boundaries (see :func:`spanbert_fast.ops.reference.span_boundary_head`).

    ``hidden``: ``(tokens, H)``; ``left_index``, ``right_index``, ``rel_pos``: ``(N,)``
    int64; ``position_table``: ``(P, E)``; ``w1``: ``(H, 2H + E)``; ``w2``: ``(H, H)``.
    Returns ``(N, H)``.
    """
    check_tensor("hidden", hidden, ndim=2, dtypes=FLOAT_DTYPES)
    tokens, width = hidden.shape
    for name, t in (("left_index", left_index), ("right_index", right_index), ("rel_pos", rel_pos)):
        check_tensor(name, t, ndim=1, dtypes=(torch.int64,))
    n = left_index.shape[0]
    check_shape("right_index", right_index, (n,))
    check_shape("rel_pos", rel_pos, (n,))
    check_tensor("position_table", position_table, ndim=2, dtypes=FLOAT_DTYPES)
    rows, pos_width = position_table.shape
    check_tensor("w1", w1, ndim=2, dtypes=FLOAT_DTYPES)
    check_shape("w1", w1, (width, 2 * width + pos_width))
    check_tensor("w2", w2, ndim=2, dtypes=FLOAT_DTYPES)
    check_shape("w2", w2, (width, width))
    for name, t in (("b1", b1), ("ln1_weight", ln1_weight), ("ln1_bias", ln1_bias),
                    ("b2", b2), ("ln2_weight", ln2_weight), ("ln2_bias", ln2_bias)):
        check_tensor(name, t, ndim=1, dtypes=FLOAT_DTYPES)
        check_shape(name, t, (width,))
    floats = dict(hidden=hidden, position_table=position_table, w1=w1, b1=b1,
                  ln1_weight=ln1_weight, ln1_bias=ln1_bias, w2=w2, b2=b2,
                  ln2_weight=ln2_weight, ln2_bias=ln2_bias)
    check_same_device(left_index=left_index, right_index=right_index, rel_pos=rel_pos,
                       **floats)
    check_matmul_dtypes(**floats)
    check_index_range("left_index", left_index, 0, tokens)
    check_index_range("right_index", right_index, 0, tokens)
    check_index_range("rel_pos", rel_pos, 0, rows)
    args = (hidden, left_index, right_index, rel_pos, position_table, w1, b1, ln1_weight,
            ln1_bias, w2, b2, ln2_weight, ln2_bias, float(eps))
    return run("span_boundary_head", backend, [hidden, position_table, w1, w2], args,
               reference.span_boundary_head, matmul=True)
