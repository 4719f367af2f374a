"""The op layer: dispatch, torch.library registration, reference semantics, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from spanbert_fast import ops
from spanbert_fast.ops import reference
from parity import assert_close

FP32_REL = 1e-5


def _attention_inputs(batch=3, heads=2, seq=9, head_dim=8, dtype=torch.float32):
    q, k, v = (torch.randn(batch, heads, seq, head_dim, dtype=dtype) for _ in range(3))
    lengths = torch.tensor([seq, 4, 1][:batch])
    mask = torch.arange(seq).unsqueeze(0) < lengths.unsqueeze(1)
    return q, k, v, mask, lengths


def _sbo_inputs(tokens=12, width=8, pos_rows=5, pos_width=3, n=6, dtype=torch.float32):
    g = torch.Generator().manual_seed(11)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    hidden = r(tokens, width)
    left = torch.randint(0, tokens, (n,), generator=g)
    right = torch.randint(0, tokens, (n,), generator=g)
    rel = torch.randint(0, pos_rows, (n,), generator=g)
    params = dict(position_table=r(pos_rows, pos_width), w1=r(width, 2 * width + pos_width) * 0.3,
                  b1=r(width), ln1_weight=1 + 0.1 * r(width), ln1_bias=r(width),
                  w2=r(width, width) * 0.3, b2=r(width), ln2_weight=1 + 0.1 * r(width),
                  ln2_bias=r(width))
    return hidden, left, right, rel, params


# --------------------------------------------------------------------------------------
# Reference semantics
# --------------------------------------------------------------------------------------
def test_attention_matches_naive_softmax_in_fp64():
    q, k, v, mask, lengths = _attention_inputs(dtype=torch.float64)
    out = ops.attention(q, k, v, key_padding_mask=mask, backend="torch")
    for b, length in enumerate(lengths.tolist()):
        scores = q[b] @ k[b, :, :length].transpose(-1, -2) / math.sqrt(q.shape[-1])
        expected = torch.softmax(scores, dim=-1) @ v[b, :, :length]
        assert_close(out[b], expected, max_rel=1e-12, name=f"row {b}")


def test_attention_rows_without_keys_are_zero_not_nan():
    q, k, v, mask, _ = _attention_inputs()
    mask[1] = False
    out = ops.attention(q, k, v, key_padding_mask=mask, backend="torch")
    assert torch.isfinite(out).all()
    assert torch.count_nonzero(out[1]) == 0


def test_packed_layout_equals_padded_layout():
    q, k, v, mask, lengths = _attention_inputs()
    padded = ops.attention(q, k, v, key_padding_mask=mask, backend="torch")

    def pack(x):  # (B, H, S, D) -> (total, H, D) keeping real tokens only
        return x.transpose(1, 2)[mask]

    cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    packed = ops.attention(pack(q), pack(k), pack(v), cu_seqlens=cu_seqlens,
                           max_seqlen=int(lengths.max()), backend="torch")
    assert_close(packed, pack(padded), max_rel=FP32_REL, name="packed vs padded")


def test_layer_norm_with_residual_matches_torch():
    x, residual = torch.randn(5, 7, 200), torch.randn(5, 7, 200)
    weight, bias = torch.randn(200), torch.randn(200)
    got = ops.layer_norm(x, weight, bias, 1e-12, residual=residual, backend="torch")
    expected = torch.nn.functional.layer_norm(x + residual, (200,), weight, bias, 1e-12)
    assert_close(got, expected, max_rel=FP32_REL, name="layer_norm")


def test_layer_norm_low_precision_keeps_fp32_statistics():
    x = torch.randn(4, 384, dtype=torch.bfloat16) * 50 + 300  # large mean: fp16/bf16 stats would drift
    weight, bias = torch.ones(384, dtype=torch.bfloat16), torch.zeros(384, dtype=torch.bfloat16)
    got = ops.layer_norm(x, weight, bias, 1e-12, backend="torch")
    assert got.dtype == torch.bfloat16
    expected = torch.nn.functional.layer_norm(x.double(), (384,), eps=1e-12)
    assert (got.double() - expected).abs().max().item() < 2e-2


def test_bias_gelu_is_exact_erf_gelu():
    x, bias = torch.randn(6, 33, dtype=torch.float64), torch.randn(33, dtype=torch.float64)
    h = (x + bias).numpy()
    erf = np.vectorize(math.erf)
    expected = torch.from_numpy(0.5 * h * (1.0 + erf(h / math.sqrt(2.0))))
    assert_close(ops.bias_gelu(x, bias, backend="torch"), expected, max_rel=1e-14, name="gelu")


def test_span_boundary_head_matches_hand_written_formula():
    """DESIGN.md: y = LN(GELU(W2 · LN(GELU(W1 · [h[s-1]; h[e+1]; p[i-s]] + b1)) + b2)),
    written out here element by element in float64 with math.erf."""
    hidden, left, right, rel, p = _sbo_inputs(dtype=torch.float64)
    got = ops.span_boundary_head(hidden, left, right, rel, eps=1e-12, backend="torch", **p)

    def gelu(z):
        return [0.5 * t * (1.0 + math.erf(t / math.sqrt(2.0))) for t in z]

    def layer_norm(z, w, b):
        mean = sum(z) / len(z)
        var = sum((t - mean) ** 2 for t in z) / len(z)
        return [(t - mean) / math.sqrt(var + 1e-12) * wi + bi for t, wi, bi in zip(z, w, b)]

    def affine(w, x, b):
        return [sum(wij * xj for wij, xj in zip(row, x)) + bi for row, bi in zip(w, b)]

    P = {k: v.tolist() for k, v in p.items()}
    H = hidden.tolist()
    for t in range(left.numel()):
        x = H[left[t]] + H[right[t]] + P["position_table"][rel[t]]
        y = layer_norm(gelu(affine(P["w1"], x, P["b1"])), P["ln1_weight"], P["ln1_bias"])
        y = layer_norm(gelu(affine(P["w2"], y, P["b2"])), P["ln2_weight"], P["ln2_bias"])
        assert_close(got[t], torch.tensor(y, dtype=torch.float64), max_rel=1e-12, name=f"target {t}")


def test_linear_cross_entropy_matches_torch_and_handles_no_targets():
    hidden, weight, bias = torch.randn(10, 16), torch.randn(1000, 16), torch.randn(1000)
    labels = torch.randint(0, 1000, (10,))
    labels[[2, 5]] = -100
    got = ops.linear_cross_entropy(hidden, weight, bias, labels, backend="torch")
    expected = torch.nn.functional.cross_entropy(hidden @ weight.T + bias, labels)
    assert_close(got, expected, max_rel=FP32_REL, name="loss")
    none_valid = torch.full((10,), -100)
    zero = ops.linear_cross_entropy(hidden, weight, bias, none_valid, backend="torch")
    assert zero.item() == 0.0
    empty = ops.linear_cross_entropy(hidden[:0], weight, bias, labels[:0], backend="torch")
    assert empty.item() == 0.0


# --------------------------------------------------------------------------------------
# torch.library registration: schema, fake, autograd; and the backward op's gradients
# --------------------------------------------------------------------------------------
def _custom_op_cases():
    q, k, v, mask, lengths = _attention_inputs(batch=2, seq=5, head_dim=4)
    hidden, left, right, rel, p = _sbo_inputs()
    x = torch.randn(3, 4, 10)
    return {
        "attention": (q, k, v, mask, None, 0, 0.5, 0.0),
        "layer_norm": (x, torch.randn(10), torch.randn(10), 1e-12, torch.randn(3, 4, 10)),
        "bias_gelu": (x, torch.randn(10)),
        "span_boundary_head": (hidden, left, right, rel, p["position_table"], p["w1"], p["b1"],
                               p["ln1_weight"], p["ln1_bias"], p["w2"], p["b2"],
                               p["ln2_weight"], p["ln2_bias"], 1e-12),
        "linear_cross_entropy": (torch.randn(6, 8), torch.randn(50, 8), torch.randn(50),
                                 torch.tensor([1, -100, 49, 0, 3, 7]), -100),
    }


@pytest.mark.parametrize("name", list(_custom_op_cases()))
def test_custom_op_registration_passes_opcheck(name):
    args = _custom_op_cases()[name]
    args = tuple(a.clone().requires_grad_(a.is_floating_point()) if isinstance(a, torch.Tensor)
                 else a for a in args)
    torch.library.opcheck(getattr(torch.ops.spanbert_fast, name), args + ("torch",))


@pytest.mark.parametrize("name", list(_custom_op_cases()))
def test_custom_op_gradients_equal_reference_autograd(name):
    args = _custom_op_cases()[name]
    def fresh():
        return [a.clone().requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point()
                else a for a in args]
    direct_args, op_args = fresh(), fresh()
    direct = getattr(reference, name)(*direct_args)
    through_op = getattr(torch.ops.spanbert_fast, name)(*op_args, "torch")
    assert_close(through_op, direct, max_rel=FP32_REL, name=f"{name} forward")
    upstream = torch.randn_like(direct)
    direct.backward(upstream)
    through_op.backward(upstream)
    for i, (a, b) in enumerate(zip(op_args, direct_args)):
        if isinstance(a, torch.Tensor) and a.requires_grad:
            assert_close(a.grad, b.grad, max_rel=FP32_REL, name=f"{name} grad of arg {i}")


def test_custom_ops_compile_fullgraph():
    q, k, v, mask, _ = _attention_inputs(batch=2, seq=5, head_dim=4)
    q.requires_grad_(True)

    def step(q, k, v, mask):
        out = torch.ops.spanbert_fast.attention(q, k, v, mask, None, 0, 0.5, 0.0, "torch")
        return torch.ops.spanbert_fast.bias_gelu(out, torch.ones(4), "torch").sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, v, mask)
    loss.backward()
    expected_q = q.detach().clone().requires_grad_(True)
    step(expected_q, k, v, mask).backward()
    assert_close(q.grad, expected_q.grad, max_rel=FP32_REL, name="compiled grad")


# --------------------------------------------------------------------------------------
# Backend selection
# --------------------------------------------------------------------------------------
def test_unknown_backend_is_a_value_error():
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.bias_gelu(x, torch.randn(4), backend="cuda")


def test_explicit_triton_without_kernel_lists_every_reason(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    # Simulate a build without any Triton kernel, whatever this checkout has.
    monkeypatch.setattr(ops.dispatch, "_triton_probed", True)
    monkeypatch.setattr(ops.dispatch, "_triton_import_error", None)
    monkeypatch.setattr(ops.dispatch, "_KERNEL_MODULES", {})
    monkeypatch.setattr(ops.dispatch, "_kernel_import_errors", {})
    x = torch.randn(2, 4)
    with pytest.raises(ops.BackendUnavailableError) as err:
        ops.bias_gelu(x, torch.randn(4), backend="triton")
    message = str(err.value)
    assert "no Triton kernel is implemented for 'bias_gelu'" in message
    assert "Triton needs CUDA tensors" in message
    assert "(2, 4) float32 on cpu" in message


def test_env_variable_forces_backend(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # CPU tensors then cannot run Triton
    x = torch.randn(2, 4)
    monkeypatch.setenv("SPANBERT_FAST_BACKEND", "triton")
    with pytest.raises(ops.BackendUnavailableError):
        ops.bias_gelu(x, torch.randn(4))
    monkeypatch.setenv("SPANBERT_FAST_BACKEND", "torch")
    assert ops.resolve_backend("auto", "bias_gelu", [x]) == "torch"
    monkeypatch.setenv("SPANBERT_FAST_BACKEND", "fast")
    with pytest.raises(ValueError, match="SPANBERT_FAST_BACKEND"):
        ops.bias_gelu(x, torch.randn(4))


def test_auto_on_cpu_is_torch(monkeypatch):
    monkeypatch.delenv("SPANBERT_FAST_BACKEND", raising=False)
    assert ops.resolve_backend("auto", "attention", [torch.randn(2)]) == "torch"


def test_custom_op_refuses_torch_dropout_it_cannot_replay():
    q, k, v, mask, _ = _attention_inputs()
    with pytest.raises(ValueError, match="does not support dropout_p > 0"):
        torch.ops.spanbert_fast.attention(q, k, v, mask, None, 0, 0.5, 0.1, "torch")
    # The public op runs torch-backend dropout through plain autograd instead.
    out = ops.attention(q, k, v, key_padding_mask=mask, dropout_p=0.1, backend="torch")
    assert torch.isfinite(out).all()


def test_attn_bias_falls_back_with_one_warning():
    q, k, v, mask, _ = _attention_inputs()
    bias = torch.randn(1, 1, 9, 9)
    ops.dispatch._warned.discard("attn_bias")
    with pytest.warns(UserWarning, match="attn_bias"):
        got = ops.attention(q, k, v, attn_bias=bias)
    expected = reference.attention(q, k, v, attn_bias=bias)
    assert_close(got, expected, max_rel=FP32_REL, name="attn_bias")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.attention(q, k, v, attn_bias=bias)  # second call: no warning


# --------------------------------------------------------------------------------------
# Bad input: every message names the argument
# --------------------------------------------------------------------------------------
def test_attention_bad_input():
    q, k, v, mask, _ = _attention_inputs()
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        ops.attention(q.tolist(), k, v)
    with pytest.raises(ValueError, match="k must have shape"):
        ops.attention(q, k[:, :, :4], v)
    with pytest.raises(TypeError, match="q, k, v must share a dtype"):
        ops.attention(q, k.double(), v)
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        ops.attention(q, k, v, key_padding_mask=mask[:, :3])
    with pytest.raises(TypeError, match="key_padding_mask must be bool or integer"):
        ops.attention(q, k, v, key_padding_mask=mask.float())
    with pytest.raises(ValueError, match="dropout_p"):
        ops.attention(q, k, v, dropout_p=1.5)
    with pytest.raises(ValueError, match="softmax_scale"):
        ops.attention(q, k, v, softmax_scale=-1.0)
    with pytest.raises(ValueError, match="padded layout: q must be 4-D"):
        ops.attention(q[0], k[0], v[0])
    packed = q.transpose(1, 2).reshape(-1, 2, 8)
    with pytest.raises(ValueError, match="cu_seqlens must start at 0"):
        ops.attention(packed, packed, packed, cu_seqlens=torch.tensor([0, 5], dtype=torch.int32),
                      max_seqlen=9)
    with pytest.raises(ValueError, match="max_seqlen"):
        ops.attention(packed, packed, packed,
                      cu_seqlens=torch.tensor([0, 27], dtype=torch.int32), max_seqlen=9)


def test_other_ops_bad_input():
    x = torch.randn(3, 10)
    with pytest.raises(ValueError, match="weight must have shape"):
        ops.layer_norm(x, torch.ones(9), torch.zeros(10))
    with pytest.raises(ValueError, match="residual must have shape"):
        ops.layer_norm(x, torch.ones(10), torch.zeros(10), residual=x[:2])
    with pytest.raises(ValueError, match="eps must be > 0"):
        ops.layer_norm(x, torch.ones(10), torch.zeros(10), eps=0.0)
    with pytest.raises(TypeError, match="x must have dtype"):
        ops.bias_gelu(x.long(), torch.zeros(10))
    with pytest.raises(ValueError, match="labels values must lie in"):
        ops.linear_cross_entropy(x, torch.randn(50, 10), None, torch.tensor([0, 50, 1]))
    with pytest.raises(TypeError, match="labels must have dtype"):
        ops.linear_cross_entropy(x, torch.randn(50, 10), None, torch.tensor([0.0, 1.0, 2.0]))
    hidden, left, right, rel, p = _sbo_inputs()
    with pytest.raises(ValueError, match="left_index values must lie in"):
        ops.span_boundary_head(hidden, left + 100, right, rel, **p)
    with pytest.raises(ValueError, match="rel_pos values must lie in"):
        ops.span_boundary_head(hidden, left, right, rel + 5, **p)
    bad = dict(p, w1=p["w1"][:, :-1])
    with pytest.raises(ValueError, match="w1 must have shape"):
        ops.span_boundary_head(hidden, left, right, rel, **bad)


# --------------------------------------------------------------------------------------
# Autocast and mixed dtypes
# --------------------------------------------------------------------------------------


def test_span_boundary_head_under_autocast_same_in_eager_compiled_and_torch():
    """Under autocast the Triton SBO op returned fp16 in eager mode (a torch.mm inside its
    launcher followed autocast) but fp32 compiled (its fake), and a backward inside autocast
    crashed in index_add_. Its matmul inputs are now cast to the autocast dtype first and
    its body runs without autocast: eager, compiled and the torch backend agree."""
    hidden, left, right, rel, params = _sbo_inputs()
    leaves = [hidden.requires_grad_(), params["w1"].requires_grad_()]

    def run(backend):
        return ops.span_boundary_head(hidden, left, right, rel, backend=backend, **params)

    compiled = torch.compile(lambda: run("triton"), fullgraph=True, backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.float16):
        eager, from_graph, torch_out = run("triton"), compiled(), run("torch")
        grads = torch.autograd.grad(eager.float().sum(), leaves)  # backward inside autocast
    assert eager.dtype == from_graph.dtype == torch_out.dtype == torch.float16
    assert torch.equal(eager, from_graph)
    assert_close(eager.float(), torch_out.float(), max_rel=2e-3, name="sbo under autocast")
    assert [g.dtype for g in grads] == [torch.float32, torch.float32]


def test_linear_cross_entropy_under_autocast_matches_the_torch_backend():
    g = torch.Generator().manual_seed(12)
    hidden = torch.randn(6, 24, generator=g, requires_grad=True)
    weight = torch.randn(30, 24, generator=g, requires_grad=True)
    labels = torch.randint(0, 30, (6,), generator=g)
    with torch.autocast("cpu", dtype=torch.float16):
        losses = [ops.linear_cross_entropy(hidden, weight, None, labels, backend=b)
                  for b in ("triton", "torch")]
    assert all(l.dtype == torch.float32 for l in losses)
    assert_close(losses[0], losses[1], max_rel=1e-5, name="autocast linear cross-entropy")


def test_matmul_ops_refuse_mixed_dtypes_outside_autocast():
    """fp16 activations with fp32 weights: the Triton path accepted them (fp16 out) and the
    torch path crashed in F.linear; both now get a TypeError naming the dtypes."""
    hidden, left, right, rel, params = _sbo_inputs()
    for backend in ("triton", "torch"):
        with pytest.raises(TypeError, match="hidden float16, position_table float32"):
            ops.span_boundary_head(hidden.half(), left, right, rel, backend=backend, **params)
        with pytest.raises(TypeError, match="hidden float16, weight float32"):
            ops.linear_cross_entropy(hidden.half(), torch.randn(30, 8), None,
                                     torch.zeros(12, dtype=torch.long), backend=backend)


def test_span_boundary_head_checks_the_device_of_every_tensor():
    """b1 and the LayerNorm parameters were left out of the device check: b1 on meta sent
    the call to the fake, which returned uninitialised memory."""
    hidden, left, right, rel, params = _sbo_inputs()
    params["b1"] = params["b1"].to("meta")
    with pytest.raises(ValueError, match="b1 on meta"):
        ops.span_boundary_head(hidden, left, right, rel, backend="triton", **params)


# ---------------------------------------------------------------------------------------
# What a kernel cannot run is said by the kernel, and never silently substituted
# ---------------------------------------------------------------------------------------
def test_a_row_too_wide_for_the_layer_norm_kernel_is_refused_by_dispatch():
    """A (2, 20000) input passed dispatch under backend="triton" and failed in the launcher
    with a plain ValueError; "auto" must fall back instead of failing at all."""
    x, w, b = torch.randn(2, 20000), torch.randn(20000), torch.randn(20000)
    with pytest.raises(ops.BackendUnavailableError, match="hidden size 20000"):
        ops.layer_norm(x, w, b, backend="triton")
    assert ops.resolve_backend("auto", "layer_norm", [x.cuda() if torch.cuda.is_available()
                                                       else x, w, b]) == "torch"
    assert ops.dispatch.triton_reasons("layer_norm", [torch.randn(2, 768), w[:768], b[:768]]) == []


def test_attention_limits_come_from_the_kernel_file():
    kernel = ops.dispatch.kernel_module("attention")
    q = torch.randn(1, 2, 4, 256)
    assert any("head_dim <= 128" in r for r in kernel.not_supported_reasons([q]))
    with pytest.raises(ops.BackendUnavailableError, match="head_dim <= 128"):
        ops.attention(q, q, q, backend="triton")
    assert kernel.not_supported_reasons([torch.zeros(2, 3, dtype=torch.long)]) == []


def test_left_padding_under_explicit_triton_is_refused_not_substituted(monkeypatch):
    """The padded kernel reads key lengths: a left-padded mask ran the torch backend under
    backend="triton" after a once-per-process warning. Explicit triton now refuses, with
    the way out; auto still falls back, with the warning."""
    q, k, v = (torch.randn(2, 2, 6, 8) for _ in range(3))
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, :2] = False  # left padding
    with pytest.raises(ops.BackendUnavailableError, match="not right padding"):
        ops.attention(q, k, v, key_padding_mask=mask, backend="triton")
    monkeypatch.setenv("SPANBERT_FAST_BACKEND", "triton")
    with pytest.raises(ops.BackendUnavailableError, match="not right padding"):
        ops.attention(q, k, v, key_padding_mask=mask)
    monkeypatch.delenv("SPANBERT_FAST_BACKEND")
    # "auto" picks Triton on CUDA only; there it falls back with the warning.
    out = ops.attention(q, k, v, key_padding_mask=mask, backend="auto")
    expected = reference.attention(q, k, v, mask, None, 0, 8 ** -0.5, 0.0)
    assert torch.allclose(out, expected, atol=1e-6)
    right = mask.flip(1)  # right padding still runs the kernel
    assert ops.attention(q, k, v, key_padding_mask=right, backend="triton").shape == q.shape
