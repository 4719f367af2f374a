"""Issue 13: on the Triton backend a backward never reruns a forward kernel or GEMM.

The forward saves what its backward needs (LayerNorm: per-row mean and rstd; the SBO head:
the gathered boundary rows, both GEMM outputs, the first layer's output and both
LayerNorms' statistics; attention: the log-sum-exp), so ``.backward()`` launches only
backward kernels and runs only gradient GEMMs. Two spies prove it in the Triton
interpreter on CPU:

* a launch spy on Triton's ``run`` records the name of every kernel launched;
* a ``TorchDispatchMode`` records every GEMM (``mm``, ``addmm``, ``bmm``, ...) with its
  operand shapes, looking inside the ``spanbert_fast`` custom ops too (a dispatch mode
  sees a custom op as one call; the spy re-runs its CPU body with the mode pushed again).

Measured before this change (generic custom ops that saved only the inputs): no
statistics reached the LayerNorm backward kernels (each recomputed every row's mean and
variance), the SBO head's backward relaunched the epilogue's forward kernel and ran 10
GEMMs (its 3 forward GEMMs again + 7 gradient GEMMs), and a tiny pretraining step's
backward launched 1 forward kernel and ran 36 GEMMs. After: the backward kernels read the
forward's MEAN/RSTD, 0 forward launches, 7 GEMMs in the head, 33 in the step.
"""

from __future__ import annotations

from collections import Counter
from typing import List, Tuple

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import spanbert_fast as sf
from spanbert_fast import ops
from spanbert_fast.ops import reference
from parity import assert_close, grads_of

triton = pytest.importorskip("triton")
if not ops.dispatch.triton_ops_available():
    pytest.skip("Triton kernels unavailable", allow_module_level=True)

EPS = 1e-12
FP32_REL = 1e-5

_GEMMS = {getattr(torch.ops.aten, name) for name in (
    "mm", "addmm", "bmm", "baddbmm", "addbmm", "matmul", "linear", "mv", "addmv", "dot",
    "_scaled_mm") if hasattr(torch.ops.aten, name)}


class GemmLog(TorchDispatchMode):
    """Every GEMM dispatched while active, as ``(op, shape of a, shape of b)``, including
    those inside ``spanbert_fast`` custom ops (whose CPU body is re-run with the mode on:
    a dispatch mode otherwise sees a custom op as one opaque call)."""

    def __init__(self):
        super().__init__()
        self.gemms: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "spanbert_fast":
            with self:
                return func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU),
                                       *args, **kwargs)
        if func.overloadpacket in _GEMMS:
            a, b = (args[1], args[2]) if func.overloadpacket in (
                torch.ops.aten.addmm, torch.ops.aten.baddbmm, torch.ops.aten.addbmm,
                torch.ops.aten.addmv) else (args[0], args[1])
            self.gemms.append((func.overloadpacket.__name__, tuple(a.shape), tuple(b.shape)))
        return func(*args, **kwargs)


class Launches(list):
    """The names of the Triton kernels launched, in order; ``args[i]`` holds launch i's
    arguments by parameter name (to follow a tensor from one kernel to another)."""

    def __init__(self):
        super().__init__()
        self.args: List[dict] = []

    def clear(self):
        super().clear()
        self.args.clear()

    def of(self, kernel: str) -> List[dict]:
        return [a for name, a in zip(self, self.args) if name == kernel]


@pytest.fixture
def launches(monkeypatch):
    """Every Triton kernel launch (interpreter and compiled), as :class:`Launches`."""
    record = Launches()
    classes = [triton.runtime.jit.JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction
        classes.append(InterpretedFunction)
    except ImportError:  # a triton without the interpreter
        pass
    for cls in classes:
        original = cls.run

        def run(self, *args, _original=original, **kwargs):
            if not kwargs.get("warmup", False):
                record.append(self.fn.__name__)
                record.args.append(dict(zip(self.arg_names, args)))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "run", run)
    return record


def _forward_kernels(names: List[str]) -> List[str]:
    return [n for n in names if "forward" in n]


def _reads_what_the_forward_wrote(written: List[dict], read: List[dict]) -> None:
    """The backward launches take, as MEAN and RSTD, the very tensors the forward launches
    wrote there: the saved statistics, not a recomputation."""
    assert written and read
    for name in ("MEAN", "RSTD"):
        missing = not all(name in a for a in written + read)
        assert not missing, (f"a launch has no {name} argument: the forward kernel does not "
                             "write the statistics or the backward kernel does not read them")
        assert (sorted(a[name].data_ptr() for a in written)
                == sorted(a[name].data_ptr() for a in read)), name


# --------------------------------------------------------------------------------------
# LayerNorm
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_layer_norm_backward_reads_the_saved_statistics(launches, dtype, with_residual):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 200, generator=g, dtype=torch.float64) * 2.0 + 0.5
    weight = 1.0 + 0.5 * torch.randn(200, generator=g, dtype=torch.float64)
    bias = torch.randn(200, generator=g, dtype=torch.float64)
    residual = torch.randn(2, 7, 200, generator=g, dtype=torch.float64) if with_residual else None
    dy = torch.randn(2, 7, 200, generator=g, dtype=torch.float64)
    leaves = [None if t is None else t.to(dtype).requires_grad_()
              for t in (x, weight, bias, residual)]
    y = ops.layer_norm(leaves[0], leaves[1], leaves[2], EPS, residual=leaves[3],
                       backend="triton")
    assert launches == ["_layer_norm_forward_kernel"]
    written = launches.of("_layer_norm_forward_kernel")
    launches.clear()
    with GemmLog() as log:
        y.backward(dy.to(dtype))
    assert launches == ["_layer_norm_backward_kernel"], launches
    _reads_what_the_forward_wrote(written, launches.of("_layer_norm_backward_kernel"))
    assert log.gemms == []
    if dtype == torch.float32:
        # The gradients from the saved statistics are the oracle's.
        expected = grads_of(reference.layer_norm, (x, weight, bias, EPS, residual), dy,
                            torch.float64)
        for name, leaf, want in zip(("dx", "dweight", "dbias", "dresidual"), leaves,
                                    expected[1:]):
            if leaf is not None:
                assert_close(leaf.grad, want, max_rel=FP32_REL, name=name)


def test_layer_norm_statistics_are_fp32_for_half_and_fp64_for_double():
    """The forward op returns the per-row mean and rstd in the accumulator dtype."""
    for dtype, stats_dtype in ((torch.float16, torch.float32), (torch.float32, torch.float32),
                               (torch.float64, torch.float64)):
        x = torch.randn(3, 5, 40, dtype=dtype)
        weight, bias = torch.randn(40, dtype=dtype), torch.randn(40, dtype=dtype)
        y, mean, rstd = torch.ops.spanbert_fast.layer_norm_forward(x, weight, bias, EPS, None)
        assert mean.shape == rstd.shape == (3, 5)
        assert mean.dtype == rstd.dtype == stats_dtype
        rows = x.double()
        assert_close(mean, rows.mean(-1), max_rel=1e-3 if dtype == torch.float16 else 1e-6,
                     name=f"mean {dtype}")
        expected_rstd = (rows.var(-1, unbiased=False) + EPS).rsqrt()
        assert_close(rstd, expected_rstd, max_rel=1e-3 if dtype == torch.float16 else 1e-6,
                     name=f"rstd {dtype}")


def test_layer_norm_compiles_with_the_saved_statistics_ops():
    """The fakes give y, mean and rstd their shapes and dtypes (fp16 rows, fp32 statistics):
    a compiled forward and backward (aot_eager) matches eager."""
    g = torch.Generator().manual_seed(6)
    x, residual = (torch.randn(2, 5, 40, generator=g).half().requires_grad_() for _ in range(2))
    weight, bias = (torch.randn(40, generator=g).requires_grad_() for _ in range(2))
    dy = torch.randn(2, 5, 40, generator=g).half()

    def norm(*tensors):
        return ops.layer_norm(tensors[0], tensors[1], tensors[2], EPS, residual=tensors[3],
                              backend="triton")

    leaves = (x, weight, bias, residual)
    out = torch.compile(norm, fullgraph=True, backend="aot_eager")(*leaves)
    grads = torch.autograd.grad(out, leaves, dy)
    expected_out = norm(*leaves)
    expected = torch.autograd.grad(expected_out, leaves, dy)
    assert torch.equal(out, expected_out)
    for name, got, want in zip(("dx", "dweight", "dbias", "dresidual"), grads, expected):
        assert got.dtype == want.dtype and torch.equal(got, want), name


def test_layer_norm_saved_statistics_ops_pass_opcheck():
    g = torch.Generator().manual_seed(1)
    x, residual = (torch.randn(3, 33, generator=g).requires_grad_() for _ in range(2))
    weight, bias = (torch.randn(33, generator=g).requires_grad_() for _ in range(2))
    torch.library.opcheck(torch.ops.spanbert_fast.layer_norm_forward,
                          (x, weight, bias, EPS, residual))
    torch.library.opcheck(torch.ops.spanbert_fast.layer_norm_forward,
                          (x, weight, bias, EPS, None))
    y, mean, rstd = torch.ops.spanbert_fast.layer_norm_forward(x, weight, bias, EPS, residual)
    dy = torch.randn(3, 33, generator=g)
    torch.library.opcheck(torch.ops.spanbert_fast.layer_norm_backward,
                          (dy, x.detach(), weight.detach(), bias.detach(),
                           residual.detach(), mean.detach(), rstd.detach(),
                           [True, True, True, True]))


# --------------------------------------------------------------------------------------
# Span-boundary head
# --------------------------------------------------------------------------------------
TOKENS, H, P, E, N = 20, 48, 15, 200, 13  # N, H, 2H, P and E all distinct


def _head_inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    fan_in = 2 * H + E
    args = [
        r(TOKENS, H), torch.randint(0, TOKENS, (N,), generator=g),
        torch.randint(0, TOKENS, (N,), generator=g), torch.randint(0, P, (N,), generator=g),
        r(P, E), r(H, fan_in) / fan_in ** 0.5, 0.2 * r(H), 1.0 + 0.3 * r(H), 0.2 * r(H),
        r(H, H) / H ** 0.5, 0.2 * r(H), 1.0 + 0.3 * r(H), 0.2 * r(H),
    ]
    dy = r(N, H)
    leaves = [a.to(dtype).requires_grad_() if a.is_floating_point() else a for a in args]
    return args, leaves, dy


# The head's gradient GEMMs, (a, b) operand shapes. Two per linear layer over the N
# targets: layer 2's dW2 = dz2^T y1 and dy1 = dz2 W2; layer 1's boundary columns
# dW1[:, :2H] = dz1^T gathered and d_gathered = dz1 W1[:, :2H]. The position columns of
# layer 1 act on the P-row table, not on N rows: d_projection = onehot(rel)^T dz1 (the
# segment sum by rel_pos, as a deterministic GEMM), dW1[:, 2H:] = d_projection^T table and
# d_table = d_projection W1[:, 2H:].
GRADIENT_GEMMS = Counter({
    ((H, N), (N, H)): 1,            # dW2
    ((N, H), (H, H)): 1,            # dy1
    ((H, N), (N, 2 * H)): 1,        # dW1[:, :2H]
    ((N, H), (H, 2 * H)): 1,        # d_gathered
    ((P, N), (N, H)): 1,            # d_projection
    ((H, P), (P, E)): 1,            # dW1[:, 2H:]
    ((P, H), (H, E)): 1,            # d_table
})
# The forward's: z1 = gathered W1[:, :2H]^T, projection = table W1[:, 2H:]^T, z2 = y1 W2^T.
FORWARD_GEMMS = Counter({((N, 2 * H), (2 * H, H)): 1, ((P, E), (E, H)): 1,
                         ((N, H), (H, H)): 1})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_span_boundary_head_backward_runs_only_gradient_gemms(launches, dtype):
    args, leaves, dy = _head_inputs(dtype)
    with GemmLog() as forward_log:
        out = ops.span_boundary_head(*leaves, EPS, backend="triton")
    assert Counter((a, b) for _, a, b in forward_log.gemms) == FORWARD_GEMMS
    assert launches == ["_bias_gelu_layer_norm_forward_kernel"] * 2
    written = launches.of("_bias_gelu_layer_norm_forward_kernel")
    launches.clear()
    with GemmLog() as log:
        out.backward(dy.to(dtype))
    assert _forward_kernels(launches) == [], launches
    assert launches == ["_bias_gelu_layer_norm_backward_kernel"] * 2
    _reads_what_the_forward_wrote(written, launches.of("_bias_gelu_layer_norm_backward_kernel"))
    shapes = Counter((a, b) for _, a, b in log.gemms)
    assert shapes == GRADIENT_GEMMS, (
        f"{len(log.gemms)} GEMMs in the backward: {log.gemms}")
    assert not (shapes.keys() & {((N, 2 * H), (2 * H, H)), ((P, E), (E, H))}), \
        "the backward reran a forward GEMM"
    if dtype == torch.float32:
        _, *expected = grads_of(reference.span_boundary_head, (*args, EPS), dy, torch.float64)
        floats = [leaf for leaf in leaves if leaf.is_floating_point()]
        for i, (leaf, want) in enumerate(zip(floats, expected)):
            assert_close(leaf.grad, want, max_rel=FP32_REL, name=f"grad {i}")


def test_span_boundary_head_only_the_needed_gemms_run():
    """A frozen head (only hidden needs a gradient, as when fine-tuning the encoder
    through a fixed SBO head): no weight GEMM, no table GEMM."""
    _, leaves, dy = _head_inputs(torch.float32, seed=1)
    frozen = [leaf.detach() if leaf.is_floating_point() else leaf for leaf in leaves]
    frozen[0].requires_grad_()
    out = ops.span_boundary_head(*frozen, EPS, backend="triton")
    with GemmLog() as log:
        out.backward(dy.float())
    assert Counter((a, b) for _, a, b in log.gemms) == Counter({
        ((N, H), (H, H)): 1, ((N, H), (H, 2 * H)): 1})


def test_span_boundary_head_saved_tensor_ops_pass_opcheck():
    _, leaves, dy = _head_inputs(torch.float32, seed=2)
    torch.library.opcheck(torch.ops.spanbert_fast.span_boundary_head_forward,
                          (*leaves, EPS))
    detached = [leaf.detach() for leaf in leaves]
    _, *saved = torch.ops.spanbert_fast.span_boundary_head_forward(*detached, EPS)
    needs = [t.is_floating_point() for t in detached]
    torch.library.opcheck(torch.ops.spanbert_fast.span_boundary_head_backward,
                          (dy.float(), *detached, *saved, needs))


def test_span_boundary_head_compiles_with_the_saved_tensor_ops():
    """The fakes give the saved tensors' shapes and dtypes: a compiled forward and
    backward (aot_eager) matches eager."""
    _, leaves, dy = _head_inputs(torch.float32, seed=3)

    def head(*tensors):
        return ops.span_boundary_head(*tensors, EPS, backend="triton")

    compiled = torch.compile(head, fullgraph=True, backend="aot_eager")
    out = compiled(*leaves)
    grads = torch.autograd.grad(out, [leaf for leaf in leaves if leaf.is_floating_point()],
                                dy.float())
    expected_out = head(*leaves)
    expected = torch.autograd.grad(expected_out,
                                   [leaf for leaf in leaves if leaf.is_floating_point()],
                                   dy.float())
    assert_close(out, expected_out, max_rel=FP32_REL, name="compiled out")
    for i, (got, want) in enumerate(zip(grads, expected)):
        assert_close(got, want, max_rel=FP32_REL, name=f"compiled grad {i}")


# --------------------------------------------------------------------------------------
# Attention and bias-GELU: already saved what they need; held to it here
# --------------------------------------------------------------------------------------
def test_attention_backward_launches_no_forward_kernel(launches):
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 2, 9, 16, generator=g).requires_grad_() for _ in range(3))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    out = ops.attention(q, k, v, key_padding_mask=mask, backend="triton")
    assert launches == ["_attention_forward_kernel"]
    launches.clear()
    with GemmLog() as log:
        out.backward(torch.randn(2, 2, 9, 16, generator=g))
    assert _forward_kernels(launches) == [] and launches, launches
    assert log.gemms == []


def test_bias_gelu_backward_launches_no_forward_kernel(launches):
    """bias_gelu's backward kernel re-adds ``x + bias`` elementwise inside itself (a
    load it would pay for a saved pre-activation anyway); no forward kernel runs."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(7, 96, generator=g).requires_grad_()
    bias = torch.randn(96, generator=g).requires_grad_()
    out = ops.bias_gelu(x, bias, backend="triton")
    launches.clear()
    out.backward(torch.randn(7, 96, generator=g))
    assert launches == ["_bias_gelu_backward_kernel"], launches


def test_a_pretraining_step_backward_launches_no_forward_kernel(launches):
    """The whole tiny model on the Triton backend (fp32): the backward of a pretraining
    step launches backward kernels only."""
    torch.manual_seed(0)
    config = sf.SpanBertConfig.tiny()
    model = sf.SpanBertForPreTraining(config, backend="triton").train()
    ids = torch.randint(5, config.vocab_size, (2, 16))
    labels = torch.full_like(ids, -100)
    labels[0, 3:6] = ids[0, 3:6]
    sbo = torch.tensor([[0, 2, 6, 0, 17], [0, 2, 6, 2, 18], [1, 4, 9, 1, 20]])
    loss = model(ids, labels=labels, sbo_targets=sbo).loss
    assert "_bias_gelu_layer_norm_forward_kernel" in launches
    launches.clear()
    loss.backward()
    assert _forward_kernels(launches) == [], Counter(launches)
    assert "_layer_norm_backward_kernel" in launches
    assert "_bias_gelu_layer_norm_backward_kernel" in launches
