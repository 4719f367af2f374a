"""The span-boundary head on the Triton backend (kernels/span_boundary_head.py) against the
reference, in the Triton interpreter on CPU.

Oracle: :func:`spanbert_fast.ops.reference.span_boundary_head` in fp64, differentiated by
autograd. fp32 must be within 1e-5 max relative error of it for the output and every
gradient (hidden, position table, w1, b1, both LayerNorms, w2, b2). fp16 follows the 2x
rule against the same reference run in fp16 (its GEMMs and GELU in fp16, LayerNorm
statistics in fp32: plain torch in that dtype), differentiated by autograd.

Shapes: odd widths (33, 48), the release's 15 x 200 position table, a 200-wide table on a
small case, H = 768 on a few targets, duplicate boundary rows (targets sharing a boundary,
and left == right) whose gradients must accumulate, and N = 0 targets. Every buffer the
launchers allocate for a kernel to fill is NaN-poisoned first. GPU-only tests (bf16,
H = 768/1024 at pretraining sizes) are marked ``gpu``.
"""

from __future__ import annotations

import pytest
import torch

from spanbert_fast import ops
from spanbert_fast.ops import reference
from parity import assert_close, assert_within_2x_of_torch, grads_of

span_boundary = pytest.importorskip("spanbert_fast.kernels.span_boundary_head")

FP32_REL = 1e-5
EPS = 1e-12  # SpanBERT's LayerNorm eps
NAMES = span_boundary.TENSOR_ARGUMENTS
INDEX_NAMES = ("left_index", "right_index", "rel_pos")


@pytest.fixture(autouse=True)
def _poison_buffers(monkeypatch):
    monkeypatch.setattr(span_boundary, "POISON_BUFFERS", True)


def _inputs(tokens, width, table_rows, table_width, targets, *, seed=0, device="cpu",
            duplicates=True):
    """The op's 13 tensors in fp64 (indices int64) plus an upstream gradient.

    With ``duplicates``, target 1 reuses target 0's left boundary as its right one, target 2
    has left == right, and target 3 repeats target 0's boundaries: gradients of one hidden
    row come from several places and must add up.
    """
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    fan_in = 2 * width + table_width
    args = [
        r(tokens, width),
        torch.randint(0, tokens, (targets,), generator=g),
        torch.randint(0, tokens, (targets,), generator=g),
        torch.randint(0, table_rows, (targets,), generator=g),
        r(table_rows, table_width),
        r(width, fan_in) / fan_in ** 0.5, 0.2 * r(width), 1.0 + 0.3 * r(width), 0.2 * r(width),
        r(width, width) / width ** 0.5, 0.2 * r(width), 1.0 + 0.3 * r(width), 0.2 * r(width),
    ]
    left, right = args[1], args[2]
    if duplicates and targets >= 4:
        right[1] = left[0]
        right[2] = left[2]
        left[3], right[3] = left[0], right[0]
    grad_output = r(targets, width)
    return [a.to(device) for a in args], grad_output.to(device)


def _reference_with_grads(args, grad_output, dtype):
    """Reference output and the gradient of every float argument, in ``dtype``
    (fp64: the oracle). Gradients are listed for the 10 float arguments in op order."""
    out, *grads = grads_of(reference.span_boundary_head, (*args, EPS), grad_output, dtype)
    return out, dict(zip([n for n in NAMES if n not in INDEX_NAMES], grads))


def _kernel_with_grads(args, grad_output, dtype, needs=None):
    cast = [a.to(dtype) if a.is_floating_point() else a for a in args]
    out = span_boundary.forward(*cast, EPS)
    needs = [n not in INDEX_NAMES for n in NAMES] if needs is None else needs
    grads = span_boundary.backward(grad_output.to(dtype), *cast, EPS, needs)
    assert len(grads) == 13
    return out, dict(zip(NAMES, grads))


CASES = {
    # tokens, H, P, E, N
    "H48_table15x200": (20, 48, 15, 200, 13),
    "H33_table4x7": (9, 33, 4, 7, 6),
    "H48_table3x200": (11, 48, 3, 200, 5),
    "H768_table15x200": (8, 768, 15, 200, 4),
}


@pytest.mark.parametrize("shape", CASES.values(), ids=CASES.keys())
def test_fp32_matches_fp64_oracle(shape):
    args, dy = _inputs(*shape)
    expected_out, expected = _reference_with_grads(args, dy, torch.float64)
    out, grads = _kernel_with_grads(args, dy, torch.float32)
    assert out.dtype == torch.float32
    assert_close(out, expected_out, max_rel=FP32_REL, name=f"out {shape}")
    for name in NAMES:
        if name in INDEX_NAMES:
            assert grads[name].numel() == 0, f"{name} is an index: no gradient"
            continue
        assert grads[name].dtype == torch.float32, name
        assert_close(grads[name], expected[name], max_rel=FP32_REL, name=f"{name} {shape}")


def test_fp64_inputs_compute_in_fp64():
    args, dy = _inputs(*CASES["H33_table4x7"], seed=2)
    expected_out, expected = _reference_with_grads(args, dy, torch.float64)
    out, grads = _kernel_with_grads(args, dy, torch.float64)
    assert_close(out, expected_out, max_rel=1e-12, name="fp64 out")
    for name, want in expected.items():
        assert_close(grads[name], want, max_rel=1e-12, name=f"fp64 {name}")


def test_shared_boundary_rows_accumulate():
    """Every target uses hidden row 3 (as left or right, and both at once): its gradient is
    the sum over all uses, and untouched rows get exactly 0."""
    args, dy = _inputs(10, 48, 15, 200, 6, seed=3, duplicates=False)
    args[1] = torch.tensor([3, 3, 0, 3, 7, 3])
    args[2] = torch.tensor([5, 3, 3, 9, 3, 3])
    _, expected = _reference_with_grads(args, dy, torch.float64)
    _, grads = _kernel_with_grads(args, dy, torch.float32)
    assert_close(grads["hidden"], expected["hidden"], max_rel=FP32_REL, name="dhidden")
    untouched = [1, 2, 4, 6, 8]
    assert torch.equal(grads["hidden"][untouched], torch.zeros(len(untouched), 48))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_zero_targets(dtype):
    args, dy = _inputs(7, 33, 15, 200, 0)
    out, grads = _kernel_with_grads(args, dy, dtype)
    assert out.shape == (0, 33) and out.dtype == dtype
    _, expected = _reference_with_grads(args, dy, torch.float64)
    for name, want in expected.items():
        assert grads[name].shape == want.shape, name
        assert torch.equal(grads[name], torch.zeros_like(grads[name])), f"{name} must be 0"


@pytest.mark.parametrize("shape", [CASES["H48_table15x200"], CASES["H33_table4x7"],
                                   (16, 64, 15, 200, 24)],
                         ids=["H48_table15x200", "H33_table4x7", "H64_N24"])
def test_fp16_within_2x_of_torch(shape):
    args, dy = _inputs(*shape, seed=1)
    oracle_out, oracle = _reference_with_grads(args, dy, torch.float64)
    torch_out, torch_grads = _reference_with_grads(args, dy, torch.float16)
    out, grads = _kernel_with_grads(args, dy, torch.float16)
    assert out.dtype == torch.float16
    assert_within_2x_of_torch(out, torch_out, oracle_out, name=f"fp16 out {shape}")
    for name, want in oracle.items():
        assert grads[name].dtype == torch.float16, name
        assert_within_2x_of_torch(grads[name], torch_grads[name], want,
                                  name=f"fp16 {name} {shape}")


@pytest.mark.parametrize("wanted", [("w2",), ("ln2_weight", "ln2_bias", "b2"),
                                    ("hidden",), ("position_table", "b1"),
                                    ("w1", "ln1_weight", "ln1_bias")],
                         ids=lambda w: "+".join(w))
def test_only_requested_gradients(wanted):
    args, dy = _inputs(*CASES["H33_table4x7"], seed=4)
    _, expected = _reference_with_grads(args, dy, torch.float64)
    needs = [name in wanted for name in NAMES]
    _, grads = _kernel_with_grads(args, dy, torch.float32, needs=needs)
    for name in NAMES:
        if name in wanted:
            assert_close(grads[name], expected[name], max_rel=FP32_REL, name=name)
        else:
            assert grads[name].numel() == 0, f"{name} was not asked for"


def test_epilogue_matches_reference_ops():
    """The fused ``LN(GELU(z + table[index] + bias))`` alone, forward and backward, against
    the reference's bias_gelu and layer_norm in fp64 (bias and LN parameters in fp32)."""
    g = torch.Generator().manual_seed(5)
    z = torch.randn(9, 200, generator=g, dtype=torch.float64)
    table = torch.randn(4, 200, generator=g, dtype=torch.float64)
    index = torch.tensor([0, 3, 3, 1, 2, 0, 0, 3, 1])
    bias, ln_w, ln_b = (torch.randn(200, generator=g, dtype=torch.float64) for _ in range(3))
    dy = torch.randn(9, 200, generator=g, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (z, table, bias, ln_w, ln_b)]
    ref = reference.layer_norm(reference.bias_gelu(leaves[0] + leaves[1][index], leaves[2]),
                               leaves[3], leaves[4], EPS)
    ref_grads = torch.autograd.grad(ref, leaves, dy)
    params = [t.float() for t in (bias, ln_w, ln_b)]
    out = span_boundary.bias_gelu_layer_norm_forward(z.float(), params[0], params[1],
                                                     params[2], EPS, table.float(), index)
    dz, dbias, dln_w, dln_b = span_boundary.bias_gelu_layer_norm_backward(
        dy.float(), z.float(), params[0], params[1], EPS, table.float(), index)
    assert_close(out, ref, max_rel=FP32_REL, name="epilogue out")
    assert_close(dz, ref_grads[0], max_rel=FP32_REL, name="epilogue dz")
    dtable = torch.zeros(4, 200, dtype=torch.float64).index_add_(0, index, dz.double())
    assert_close(dtable, ref_grads[1], max_rel=FP32_REL, name="epilogue dtable")
    for name, got, want in (("dbias", dbias, ref_grads[2]), ("dln_weight", dln_w, ref_grads[3]),
                            ("dln_bias", dln_b, ref_grads[4])):
        assert got.dtype == torch.float32
        assert_close(got, want, max_rel=FP32_REL, name=f"epilogue {name}")


def test_bad_inputs_name_the_argument():
    args, dy = _inputs(*CASES["H33_table4x7"], seed=6)
    args = [a.float() if a.is_floating_point() else a for a in args]

    def call(**changes):
        call_args = list(args)
        for name, value in changes.items():
            call_args[NAMES.index(name)] = value
        return span_boundary.forward(*call_args, EPS)

    with pytest.raises(ValueError, match=r"left_index values must lie in \[0, 9\)"):
        call(left_index=args[1] + 9)
    with pytest.raises(ValueError, match=r"rel_pos values must lie in \[0, 4\)"):
        call(rel_pos=args[3] - 1)
    with pytest.raises(TypeError, match="right_index must be a 1-D int64"):
        call(right_index=args[2].int())
    with pytest.raises(ValueError, match=r"rel_pos must have shape \(6,\)"):
        call(rel_pos=args[3][:5])
    with pytest.raises(ValueError, match=r"w1 must have shape \(33, 73\)"):
        call(w1=args[5][:, :70])
    with pytest.raises(TypeError, match="w2 must have hidden's dtype"):
        call(w2=args[9].double())
    with pytest.raises(ValueError, match=r"ln2_bias must have shape \(33,\)"):
        call(ln2_bias=args[12][:3])
    with pytest.raises(ValueError, match="eps must be a float > 0"):
        span_boundary.forward(*args, 0.0)
    with pytest.raises(ValueError, match="needs_input_grad must be a list of 13 bools"):
        span_boundary.backward(dy.float(), *args, EPS, [True] * 12)
    with pytest.raises(ValueError, match=r"grad_output must have shape \(6, 33\)"):
        span_boundary.backward(dy.float()[:5], *args, EPS, [True] * 13)


def test_public_op_with_triton_backend():
    """``spanbert_fast.ops.span_boundary_head(backend="triton")`` end to end with autograd,
    through the generic custom op."""
    args, dy = _inputs(*CASES["H48_table15x200"], seed=7)
    expected_out, expected = _reference_with_grads(args, dy, torch.float64)
    leaves = [a.float().requires_grad_() if a.is_floating_point() else a for a in args]
    out = ops.span_boundary_head(*leaves, EPS, backend="triton")
    out.backward(dy.float())
    assert_close(out, expected_out, max_rel=FP32_REL, name="ops out")
    for name, leaf in zip(NAMES, leaves):
        if name not in INDEX_NAMES:
            assert_close(leaf.grad, expected[name], max_rel=FP32_REL, name=f"ops {name}")


# --------------------------------------------------------------------------------------
# GPU only
# --------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("width", [768, 1024])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_pretraining_sizes_within_2x_of_torch(dtype, width):
    """32 x 512 tokens, ~15% of them SBO targets, the release's 15 x 200 table."""
    args, dy = _inputs(16384, width, 15, 200, 2458, seed=8, device="cuda")
    oracle_out, oracle = _reference_with_grads(args, dy, torch.float64)
    torch_out, torch_grads = _reference_with_grads(args, dy, dtype)
    out, grads = _kernel_with_grads(args, dy, dtype)
    assert_within_2x_of_torch(out, torch_out, oracle_out, name=f"{dtype} H{width} out")
    for name, want in oracle.items():
        assert_within_2x_of_torch(grads[name], torch_grads[name], want,
                                  name=f"{dtype} H{width} {name}")


@pytest.mark.gpu
def test_gpu_fp32_pretraining_sizes():
    args, dy = _inputs(4096, 1024, 15, 200, 700, seed=9, device="cuda")
    expected_out, expected = _reference_with_grads(args, dy, torch.float64)
    out, grads = _kernel_with_grads(args, dy, torch.float32)
    assert_close(out, expected_out, max_rel=FP32_REL, name="gpu fp32 out")
    for name, want in expected.items():
        assert_close(grads[name], want, max_rel=FP32_REL, name=f"gpu fp32 {name}")


def test_strided_index_columns_as_the_model_passes_them():
    """The model slices left/right/rel_pos out of one (N, 5) sbo_targets tensor, so the
    index tensors have stride 5; a launcher that assumed unit stride read garbage."""
    args, dy = _inputs(*CASES["H48_table15x200"], seed=9)
    hidden, left, right, rel = args[:4]
    targets = torch.stack([torch.zeros_like(left), left, right, rel, torch.zeros_like(left)], dim=1)
    _, left_s, right_s, rel_s, _ = targets.unbind(1)
    assert rel_s.stride(0) == 5
    strided = (hidden, left_s, right_s, rel_s) + tuple(args[4:])
    expected_out, expected = _reference_with_grads(args, dy, torch.float64)
    leaves = [a.float().requires_grad_() if a.is_floating_point() else a for a in strided]
    out = ops.span_boundary_head(*leaves, EPS, backend="triton")
    out.backward(dy.float())
    assert_close(out, expected_out, max_rel=FP32_REL, name="strided indices out")
    for name, leaf in zip(NAMES, leaves):
        if name not in INDEX_NAMES:
            assert_close(leaf.grad, expected[name], max_rel=FP32_REL, name=f"strided {name}")


def test_autocast_layout_half_hidden_with_fp32_parameters():
    """Under ``torch.autocast`` the model hands the op fp16/bf16 encoder rows but fp32
    parameters (position table, w1, w2, biases, LayerNorms): autocast never casts the
    arguments of a custom op. The GEMMs run in hidden's dtype, as autocast runs the
    reference's ``F.linear``; the output is in hidden's dtype and every gradient in its
    input's dtype, within 2x of torch under the same autocast."""
    args, dy = _inputs(*CASES["H48_table15x200"], seed=10)
    oracle_out, oracle = _reference_with_grads(args, dy, torch.float64)
    leaves = [(a.half() if name == "hidden" else a.float()).requires_grad_()
              if a.is_floating_point() else a for name, a in zip(NAMES, args)]
    with torch.autocast("cpu", dtype=torch.float16):
        torch_out = reference.span_boundary_head(*leaves, EPS)
    floats = [(name, leaf) for name, leaf in zip(NAMES, leaves) if leaf.is_floating_point()]
    torch_grads = dict(zip([n for n, _ in floats], torch.autograd.grad(
        torch_out, [leaf for _, leaf in floats], dy.half())))
    mixed = [leaf.detach() for leaf in leaves]
    out = span_boundary.forward(*mixed, EPS)
    grads = dict(zip(NAMES, span_boundary.backward(dy.half(), *mixed, EPS, [True] * 13)))
    assert out.dtype == torch_out.dtype == torch.float16
    assert_within_2x_of_torch(out, torch_out, oracle_out, name="autocast layout out")
    for name, want in oracle.items():
        assert grads[name].dtype == torch_grads[name].dtype, name
        assert_within_2x_of_torch(grads[name], torch_grads[name], want,
                                  name=f"autocast layout {name}")


def test_fp16_boundary_gradients_are_summed_in_fp32():
    """d_hidden is a scatter-add over the targets (one boundary row serves every target of
    a span, and [CLS]-side rows several spans). On a GPU, index_add_ on an fp16/bf16
    buffer rounds at every atomic add (this CPU's index_add_ happens to sum half in
    higher precision, so the rounding cannot be shown here): the scatter must run on an
    fp32 buffer. Checked on the aten call itself, then the result against the oracle."""
    from torch.utils._python_dispatch import TorchDispatchMode

    scatter_dtypes = []

    class RecordIndexAdd(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.index_add_, torch.ops.aten.index_add):
                scatter_dtypes.append(args[0].dtype)
            return func(*args, **(kwargs or {}))

    args, dy = _inputs(12, 48, 15, 200, 400, seed=6, duplicates=False)
    args[1] = torch.full((400,), 3)
    args[2] = torch.randint(5, 12, (400,), generator=torch.Generator().manual_seed(7))
    _, expected = _reference_with_grads(args, dy, torch.float64)
    with RecordIndexAdd():
        _, grads = _kernel_with_grads(args, dy, torch.float16)
    assert scatter_dtypes == [torch.float32]
    assert grads["hidden"].dtype == torch.float16
    torch_out, torch_grads = _reference_with_grads(args, dy, torch.float16)
    assert_within_2x_of_torch(grads["hidden"], torch_grads["hidden"], expected["hidden"],
                              name="fp16 dhidden, one row shared by 400 targets")
