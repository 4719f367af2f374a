"""Arguments are checked once, at the public boundary (spanbert_fast.ops.<op>): the Triton
launchers behind a public op skip their own checks, forward and backward. A custom op
called directly (``torch.ops.spanbert_fast.<op>``) still has its launcher check."""

import pytest
import torch

from spanbert_fast import ops

pytestmark = pytest.mark.skipif(not ops.dispatch.triton_ops_available(),
                                reason="needs triton (the interpreter runs on CPU)")


def _count_checks(monkeypatch, module_name):
    module = ops.dispatch.kernel_module(module_name)
    calls = []
    original = module._check_inputs

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "_check_inputs", counted)
    return calls


def _attention_inputs():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 24, 32, requires_grad=True) for _ in range(3))
    mask = torch.ones(2, 24, dtype=torch.bool)
    mask[1, 17:] = False
    return q, k, v, mask


def test_attention_launchers_skip_the_checks_the_public_op_ran(monkeypatch):
    calls = _count_checks(monkeypatch, "attention")
    q, k, v, mask = _attention_inputs()
    out = ops.attention(q, k, v, key_padding_mask=mask, backend="triton")
    out.sum().backward()
    assert calls == []
    seed = torch.zeros(1, dtype=torch.int64)
    torch.ops.spanbert_fast.flash_attention_forward(q.detach(), k.detach(), v.detach(), mask,
                                                   None, 0, 0.125, 0.0, seed)
    assert len(calls) == 1  # called directly: the launcher checks


def test_bias_gelu_launchers_skip_the_checks_the_public_op_ran(monkeypatch):
    calls = _count_checks(monkeypatch, "bias_gelu")
    x = torch.randn(5, 48, requires_grad=True)
    bias = torch.randn(48, requires_grad=True)
    ops.bias_gelu(x, bias, backend="triton").sum().backward()
    assert calls == []
    torch.ops.spanbert_fast.bias_gelu(x.detach(), bias.detach(), "triton")
    assert len(calls) == 1
    with pytest.raises(ValueError, match="bias must have shape"):  # and it still refuses
        torch.ops.spanbert_fast.bias_gelu(x.detach(), bias.detach()[:7], "triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fused", "fp16"])
def test_linear_cross_entropy_launchers_skip_the_checks_the_public_op_ran(monkeypatch,
                                                                          dtype):
    calls = _count_checks(monkeypatch, "linear_cross_entropy")
    torch.manual_seed(0)
    hidden = torch.randn(6, 16, dtype=dtype, requires_grad=True)
    weight = torch.randn(40, 16, dtype=dtype, requires_grad=True)
    labels = torch.tensor([3, -100, 7, 39, 0, 12])
    ops.linear_cross_entropy(hidden, weight, None, labels, backend="triton").backward()
    assert calls == []
    torch.ops.spanbert_fast.fused_linear_cross_entropy(hidden.detach(), weight.detach(), None,
                                                       labels, -100, False)
    assert len(calls) == 1


def _count(monkeypatch, module_name, function_name):
    module = ops.dispatch.kernel_module(module_name)
    calls = []
    original = getattr(module, function_name)

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, function_name, counted)
    return calls


def test_layer_norm_launchers_skip_the_checks_the_public_op_ran(monkeypatch):
    calls = _count(monkeypatch, "layer_norm", "_check_inputs")
    x = torch.randn(5, 8, requires_grad=True)
    weight, bias = torch.randn(8, requires_grad=True), torch.randn(8, requires_grad=True)
    ops.layer_norm(x, weight, bias, 1e-12, residual=torch.randn(5, 8),
                   backend="triton").sum().backward()
    assert calls == []
    # Called directly, the dedicated op checks (a short weight would be read out of bounds).
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        torch.ops.spanbert_fast.layer_norm_forward(x.detach(), weight.detach()[:4],
                                                   bias.detach(), 1e-12, None)
    y, mean, rstd = torch.ops.spanbert_fast.layer_norm_forward(
        x.detach(), weight.detach(), bias.detach(), 1e-12, None)
    with pytest.raises(ValueError, match="grad_output must have x's shape"):
        torch.ops.spanbert_fast.layer_norm_backward(
            y[:2], x.detach(), weight.detach(), bias.detach(), None, mean, rstd,
            [True, True, True, False])
    assert len(calls) == 3


def _head_args(rel_pos_value=1):
    torch.manual_seed(0)
    width, positions = 8, 3
    hidden = torch.randn(6, width, requires_grad=True)
    left, right = torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5])
    rel = torch.full((3,), rel_pos_value, dtype=torch.int64)
    params = [torch.randn(positions, 4), torch.randn(width, 2 * width + 4),
              torch.randn(width), torch.randn(width) + 1, torch.randn(width),
              torch.randn(width, width), torch.randn(width), torch.randn(width) + 1,
              torch.randn(width)]
    return [hidden, left, right, rel, *[p.requires_grad_() for p in params]]


def test_span_boundary_head_launchers_skip_the_checks_the_public_op_ran(monkeypatch):
    calls = _count(monkeypatch, "span_boundary_head", "_check_head_inputs")
    args = _head_args()
    ops.span_boundary_head(*args, 1e-12, backend="triton").sum().backward()
    assert calls == []
    # Called directly, the dedicated op checks, index ranges included.
    bad = [a.detach() for a in _head_args(rel_pos_value=7)]
    with pytest.raises(ValueError, match=r"rel_pos values must lie in \[0, 3\)"):
        torch.ops.spanbert_fast.span_boundary_head_forward(*bad, 1e-12)
    assert len(calls) == 1
