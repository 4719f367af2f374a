"""FLOP and byte counts that turn a measured time into throughput and utilisation.

Every count is the *useful* work of the computation as written in the model, not what a
particular implementation happens to execute:

* A multiply-add is 2 FLOPs; only matrix products are counted (softmax, GELU, LayerNorm
  and embedding gathers are negligible next to them for BERT shapes, < 2 % at base/512).
* Padding is excluded: a padded batch is charged for its real tokens only, so an
  implementation that computes on padding shows a lower utilisation, which is the point.
* Backward of a matrix product costs 2x its forward (one product for the input gradient,
  one for the weight gradient); backward of attention costs 2.5x its forward (dV, dP, dS->dQ,
  dS->dK are four products of the forward's size plus the recomputation of P that fused
  kernels do: 5 products against the forward's 2, as FlashAttention-2 counts it).
* Bytes are the compulsory traffic of a memory-bound op: every input read once, every
  output written once, at the element size of the run's dtype; the (hidden,)-sized
  parameters are included even though they are negligible.

Shapes use the model's names: ``hidden`` (H), ``heads``, ``head_dim`` (D = H / heads),
``intermediate`` (I = 4H for BERT), ``vocab`` (V), sequence length S, batch B.
"""

from __future__ import annotations

from typing import Iterable, Sequence

__all__ = [
    "ATTENTION_BACKWARD_FACTOR",
    "MATMUL_BACKWARD_FACTOR",
    "linear_flops",
    "attention_flops",
    "encoder_flops_per_token",
    "encoder_flops",
    "layer_norm_bytes",
    "bias_gelu_bytes",
    "linear_cross_entropy_flops",
    "span_boundary_head_flops",
    "pretraining_step_flops",
    "total_tokens",
]

# Backward / forward FLOP ratios (see the module docstring for where they come from).
MATMUL_BACKWARD_FACTOR = 2.0
ATTENTION_BACKWARD_FACTOR = 2.5


def _total(forward: float, backward: bool, factor: float) -> float:
    """Forward FLOPs, or forward + backward FLOPs when ``backward``."""
    return forward * (1.0 + factor) if backward else forward


def linear_flops(rows: int, in_features: int, out_features: int, *, backward: bool = False) -> float:
    """``y = x @ W.T`` for ``x`` (rows, in) and ``W`` (out, in): ``2 * rows * in * out``
    forward; x3 for forward + backward."""
    return _total(2.0 * rows * in_features * out_features, backward, MATMUL_BACKWARD_FACTOR)


def attention_flops(lengths: Sequence[int], heads: int, head_dim: int, *,
                    backward: bool = False) -> float:
    """Bidirectional attention over sequences of the given (real) lengths.

    Per sequence of length S: ``Q @ K.T`` is ``2 * H * S^2 * D`` and ``P @ V`` another
    ``2 * H * S^2 * D``, so ``4 * B * H * S^2 * D`` forward for a full batch; backward is
    2.5x forward (3.5x in total).
    """
    forward = sum(4.0 * heads * float(s) * float(s) * head_dim for s in lengths)
    return _total(forward, backward, ATTENTION_BACKWARD_FACTOR)


def encoder_flops_per_token(hidden: int, intermediate: int, layers: int, seq: int) -> float:
    """Forward FLOPs per token of a BERT encoder attending over ``seq`` tokens.

    Per layer and token: the Q, K, V and output projections ``4 * 2 * H^2 = 8 H^2``, the
    feed-forward ``2 * 2 * H * I = 4 H I``, and attention's two products ``4 * S * H``
    (``2 S D`` for a score row and ``2 S D`` for the context, times ``heads * D = H``).
    """
    return float(layers) * (8.0 * hidden * hidden + 4.0 * hidden * intermediate
                            + 4.0 * seq * hidden)


def encoder_flops(lengths: Sequence[int], hidden: int, intermediate: int, layers: int, *,
                  backward: bool = False) -> float:
    """FLOPs of a BERT encoder over sequences of the given real lengths.

    The projections and feed-forward are charged per real token (x3 with backward), the
    attention products per sequence (``4 * S^2 * H`` per layer, x3.5 with backward).
    """
    tokens = float(sum(lengths))
    dense = tokens * layers * (8.0 * hidden * hidden + 4.0 * hidden * intermediate)
    attention = layers * sum(4.0 * float(s) * float(s) * hidden for s in lengths)
    return (_total(dense, backward, MATMUL_BACKWARD_FACTOR)
            + _total(attention, backward, ATTENTION_BACKWARD_FACTOR))


def layer_norm_bytes(rows: int, hidden: int, element_size: int, *, residual: bool = True,
                     backward: bool = False) -> float:
    """Compulsory bytes of ``LayerNorm(x + residual)`` over ``rows`` x ``hidden``.

    Forward reads x (and the residual) and writes y: ``(2 or 3) * rows * H`` elements, plus
    weight and bias (``2 * H``). Backward reads dy and x (the saved input; a fused kernel
    keeps the per-row statistics, 8 bytes a row) and writes dx, once more ``3 * rows * H``
    elements, plus the weight and bias gradients (``2 * H`` reads and writes).
    """
    activations = (3 if residual else 2) * rows * hidden
    params = 2 * hidden
    total = float(activations + params) * element_size
    if backward:
        total += float(3 * rows * hidden + 4 * hidden) * element_size + 8.0 * rows
    return total


def bias_gelu_bytes(rows: int, features: int, element_size: int, *,
                    backward: bool = False) -> float:
    """Compulsory bytes of ``GELU(x + bias)``: read x, write y (``2 * rows * F`` elements)
    and read the bias (``F``); backward reads dy and x and writes dx (``3 * rows * F``)
    and writes the bias gradient (``F``)."""
    total = float(2 * rows * features + features) * element_size
    if backward:
        total += float(3 * rows * features + features) * element_size
    return total


def linear_cross_entropy_flops(rows: int, hidden: int, vocab: int, *,
                               backward: bool = False) -> float:
    """Logits ``(rows, H) @ (V, H).T``: ``2 * rows * H * V`` forward; x3 with backward (the
    softmax and the log-sum-exp are O(rows * V) and not counted)."""
    return linear_flops(rows, hidden, vocab, backward=backward)


def span_boundary_head_flops(targets: int, hidden: int, position_width: int, *,
                             backward: bool = False) -> float:
    """The SBO MLP for ``targets`` rows: ``[h_left; h_right; p]`` (2H + E) -> H, then
    H -> H: ``2 * N * (2H + E) * H + 2 * N * H * H`` forward; x3 with backward. The
    decoder to the vocabulary is counted by :func:`linear_cross_entropy_flops`."""
    return (linear_flops(targets, 2 * hidden + position_width, hidden, backward=backward)
            + linear_flops(targets, hidden, hidden, backward=backward))


def pretraining_step_flops(lengths: Sequence[int], hidden: int, intermediate: int, layers: int,
                           vocab: int, masked: int, sbo_targets: int,
                           position_width: int) -> float:
    """Forward + backward FLOPs of one SpanBERT pretraining step.

    Encoder (:func:`encoder_flops`) + MLM head on the ``masked`` rows only (transform
    H -> H and the tied decoder H -> V) + SBO head on ``sbo_targets`` rows (the MLP and
    the tied decoder), everything with backward.
    """
    return (encoder_flops(lengths, hidden, intermediate, layers, backward=True)
            + linear_flops(masked, hidden, hidden, backward=True)
            + linear_cross_entropy_flops(masked, hidden, vocab, backward=True)
            + span_boundary_head_flops(sbo_targets, hidden, position_width, backward=True)
            + linear_cross_entropy_flops(sbo_targets, hidden, vocab, backward=True))


def total_tokens(lengths: Iterable[int]) -> int:
    """Real (unpadded) tokens of a batch."""
    return int(sum(int(s) for s in lengths))
