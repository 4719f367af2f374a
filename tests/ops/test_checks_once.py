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
