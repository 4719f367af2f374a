"""The Triton bias + exact GELU kernel against the reference, in the interpreter on CPU.

Feature counts 33, 200, 384, 1000 and 3072 (BERT-base's FFN width, which spans several
column blocks), row counts 1, 7 and 127, random biases, inputs spread over [-8, 8] so both
tails of erf are exercised. fp32 must be within 1e-5 max relative error of an fp64 oracle
(the reference differentiated by autograd); fp16 by the 2x rule. Every buffer the
launchers allocate is poisoned with NaN first. GPU-only tests (bf16, real sizes) are
marked ``gpu``.
"""

from __future__ import annotations

import math

import pytest
import torch

from spanbert_fast import ops
from spanbert_fast.ops import reference
from parity import assert_close, assert_within_2x_of_torch, grads_of

gelu_kernel = pytest.importorskip("spanbert_fast.kernels.bias_gelu")

FP32_REL = 1e-5
GRAD_NAMES = ("dx", "dbias")


@pytest.fixture(autouse=True)
def _poison_buffers(monkeypatch):
    monkeypatch.setattr(gelu_kernel, "POISON_BUFFERS", True)


def _inputs(shape, seed=0, device="cpu"):
    """fp64 x (N(0, 2.5^2): GELU's curved region and both tails), bias, upstream grad."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2.5
    bias = torch.randn(shape[-1], generator=g, dtype=torch.float64)
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    return x.to(device), bias.to(device), dy.to(device)


def _reference_with_grads(x, bias, dy, dtype):
    """The reference in ``dtype`` (fp64: the oracle) and its autograd ``[y, dx, dbias]``."""
    return grads_of(reference.bias_gelu, (x, bias), dy, dtype)


def _kernel_with_grads(x, bias, dy, dtype, needs=(True, True)):
    x, bias, dy = (t.to(dtype) for t in (x, bias, dy))
    return [gelu_kernel.forward(x, bias),
            *gelu_kernel.backward(dy, x, bias, list(needs))]


SHAPES = [(1, 1000), (7, 200), (127, 384), (2, 3, 33), (9, 3072)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fp32_matches_fp64_oracle(shape):
    tensors = _inputs(shape)
    oracle = _reference_with_grads(*tensors, torch.float64)
    ours = _kernel_with_grads(*tensors, torch.float32)
    assert ours[0].shape == torch.Size(shape)
    for name, got, expected in zip(("y",) + GRAD_NAMES, ours, oracle):
        assert got.dtype == torch.float32, name
        assert_close(got, expected, max_rel=FP32_REL, name=f"{name} {shape}")


@pytest.mark.parametrize("shape", [(7, 200), (127, 384), (3, 33), (5, 3072)],
                         ids=lambda s: "x".join(map(str, s)))
def test_fp16_within_2x_of_torch(shape):
    tensors = _inputs(shape, seed=1)
    oracle = _reference_with_grads(*tensors, torch.float64)
    torch_fp16 = _reference_with_grads(*tensors, torch.float16)
    ours = _kernel_with_grads(*tensors, torch.float16)
    for name, got, plain, expected in zip(("y",) + GRAD_NAMES, ours, torch_fp16, oracle):
        assert got.dtype == torch.float16, name
        assert_within_2x_of_torch(got, plain, expected, name=f"fp16 {name} {shape}")


def test_fp64_inputs_compute_in_fp64():
    tensors = _inputs((5, 200), seed=2)
    oracle = _reference_with_grads(*tensors, torch.float64)
    ours = _kernel_with_grads(*tensors, torch.float64)
    for name, got, expected in zip(("y",) + GRAD_NAMES, ours, oracle):
        assert_close(got, expected, max_rel=1e-12, name=f"fp64 {name}")


def test_exact_erf_gelu_not_tanh_approximation():
    """Pointwise against closed-form values of z * Phi(z); the tanh approximation is off
    by up to ~5e-4 here, the exact GELU by fp32 rounding only."""
    z = torch.tensor([-6.0, -3.0, -1.5, -0.5, 0.0, 0.25, 1.0, 2.0, 4.0, 9.0])
    expected = torch.tensor([v * 0.5 * (1.0 + math.erf(v / math.sqrt(2.0))) for v in z.tolist()],
                            dtype=torch.float64)
    got = gelu_kernel.forward(z.unsqueeze(0) - 0.125, torch.full((10,), 0.125))
    assert_close(got[0], expected, max_rel=1e-6, name="gelu values")
    derivative = torch.tensor([0.5 * (1.0 + math.erf(v / math.sqrt(2.0)))
                               + v * math.exp(-0.5 * v * v) / math.sqrt(2.0 * math.pi)
                               for v in z.tolist()], dtype=torch.float64)
    dx, _ = gelu_kernel.backward(torch.ones(1, 10), z.unsqueeze(0), torch.zeros(10),
                                 [True, False])
    assert_close(dx[0], derivative, max_rel=1e-6, name="gelu derivative")


def test_mixed_dtypes_fp16_activations_fp32_bias():
    """fp16 x with an fp32 bias: y and dx in x's dtype (the registered fake's contract),
    dbias in fp32; the math is fp32 throughout, so fp32-level accuracy on the rounded
    inputs up to the final fp16 rounding of y and dx."""
    x, bias, dy = _inputs((7, 384), seed=3)
    x16, b32, dy16 = x.half(), bias.float(), dy.half()
    oracle = _reference_with_grads(x16.double(), b32.double(), dy16.double(), torch.float64)
    y = gelu_kernel.forward(x16, b32)
    dx, dbias = gelu_kernel.backward(dy16, x16, b32, [True, True])
    assert (y.dtype, dx.dtype, dbias.dtype) == (torch.float16, torch.float16, torch.float32)
    half_ulp = 2.0 ** -11  # fp16 rounding of the results, relative
    assert_close(y, oracle[0], max_rel=half_ulp, name="mixed y")
    assert_close(dx, oracle[1], max_rel=half_ulp, name="mixed dx")
    assert_close(dbias, oracle[2], max_rel=FP32_REL, name="mixed dbias")


@pytest.mark.parametrize("needs", [(True, False), (False, True), (False, False)],
                         ids=["dx", "dbias", "none"])
def test_only_requested_gradients_are_computed(needs):
    tensors = _inputs((7, 200), seed=4)
    oracle = _reference_with_grads(*tensors, torch.float64)
    ours = _kernel_with_grads(*tensors, torch.float32, needs=needs)
    for name, need, got, expected in zip(GRAD_NAMES, needs, ours[1:], oracle[1:]):
        if need:
            assert_close(got, expected, max_rel=FP32_REL, name=f"{name} alone")
        else:
            assert got.numel() == 0, f"{name} was not requested but has shape {got.shape}"


def test_non_contiguous_inputs():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(9, 300, generator=g)[:, 50:250]  # row stride 300, read in place
    dy = torch.randn(200, 9, generator=g).t()  # column stride 9, copied
    bias = torch.randn(400, generator=g)[::2]
    expected = _reference_with_grads(x.double(), bias.double(), dy.double(), torch.float64)
    ours = [gelu_kernel.forward(x, bias), *gelu_kernel.backward(dy, x, bias, [True, True])]
    for name, got, exp in zip(("y",) + GRAD_NAMES, ours, expected):
        assert_close(got, exp, max_rel=FP32_REL, name=f"strided {name}")


def test_zero_rows():
    x, bias = torch.empty(0, 64), torch.randn(64)
    assert gelu_kernel.forward(x, bias).shape == (0, 64)
    dx, dbias = gelu_kernel.backward(x, x, bias, [True, True])
    assert dx.shape == (0, 64) and torch.equal(dbias, torch.zeros(64))


@pytest.mark.parametrize("shape", [(3, 0), (0, 0), (2, 0, 0)])
def test_zero_features(shape):
    """A 0-wide last dim (what torch's ``F.gelu(x + bias)`` takes): ``reshape(-1, 0)`` cannot
    infer the row count, so the launchers must not ask it to."""
    x, bias = torch.empty(shape), torch.empty(0)
    y = gelu_kernel.forward(x, bias)
    dx, dbias = gelu_kernel.backward(x, x, bias, [True, True])
    assert y.shape == dx.shape == shape and dbias.shape == (0,)


@pytest.mark.parametrize("call, error, words", [
    (lambda x, b: gelu_kernel.forward(x.long(), b), TypeError, "x"),
    (lambda x, b: gelu_kernel.forward(x, b[:-1]), ValueError, "bias"),
    (lambda x, b: gelu_kernel.forward(x, None), TypeError, "bias"),
    (lambda x, b: gelu_kernel.forward(x[0, 0], b), ValueError, "x"),
    (lambda x, b: gelu_kernel.backward(x, x, b, [True]), ValueError, "needs_input_grad"),
    (lambda x, b: gelu_kernel.backward(x.t(), x, b, [True, True]), ValueError, "grad_output"),
], ids=["long-x", "bias-shape", "bias-none", "scalar-x", "needs-length", "grad-shape"])
def test_bad_input_names_the_argument(call, error, words):
    x, bias = torch.randn(3, 40), torch.randn(40)
    with pytest.raises(error, match=words):
        call(x, bias)


# --------------------------------------------------------------------------------------
# The fused bias + GELU + dropout variant (not wired into ops yet)
# --------------------------------------------------------------------------------------
def test_dropout_matches_plain_gelu_on_kept_elements():
    """Kept elements are GELU / (1 - p), dropped ones are 0, in the forward and the
    backward alike (the backward regenerates the forward's mask from the seed)."""
    p, seed = 0.3, 1234
    x, bias, dy = (t.float() for t in _inputs((127, 200), seed=10))
    y_plain = gelu_kernel.forward(x, bias)
    dx_plain, _ = gelu_kernel.backward(dy, x, bias, [True, False])
    y = gelu_kernel.forward_with_dropout(x, bias, p, seed)
    dx, dbias = gelu_kernel.backward_with_dropout(dy, x, bias, p, seed, [True, True])
    # The mask depends on (row, col, seed, p) only; read it off inputs whose GELU is > 0
    # (fp32 GELU is exactly 0 below z ~ -5.5, where erf rounds to -1).
    positive = gelu_kernel.forward_with_dropout(x.abs() + 0.5, torch.zeros_like(bias), p, seed)
    keep = positive != 0
    dropped = 1.0 - keep.double().mean().item()
    # 25400 Bernoulli(0.3) draws: standard deviation 0.003; 0.02 is ~7 sigma.
    assert abs(dropped - p) < 0.02, f"dropped share {dropped:.3f}, expected {p}"
    assert_close(y, torch.where(keep, y_plain / (1 - p), 0.0), max_rel=1e-6, name="dropout y")
    assert_close(dx, torch.where(keep, dx_plain / (1 - p), 0.0), max_rel=1e-6,
                 name="dropout dx")
    assert_close(dbias, dx.double().sum(0), max_rel=FP32_REL, name="dropout dbias")


def test_dropout_seed_reproducible_and_distinct():
    x, bias, _ = (t.float() for t in _inputs((7, 200), seed=11))
    first = gelu_kernel.forward_with_dropout(x, bias, 0.5, 7)
    assert torch.equal(first, gelu_kernel.forward_with_dropout(x, bias, 0.5, 7))
    other = gelu_kernel.forward_with_dropout(x, bias, 0.5, 8)
    assert not torch.equal(first != 0, other != 0)
    assert torch.equal(gelu_kernel.forward_with_dropout(x, bias, 0.0, 7),
                       gelu_kernel.forward(x, bias))


@pytest.mark.parametrize("p, seed, words", [(1.0, 0, "dropout_p"), (-0.1, 0, "dropout_p"),
                                            (0.1, -1, "seed"), (0.1, 1.5, "seed")])
def test_dropout_bad_input_names_the_argument(p, seed, words):
    with pytest.raises(ValueError, match=words):
        gelu_kernel.forward_with_dropout(torch.randn(2, 8), torch.randn(8), p, seed)


# --------------------------------------------------------------------------------------
# Through the public op and the torch.library custom op
# --------------------------------------------------------------------------------------
def test_public_op_triton_backend_autograd():
    x, bias, dy = _inputs((2, 7, 200), seed=6)
    oracle = _reference_with_grads(x, bias, dy, torch.float64)
    x32, b32 = x.float().requires_grad_(), bias.float().requires_grad_()
    y = ops.bias_gelu(x32, b32, backend="triton")
    y.backward(dy.float())
    for name, got, expected in zip(("y",) + GRAD_NAMES, (y, x32.grad, b32.grad), oracle):
        assert_close(got, expected, max_rel=FP32_REL, name=f"op {name}")


def test_custom_op_opcheck():
    x, bias, _ = (t.float() for t in _inputs((3, 33), seed=7))
    torch.library.opcheck(torch.ops.spanbert_fast.bias_gelu,
                          (x.requires_grad_(), bias.requires_grad_(), "triton"))


def test_custom_op_opcheck_non_contiguous_x():
    """The kernels return contiguous tensors whatever x's strides, so the fake (meta)
    implementations must say so: under torch.compile a fake that copied a transposed x's
    strides would describe memory the kernel did not write that way."""
    x, bias, _ = (t.float() for t in _inputs((3, 33), seed=8))
    x = x.t().contiguous().t()  # (3, 33) with strides (1, 3)
    torch.library.opcheck(torch.ops.spanbert_fast.bias_gelu,
                          (x.requires_grad_(), bias.requires_grad_(), "triton"))


# --------------------------------------------------------------------------------------
# GPU only
# --------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("features", [3072, 4096, 768])
def test_gpu_real_sizes_low_precision(dtype, features):
    tensors = _inputs((32 * 512, features), seed=8, device="cuda")
    oracle = _reference_with_grads(*tensors, torch.float64)
    plain = _reference_with_grads(*tensors, dtype)
    ours = _kernel_with_grads(*tensors, dtype)
    for name, got, p, o in zip(("y",) + GRAD_NAMES, ours, plain, oracle):
        assert_within_2x_of_torch(got, p, o, name=f"gpu {dtype} {features} {name}")


@pytest.mark.gpu
@pytest.mark.parametrize("features", [200, 1000, 3072])
def test_gpu_fp32(features):
    tensors = _inputs((32 * 512 + 7, features), seed=9, device="cuda")
    oracle = _reference_with_grads(*tensors, torch.float64)
    ours = _kernel_with_grads(*tensors, torch.float32)
    for name, got, o in zip(("y",) + GRAD_NAMES, ours, oracle):
        assert_close(got, o, max_rel=FP32_REL, name=f"gpu fp32 {features} {name}")
