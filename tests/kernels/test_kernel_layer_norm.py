"""The Triton residual + LayerNorm kernel against the reference, in the interpreter on CPU.

Hidden sizes 33, 200, 384, 768, 1000, 1024 (BERT sizes and non-powers of two), row counts
1, 7 and 127, with and without a residual, random weights and biases. fp32 must be within
1e-5 max relative error of an fp64 oracle (the reference differentiated by autograd);
fp16 by the 2x rule. Every buffer the launchers allocate is poisoned with NaN first, so
an element no program writes fails the comparison. GPU-only tests (bf16, real sizes) are
marked ``gpu``.
"""

from __future__ import annotations

import pytest
import torch

from spanbert_fast import ops
from spanbert_fast.ops import reference
from parity import assert_close, assert_within_2x_of_torch, grads_of, max_relative_error

layer_norm_kernel = pytest.importorskip("spanbert_fast.kernels.layer_norm")

FP32_REL = 1e-5
EPS = 1e-12  # SpanBERT's LayerNorm eps
GRAD_NAMES = ("dx", "dweight", "dbias", "dresidual")


@pytest.fixture(autouse=True)
def _poison_buffers(monkeypatch):
    monkeypatch.setattr(layer_norm_kernel, "POISON_BUFFERS", True)


def _inputs(shape, with_residual, seed=0, device="cpu", scale=1.0):
    """fp64 x, weight, bias, residual (or None) and upstream gradient; never 0/1 values.
    ``scale`` multiplies x and residual (the rows' standard deviation is ~2 * scale)."""
    g = torch.Generator().manual_seed(seed)
    hidden = shape[-1]
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2.0 + 0.5) * scale
    weight = 1.0 + 0.5 * torch.randn(hidden, generator=g, dtype=torch.float64)
    bias = torch.randn(hidden, generator=g, dtype=torch.float64)
    residual = (torch.randn(shape, generator=g, dtype=torch.float64) * scale
                if with_residual else None)
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return move(x), move(weight), move(bias), move(residual), move(dy)


def _reference_with_grads(x, weight, bias, residual, dy, dtype):
    """The reference in ``dtype`` (fp64: the oracle), differentiated by autograd.
    Returns ``[y, dx, dweight, dbias, dresidual]`` (dresidual None without a residual)."""
    return grads_of(reference.layer_norm, (x, weight, bias, EPS, residual), dy, dtype)


def _kernel_with_grads(x, weight, bias, residual, dy, dtype, needs=(True,) * 4):
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    x, weight, bias, residual, dy = (cast(t) for t in (x, weight, bias, residual, dy))
    y = layer_norm_kernel.forward(x, weight, bias, EPS, residual)
    grads = layer_norm_kernel.backward(dy, x, weight, bias, EPS, residual, list(needs))
    return [y, *grads]


SHAPES = [(1, 768), (7, 200), (127, 384), (2, 3, 1000), (5, 33), (3, 1024)]


@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fp32_matches_fp64_oracle(shape, with_residual):
    tensors = _inputs(shape, with_residual)
    oracle = _reference_with_grads(*tensors, torch.float64)
    ours = _kernel_with_grads(*tensors, torch.float32)
    assert ours[0].dtype == torch.float32 and ours[0].shape == torch.Size(shape)
    for name, got, expected in zip(("y",) + GRAD_NAMES, ours, oracle):
        if expected is None:
            assert got.numel() == 0, f"{name} must be a 0-element tensor without a residual"
            continue
        assert got.dtype == torch.float32, name
        assert_close(got, expected, max_rel=FP32_REL, name=f"{name} {shape}")


TINY = 1e-3  # x * 1e-3: row variance ~4e-6 (5e-6 with the residual)


@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("shape", [(7, 200), (3, 1024), (5, 33)],
                         ids=lambda s: "x".join(map(str, s)))
def test_fp32_rows_of_tiny_variance_use_the_given_eps(shape, with_residual):
    """On rows of variance ~5 (above), eps only moves y by ~eps / (2 var): a kernel that
    used eps = 1e-5 instead of 1e-12 stayed within the fp32 tolerance and was caught only
    in fp64. On rows of variance ~4e-6 the two eps differ by ~2x in y and dx."""
    tensors = _inputs(shape, with_residual, seed=11, scale=TINY)
    oracle = _reference_with_grads(*tensors, torch.float64)
    ours = _kernel_with_grads(*tensors, torch.float32)
    for name, got, expected in zip(("y",) + GRAD_NAMES, ours, oracle):
        if expected is not None:
            assert_close(got, expected, max_rel=FP32_REL, name=f"tiny-variance {name} {shape}")
    # The rows are small enough for eps to matter: 1e-5 would move y far past tolerance.
    x, weight, bias, residual, _ = tensors
    wrong_eps = reference.layer_norm(x, weight, bias, 1e-5, residual)
    assert max_relative_error(wrong_eps, oracle[0]) > 1000 * FP32_REL


@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("shape", [(7, 200), (127, 384), (4, 1024), (3, 33)],
                         ids=lambda s: "x".join(map(str, s)))
def test_fp16_within_2x_of_torch(shape, with_residual):
    tensors = _inputs(shape, with_residual, seed=1)
    oracle = _reference_with_grads(*tensors, torch.float64)
    torch_fp16 = _reference_with_grads(*tensors, torch.float16)
    ours = _kernel_with_grads(*tensors, torch.float16)
    for name, got, plain, expected in zip(("y",) + GRAD_NAMES, ours, torch_fp16, oracle):
        if expected is None:
            assert got.numel() == 0
            continue
        assert got.dtype == torch.float16, name
        assert_within_2x_of_torch(got, plain, expected, name=f"fp16 {name} {shape}")


def test_fp64_inputs_compute_in_fp64():
    tensors = _inputs((5, 200), with_residual=True, seed=2)
    oracle = _reference_with_grads(*tensors, torch.float64)
    ours = _kernel_with_grads(*tensors, torch.float64)
    for name, got, expected in zip(("y",) + GRAD_NAMES, ours, oracle):
        assert_close(got, expected, max_rel=1e-12, name=f"fp64 {name}")


def test_mixed_dtypes_fp16_activations_fp32_parameters():
    """fp16 activations with fp32 LayerNorm parameters (autocast's layout): y and dx in
    fp16, dweight and dbias in fp32, each within 2x of torch's error in the same layout."""
    x, weight, bias, residual, dy = _inputs((7, 384), with_residual=True, seed=3)
    oracle = _reference_with_grads(x, weight, bias, residual, dy, torch.float64)
    leaves = [x.half().requires_grad_(), weight.float().requires_grad_(),
              bias.float().requires_grad_(), residual.half().requires_grad_()]
    y_torch = reference.layer_norm(leaves[0], leaves[1], leaves[2], EPS, leaves[3])
    plain = [y_torch, *torch.autograd.grad(y_torch, leaves, dy.half())]
    x16, w32, b32, r16 = (t.detach() for t in leaves)
    y = layer_norm_kernel.forward(x16, w32, b32, EPS, r16)
    grads = layer_norm_kernel.backward(dy.half(), x16, w32, b32, EPS, r16, [True] * 4)
    assert [t.dtype for t in (y, *grads)] == [t.dtype for t in plain] == [
        torch.float16, torch.float16, torch.float32, torch.float32, torch.float16]
    for name, got, p, expected in zip(("y",) + GRAD_NAMES, [y, *grads], plain, oracle):
        assert_within_2x_of_torch(got, p, expected, name=f"mixed {name}")


@pytest.mark.parametrize("needs", [
    (True, False, False, False), (False, True, False, False), (False, False, True, False),
    (False, False, False, True), (False, True, True, False), (False, False, False, False),
], ids=lambda n: "".join("1" if b else "0" for b in n))
def test_only_requested_gradients_are_computed(needs):
    tensors = _inputs((7, 200), with_residual=True, seed=4)
    oracle = _reference_with_grads(*tensors, torch.float64)
    ours = _kernel_with_grads(*tensors, torch.float32, needs=needs)
    for name, need, got, expected in zip(GRAD_NAMES, needs, ours[1:], oracle[1:]):
        if need:
            assert_close(got, expected, max_rel=FP32_REL, name=f"{name} alone")
        else:
            assert got.numel() == 0, f"{name} was not requested but has shape {got.shape}"


def test_dx_and_dresidual_are_separate_tensors():
    x, weight, bias, residual, dy = (None if t is None else t.float()
                                     for t in _inputs((7, 200), with_residual=True, seed=5))
    dx, _, _, dres = layer_norm_kernel.backward(dy, x, weight, bias, EPS, residual, [True] * 4)
    assert torch.equal(dx, dres)
    assert dx.data_ptr() != dres.data_ptr()


def test_non_contiguous_inputs():
    """A row-strided slice (read in place) and a transposed tensor (copied)."""
    g = torch.Generator().manual_seed(6)
    wide = torch.randn(9, 300, generator=g)
    x = wide[:, 50:250]  # (9, 200), row stride 300
    residual = torch.randn(200, 9, generator=g).t()  # (9, 200), column stride 9
    weight, bias = torch.randn(400, generator=g)[::2], torch.randn(200, generator=g)
    dy = torch.randn(9, 200, generator=g)
    expected = _reference_with_grads(x.double(), weight.double(), bias.double(),
                                     residual.double(), dy.double(), torch.float64)
    y = layer_norm_kernel.forward(x, weight, bias, EPS, residual)
    grads = layer_norm_kernel.backward(dy, x, weight, bias, EPS, residual, [True] * 4)
    for name, got, exp in zip(("y",) + GRAD_NAMES, [y, *grads], expected):
        assert_close(got, exp, max_rel=FP32_REL, name=f"strided {name}")


def test_zero_rows():
    x = torch.empty(0, 200)
    weight, bias = torch.randn(200), torch.randn(200)
    y = layer_norm_kernel.forward(x, weight, bias, EPS, None)
    assert y.shape == (0, 200)
    dx, dweight, dbias, dres = layer_norm_kernel.backward(x, x, weight, bias, EPS, None,
                                                          [True] * 4)
    assert dx.shape == (0, 200) and dres.numel() == 0
    assert torch.equal(dweight, torch.zeros(200)) and torch.equal(dbias, torch.zeros(200))


@pytest.mark.parametrize("call, error, words", [
    (lambda x, w, b: layer_norm_kernel.forward(x.int(), w, b, EPS, None), TypeError, "x"),
    (lambda x, w, b: layer_norm_kernel.forward(x, w[:-1], b, EPS, None), ValueError, "weight"),
    (lambda x, w, b: layer_norm_kernel.forward(x, w, b.reshape(1, -1), EPS, None),
     ValueError, "bias"),
    (lambda x, w, b: layer_norm_kernel.forward(x, w, b, EPS, x[:-1]), ValueError, "residual"),
    (lambda x, w, b: layer_norm_kernel.forward(x, w, b, 0.0, None), ValueError, "eps"),
    (lambda x, w, b: layer_norm_kernel.forward(x, "w", b, EPS, None), TypeError, "weight"),
    (lambda x, w, b: layer_norm_kernel.backward(x, x, w, b, EPS, None, [True] * 3),
     ValueError, "needs_input_grad"),
    (lambda x, w, b: layer_norm_kernel.backward(x[:-1], x, w, b, EPS, None, [True] * 4),
     ValueError, "grad_output"),
], ids=["int-x", "weight-shape", "bias-2d", "residual-shape", "eps", "weight-type",
        "needs-length", "grad-shape"])
def test_bad_input_names_the_argument(call, error, words):
    x, weight, bias = torch.randn(3, 40), torch.randn(40), torch.randn(40)
    with pytest.raises(error, match=words):
        call(x, weight, bias)


# --------------------------------------------------------------------------------------
# Through the public op and the torch.library custom op
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_public_op_triton_backend_autograd(with_residual):
    x, weight, bias, residual, dy = _inputs((2, 7, 200), with_residual, seed=7)
    oracle = _reference_with_grads(x, weight, bias, residual, dy, torch.float64)
    leaves = [None if t is None else t.float().requires_grad_() for t in
              (x, weight, bias, residual)]
    y = ops.layer_norm(leaves[0], leaves[1], leaves[2], EPS, residual=leaves[3],
                       backend="triton")
    y.backward(dy.float())
    assert_close(y, oracle[0], max_rel=FP32_REL, name="op y")
    for name, leaf, expected in zip(GRAD_NAMES, leaves, oracle[1:]):
        if leaf is not None:
            assert_close(leaf.grad, expected, max_rel=FP32_REL, name=f"op {name}")


def test_custom_op_opcheck():
    x, weight, bias, residual, _ = (None if t is None else t.float()
                                    for t in _inputs((3, 33), with_residual=True, seed=8))
    for t in (x, weight, bias, residual):
        t.requires_grad_()
    torch.library.opcheck(torch.ops.spanbert_fast.layer_norm,
                          (x, weight, bias, EPS, residual, "triton"))
    torch.library.opcheck(torch.ops.spanbert_fast.layer_norm,
                          (x, weight, bias, EPS, None, "triton"))


def test_custom_op_opcheck_non_contiguous_x():
    """The kernels return contiguous y, dx and dresidual whatever the strides of x and
    residual, so the fake (meta) implementations must say so: under torch.compile a fake
    that copied a transposed x's strides would describe memory the kernel did not write
    that way."""
    x, weight, bias, residual, _ = (t.float() for t in _inputs((3, 33), with_residual=True,
                                                                seed=9))
    x, residual = (t.t().contiguous().t() for t in (x, residual))  # strides (1, 3)
    args = (x.requires_grad_(), weight.requires_grad_(), bias.requires_grad_(), EPS,
            residual.requires_grad_(), "triton")
    torch.library.opcheck(torch.ops.spanbert_fast.layer_norm, args)


# --------------------------------------------------------------------------------------
# GPU only
# --------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("hidden", [768, 1024])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_gpu_real_sizes_low_precision(dtype, hidden, with_residual):
    tensors = _inputs((32 * 512, hidden), with_residual, seed=9, device="cuda")
    oracle = _reference_with_grads(*tensors, torch.float64)
    plain = _reference_with_grads(*tensors, dtype)
    ours = _kernel_with_grads(*tensors, dtype)
    for name, got, p, o in zip(("y",) + GRAD_NAMES, ours, plain, oracle):
        if o is not None:
            assert_within_2x_of_torch(got, p, o, name=f"gpu {dtype} {hidden} {name}")


@pytest.mark.gpu
@pytest.mark.parametrize("hidden", [200, 768, 1000, 1024])
def test_gpu_fp32(hidden):
    tensors = _inputs((32 * 512, hidden), with_residual=True, seed=10, device="cuda")
    oracle = _reference_with_grads(*tensors, torch.float64)
    ours = _kernel_with_grads(*tensors, torch.float32)
    for name, got, o in zip(("y",) + GRAD_NAMES, ours, oracle):
        assert_close(got, o, max_rel=FP32_REL, name=f"gpu fp32 {hidden} {name}")


def test_fp16_sublayer_output_plus_fp32_residual_returns_fp32():
    """Autocast's residual stream: x is a low-precision sublayer output, the residual fp32.
    The result has the dtype of x + residual (fp32), on both backends, and its gradients
    come back in each input's own dtype."""
    generator = torch.Generator().manual_seed(31)
    x = torch.randn(6, 40, generator=generator).half().requires_grad_()
    residual = torch.randn(6, 40, generator=generator).requires_grad_()
    weight, bias = torch.randn(40, generator=generator), torch.randn(40, generator=generator)
    dy = torch.randn(6, 40, generator=generator)
    results = {}
    for backend in ("torch", "triton"):
        out = ops.layer_norm(x, weight, bias, 1e-12, residual=residual, backend=backend)
        assert out.dtype == torch.float32, backend
        dx, dres = torch.autograd.grad(out, (x, residual), dy)
        assert dx.dtype == torch.float16 and dres.dtype == torch.float32, backend
        results[backend] = (out, dx, dres)
    for name, got, want in zip(("out", "dx", "dresidual"), results["triton"], results["torch"]):
        assert_close(got.float(), want.float(), max_rel=1e-5 if name != "dx" else 1e-3,
                     name=f"mixed-dtype layer_norm {name}")
