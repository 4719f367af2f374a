"""The Triton attention kernel against the reference, in the interpreter on CPU.

Lengths {1, 7, 64, 127, 128, 130} sit in one batch (one-token rows, rows shorter than a
tile, exactly one and two tiles, and partial last tiles); heads 1-4; head dims 32/64; fp32
to 1e-5 of an fp64 oracle, fp16 by the 2x rule. Output buffers are poisoned with NaN
before the kernel writes them. GPU-only tests (bf16, real sizes, the whole model against
transformers) are marked ``gpu``.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from spanbert_fast import ops
from spanbert_fast.ops import reference
from parity import assert_close, assert_within_2x_of_torch, grads_of

attention_kernel = pytest.importorskip("spanbert_fast.kernels.attention")

LENGTHS = (1, 7, 64, 127, 128, 130)
FP32_REL = 1e-5


def _inputs(layout, dtype, heads, head_dim, lengths=LENGTHS, seed=0):
    generator = torch.Generator().manual_seed(seed)
    batch, seq = len(lengths), max(lengths)
    lengths_t = torch.tensor(lengths)
    mask = torch.arange(seq).unsqueeze(0) < lengths_t.unsqueeze(1)
    shape = (batch, heads, seq, head_dim)
    q, k, v, dout = (torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(4))
    if layout == "packed":
        def pack(x):
            return x.transpose(1, 2)[mask].contiguous()
        q, k, v, dout = (pack(t) for t in (q, k, v, dout))
    cu_seqlens = torch.nn.functional.pad(lengths_t.cumsum(0), (1, 0)).to(torch.int32)
    return (q, k, v, dout), mask, cu_seqlens, seq


def _layout_kwargs(layout, mask, cu_seqlens, seq):
    if layout == "packed":
        return dict(cu_seqlens=cu_seqlens, max_seqlen=seq)
    return dict(key_padding_mask=mask)


def _reference_with_grads(tensors, dtype, layout, mask, cu_seqlens, seq, upcast=True):
    q, k, v, dout = tensors
    kwargs = _layout_kwargs(layout, mask, cu_seqlens, seq)
    return tuple(grads_of(
        lambda q, k, v: reference.attention(q, k, v, kwargs.get("key_padding_mask"),
                                            kwargs.get("cu_seqlens"), seq, None, 0.0,
                                            upcast=upcast),
        (q, k, v), dout, dtype))


def _kernel_with_grads(tensors, dtype, layout, mask, cu_seqlens, seq):
    """Launch forward and backward directly, into NaN-poisoned buffers."""
    q, k, v, dout = (t.to(dtype) for t in tensors)
    scale = 1.0 / math.sqrt(q.shape[-1])
    lengths = mask.sum(1).to(torch.int32) if layout == "padded" else None
    cu = cu_seqlens if layout == "packed" else None
    out = torch.full_like(q, float("nan"))
    out, lse = attention_kernel.attention_forward(q, k, v, lengths, cu, seq, scale, 0.0, 0, out=out)
    grads_out = tuple(torch.full_like(t, float("nan")) for t in (q, k, v))
    grads = attention_kernel.attention_backward(dout, q, k, v, out, lse, lengths, cu, seq,
                                                scale, 0.0, 0, grads_out=grads_out)
    return (out, *grads)


CASES = [  # layout, dtype, heads, head_dim
    ("padded", torch.float32, 2, 64),
    ("packed", torch.float32, 3, 32),
    ("padded", torch.float16, 1, 32),
    ("packed", torch.float16, 4, 64),
]


@pytest.mark.parametrize("layout, dtype, heads, head_dim", CASES,
                         ids=[f"{c[0]}-{str(c[1])[6:]}-h{c[2]}-d{c[3]}" for c in CASES])
def test_forward_and_gradients_match_reference(layout, dtype, heads, head_dim):
    tensors, mask, cu_seqlens, seq = _inputs(layout, dtype, heads, head_dim)
    got = _kernel_with_grads(tensors, dtype, layout, mask, cu_seqlens, seq)
    oracle = _reference_with_grads(tensors, torch.float64, layout, mask, cu_seqlens, seq)
    names = ("out", "dq", "dk", "dv")
    if dtype == torch.float32:
        for name, g, o in zip(names, got, oracle):
            assert_close(g, o, max_rel=FP32_REL, name=f"{layout} {name}")
        return
    plain = _reference_with_grads(tensors, dtype, layout, mask, cu_seqlens, seq, upcast=False)
    for name, g, p, o in zip(names, got, plain, oracle):
        assert_within_2x_of_torch(g, p, o, name=f"{layout} {name}")


def test_rows_without_keys_give_zeros_and_zero_gradients():
    # Padded: a row whose key length is 0. Packed: an empty sequence between two others.
    tensors, mask, cu_seqlens, seq = _inputs("padded", torch.float32, 2, 32, lengths=(5, 0, 9))
    out, dq, dk, dv = _kernel_with_grads(tensors, torch.float32, "padded", mask, cu_seqlens, seq)
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert torch.isfinite(t).all(), name
        assert torch.count_nonzero(t[1]) == 0, f"{name} of the empty row must be zero"
    tensors, mask, cu_seqlens, seq = _inputs("packed", torch.float32, 2, 32, lengths=(5, 0, 9))
    got = _kernel_with_grads(tensors, torch.float32, "packed", mask, cu_seqlens, seq)
    oracle = _reference_with_grads(tensors, torch.float64, "packed", mask, cu_seqlens, seq)
    for name, g, o in zip(("out", "dq", "dk", "dv"), got, oracle):
        assert_close(g, o, max_rel=FP32_REL, name=f"packed with empty sequence {name}")


def test_odd_head_dim_is_masked_not_misread():
    tensors, mask, cu_seqlens, seq = _inputs("padded", torch.float32, 2, 24, lengths=(7, 33))
    got = _kernel_with_grads(tensors, torch.float32, "padded", mask, cu_seqlens, seq)
    oracle = _reference_with_grads(tensors, torch.float64, "padded", mask, cu_seqlens, seq)
    for name, g, o in zip(("out", "dq", "dk", "dv"), got, oracle):
        assert_close(g, o, max_rel=FP32_REL, name=f"head_dim 24 {name}")


# ---------------------------------------------------------------------------------------
# Through the public op (custom op + autograd), as the model uses it
# ---------------------------------------------------------------------------------------
def test_public_op_triton_backend_with_autograd():
    tensors, mask, cu_seqlens, seq = _inputs("padded", torch.float32, 2, 32, lengths=(7, 40, 33))
    q, k, v, dout = (t.float().requires_grad_(i < 3) for i, t in enumerate(tensors))
    # A non-contiguous view, as the model's (B, S, H, D) -> (B, H, S, D) transpose gives.
    qt = q.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True)
    out = ops.attention(qt, k, v, key_padding_mask=mask, backend="triton")
    out.backward(dout)
    oracle = _reference_with_grads(tensors, torch.float64, "padded", mask, cu_seqlens, seq)
    for name, g, o in zip(("out", "dq", "dk", "dv"), (out, qt.grad, k.grad, v.grad), oracle):
        assert_close(g, o, max_rel=FP32_REL, name=f"ops.attention triton {name}")


def test_flash_attention_custom_op_passes_opcheck():
    tensors, mask, cu_seqlens, seq = _inputs("packed", torch.float32, 1, 16, lengths=(3, 9))
    q, k, v = (t.float().requires_grad_(True) for t in tensors[:3])
    args = (q, k, v, None, cu_seqlens, seq, 0.25, 0.0, torch.zeros(1, dtype=torch.int64))
    torch.library.opcheck(torch.ops.spanbert_fast.flash_attention_forward, args)


def test_compile_fullgraph_over_triton_attention():
    tensors, mask, cu_seqlens, seq = _inputs("padded", torch.float32, 1, 16, lengths=(3, 9))
    q, k, v = (t.float() for t in tensors[:3])
    q.requires_grad_(True)

    def f(q, k, v, mask):
        return ops.attention(q, k, v, key_padding_mask=mask, backend="triton").square().sum()

    loss = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, mask)
    loss.backward()
    expected_q = q.detach().clone().requires_grad_(True)
    f(expected_q, k, v, mask).backward()
    assert_close(q.grad, expected_q.grad, max_rel=FP32_REL, name="compiled dq")


def test_left_padding_is_refused_under_explicit_triton():
    """The padded kernel reads key lengths. Under an explicit backend="triton" a left-padded
    mask used to run the torch reference after a once-per-process warning (a silent
    substitution); it is now refused, naming the packed layout as the way out, and the
    torch backend gives the oracle's answer."""
    tensors, mask, cu_seqlens, seq = _inputs("padded", torch.float32, 1, 16, lengths=(3, 9))
    q, k, v = (t.float() for t in tensors[:3])
    left = mask.flip(1)
    with pytest.raises(ops.BackendUnavailableError, match="not right padding.*cu_seqlens"):
        ops.attention(q, k, v, key_padding_mask=left, backend="triton")
    got = ops.attention(q, k, v, key_padding_mask=left, backend="torch")
    assert_close(got, reference.attention(q, k, v, left), max_rel=FP32_REL, name="left padding")
    # Inside the custom op (e.g. under torch.compile, where it cannot be checked first) the
    # same mask is refused, never silently misread.
    with pytest.raises(ValueError, match="right-padding mask"):
        torch.ops.spanbert_fast.flash_attention_forward(q, k, v, left, None, seq, 0.25, 0.0,
                                                        torch.zeros(1, dtype=torch.int64))


def test_inputs_the_kernel_cannot_take_fall_back_under_auto_and_raise_when_forced(monkeypatch):
    q = torch.randn(1, 1, 4, 8, dtype=torch.float64)
    monkeypatch.delenv("SPANBERT_FAST_BACKEND", raising=False)
    reasons = ops.dispatch.triton_reasons("attention", [q])
    assert any("fp16/bf16/fp32" in r for r in reasons)
    wide = torch.randn(1, 1, 4, 160)
    assert any("head_dim <= 128" in r for r in ops.dispatch.triton_reasons("attention", [wide]))
    with pytest.raises(ops.BackendUnavailableError, match="head_dim <= 128"):
        ops.attention(wide, wide, wide, backend="triton")
    with pytest.raises(ValueError, match="runs backend 'torch' only"):
        torch.ops.spanbert_fast.attention(wide, wide, wide, None, None, 0, 0.1, 0.0, "triton")


def test_bf16_in_the_interpreter_is_refused_not_wrong(monkeypatch):
    """The interpreter's bf16 tl.dot is garbage (relative errors ~1e8): a forced Triton
    backend returned it silently. It is now refused with the reason; on a GPU bf16 runs."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q = torch.randn(1, 2, 8, 16, dtype=torch.bfloat16)
    with pytest.raises(ops.BackendUnavailableError, match="bf16 tl.dot gives wrong results"):
        ops.attention(q, q, q, backend="triton")
    assert not any("bf16" in r for r in ops.dispatch.triton_reasons("attention", [q.half()]))


# ---------------------------------------------------------------------------------------
# Dropout: kept fraction, determinism, gradients consistent with the forward's mask
# ---------------------------------------------------------------------------------------
DROP = 0.1


def _layout_of_lengths(layout, lengths, seq):
    """``ops.attention`` keyword arguments for sequences of ``lengths`` (at most ``seq``):
    "dense" (padded layout, no mask; every length is ``seq``), "padded" (right-padding
    ``key_padding_mask``) or "packed" (``cu_seqlens``, ``max_seqlen``)."""
    if layout == "packed":
        cu_seqlens = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
        return dict(cu_seqlens=cu_seqlens, max_seqlen=seq)
    if layout == "padded":
        return dict(key_padding_mask=torch.arange(seq) < torch.tensor(lengths).unsqueeze(1))
    assert all(n == seq for n in lengths)
    return {}


def _shape_of_layout(layout, lengths, heads, seq, dim):
    if layout == "packed":
        return (sum(lengths), heads, dim)
    return (len(lengths), heads, seq, dim)


def _per_sequence(t, layout, lengths):
    """One ``(heads, rows, dim)`` view per sequence: the packed tensor's slice between its
    ``cu_seqlens`` (``lengths[b]`` rows), or the padded tensor's batch row (all ``seq``
    rows: padded query rows exist and attend to the sequence's keys)."""
    if layout == "packed":
        bounds = [0, *itertools.accumulate(lengths)]
        return [t[a:b].transpose(0, 1) for a, b in zip(bounds, bounds[1:])]
    return list(t.unbind(0))


def _recover_keep_mask(layout, lengths, heads, seq, seed):
    """With q = k = 0 each of a sequence's n keys gets probability 1/n; with v = identity
    (per sequence), out[i, j] is keep(i, j) / (n * (1 - p)): the kernel's dropout mask,
    read back exactly. Returns one 0/1 tensor ``(heads, rows, n)`` per sequence."""
    q = torch.zeros(_shape_of_layout(layout, lengths, heads, seq, seq))
    v = torch.zeros_like(q)
    for part, n in zip(_per_sequence(v, layout, lengths), lengths):
        part[:, :n, :n] = torch.eye(n)  # writes through the view into v
    torch.manual_seed(seed)
    out = ops.attention(q, q, v, dropout_p=DROP, backend="triton",
                        **_layout_of_lengths(layout, lengths, seq))
    keeps = []
    for part, n in zip(_per_sequence(out, layout, lengths), lengths):
        keep = part[:, :, :n] * n * (1 - DROP)
        assert torch.allclose(keep, keep.round(), atol=1e-4), \
            "dropout must zero or rescale whole entries"
        keeps.append(keep.round())
    return keeps


def test_dropout_keeps_the_expected_fraction_and_is_deterministic():
    def recover(seed):
        return torch.stack(_recover_keep_mask("dense", (64, 64), 2, 64, seed))

    keep = recover(7)
    fraction = keep.mean().item()
    # 16384 Bernoulli(0.9) draws: standard deviation 0.0023; 4.3 sigma = 0.01.
    assert abs(fraction - (1 - DROP)) < 0.01, fraction
    assert torch.equal(keep, recover(7)), "same seed, same mask"
    assert not torch.equal(keep, recover(8)), "new seed, new mask"
    # Heads and batch rows draw different masks.
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0], keep[1, 0])


DROPOUT_LAYOUTS = [  # layout, lengths: two or more sequences, the later ones shorter
    ("dense", (40, 40)),
    ("padded", (40, 23)),
    ("packed", (40, 37)),  # cu_seqlens (0, 40, 77): sequence 1 starts at token 40
]


@pytest.mark.parametrize("layout, lengths", DROPOUT_LAYOUTS, ids=[c[0] for c in DROPOUT_LAYOUTS])
def test_dropout_gradients_match_the_forward_mask(layout, lengths):
    """The backward must regenerate the forward's mask for every sequence. The packed
    layout is what the model trains with: a backward that keyed the mask on positions in
    the packed tensor (query + start) instead of in the sequence passed the dense case and
    gave sequence 1's dq/dk/dv errors of 40-77% here."""
    heads, seq, head_dim, seed = 2, max(lengths), 32, 11
    keeps = _recover_keep_mask(layout, lengths, heads, seq, seed)
    generator = torch.Generator().manual_seed(3)
    shape = _shape_of_layout(layout, lengths, heads, seq, head_dim)
    q, k, v, dout = (torch.randn(shape, generator=generator, dtype=torch.float64)
                     for _ in range(4))
    qf, kf, vf = (t.float().requires_grad_(True) for t in (q, k, v))
    torch.manual_seed(seed)  # the seed the mask was read back with
    out = ops.attention(qf, kf, vf, dropout_p=DROP, backend="triton",
                        **_layout_of_lengths(layout, lengths, seq))
    out.backward(dout.float())
    # The same computation with each sequence's mask made explicit, differentiated in fp64.
    qd, kd, vd = (t.clone().requires_grad_(True) for t in (q, k, v))
    outs = []
    for qs, ks, vs, keep, n in zip(*(_per_sequence(t, layout, lengths) for t in (qd, kd, vd)),
                                   keeps, lengths):
        probs = torch.softmax(qs @ ks[:, :n].transpose(-1, -2) / math.sqrt(head_dim), dim=-1)
        outs.append((probs * keep / (1 - DROP)) @ vs[:, :n])
    expected = (torch.cat([o.transpose(0, 1) for o in outs]) if layout == "packed"
                else torch.stack(outs))
    expected.backward(dout)
    for name, g, e in (("out", out, expected), ("dq", qf.grad, qd.grad), ("dk", kf.grad, kd.grad),
                       ("dv", vf.grad, vd.grad)):
        assert_close(g, e, max_rel=FP32_REL, name=f"dropout {layout} {name}")


# ---------------------------------------------------------------------------------------
# GPU only
# ---------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_gpu_real_sizes_low_precision(layout, dtype, head_dim):
    lengths = tuple(int(x) for x in torch.randint(64, 513, (8,), generator=torch.Generator().manual_seed(1)))
    tensors, mask, cu_seqlens, seq = _inputs(layout, dtype, 16, head_dim, lengths=lengths)
    tensors = tuple(t.cuda() for t in tensors)
    mask, cu_seqlens = mask.cuda(), cu_seqlens.cuda()
    got = _kernel_with_grads(tensors, dtype, layout, mask, cu_seqlens, seq)
    oracle = _reference_with_grads(tensors, torch.float32, layout, mask, cu_seqlens, seq)
    plain = _reference_with_grads(tensors, dtype, layout, mask, cu_seqlens, seq, upcast=False)
    for name, g, p, o in zip(("out", "dq", "dk", "dv"), got, plain, oracle):
        assert_within_2x_of_torch(g, p, o, name=f"gpu {layout} {dtype} {name}")


@pytest.mark.gpu
def test_gpu_fp32_uses_ieee_dots():
    tensors, mask, cu_seqlens, seq = _inputs("padded", torch.float32, 4, 64,
                                             lengths=(512, 300, 77, 1))
    tensors = tuple(t.cuda() for t in tensors)
    got = _kernel_with_grads(tensors, torch.float32, "padded", mask.cuda(), cu_seqlens.cuda(), seq)
    oracle = _reference_with_grads(tensors, torch.float64, "padded", mask.cuda(), cu_seqlens.cuda(), seq)
    for name, g, o in zip(("out", "dq", "dk", "dv"), got, oracle):
        assert_close(g, o, max_rel=FP32_REL, name=f"gpu fp32 {name}")


def test_cu_seqlens_and_key_lengths_of_any_int_dtype_and_stride():
    """``ops.attention`` accepts int64 ``cu_seqlens`` (what ``torch.cumsum`` returns) and
    any 1-D tensor, e.g. a column of a wider table (stride 2); the kernels read
    ``cu_seqlens[b]`` and ``key_lengths[b]`` as contiguous int32, so the launchers must make
    them so. Before: int64 was refused with a TypeError, and a strided cu_seqlens read the
    neighbouring column (out-of-range token offsets: values of 1e37)."""
    tensors, mask, cu_seqlens, seq = _inputs("packed", torch.float32, 2, 16, lengths=(9, 3, 12))
    oracle = _reference_with_grads(tensors, torch.float64, "packed", mask, cu_seqlens, seq)
    strided = torch.stack([cu_seqlens, torch.full_like(cu_seqlens, 10**6)], dim=1)[:, 0]
    for label, cu in (("int64", cu_seqlens.long()), ("strided", strided),
                      ("strided int64", strided.long())):
        q, k, v = (t.detach().float().requires_grad_() for t in tensors[:3])
        out = ops.attention(q, k, v, cu_seqlens=cu, max_seqlen=seq, backend="triton")
        out.backward(tensors[3].detach().float())
        for name, g, o in zip(("out", "dq", "dk", "dv"), (out, q.grad, k.grad, v.grad), oracle):
            assert_close(g, o, max_rel=FP32_REL, name=f"cu_seqlens {label} {name}")

    tensors, mask, cu_seqlens, seq = _inputs("padded", torch.float32, 2, 16, lengths=(9, 3, 12))
    oracle = _reference_with_grads(tensors, torch.float64, "padded", mask, cu_seqlens, seq)
    q, k, v, dout = (t.detach().float() for t in tensors)
    lengths = mask.sum(1)
    for label, key_lengths in (("int64", lengths),
                               ("strided", torch.stack([lengths, lengths * 0], 1)[:, 0].int())):
        out, lse = attention_kernel.attention_forward(q, k, v, key_lengths, None, seq, 0.25,
                                                      0.0, 0)
        grads = attention_kernel.attention_backward(dout, q, k, v, out, lse, key_lengths, None,
                                                    seq, 0.25, 0.0, 0)
        for name, g, o in zip(("out", "dq", "dk", "dv"), (out, *grads), oracle):
            assert_close(g, o, max_rel=FP32_REL, name=f"key_lengths {label} {name}")


def test_backward_takes_a_non_contiguous_lse():
    """The backward kernels index ``lse`` (and ``delta``, allocated like it) as
    ``batch_head * stride(1) + row``, i.e. contiguous (B, H, S). A non-contiguous lse (say
    a graph that stored it (H, B, S)-major) read the wrong rows and wrote delta out of
    bounds (a heap corruption in the interpreter); the launcher now makes it contiguous."""
    tensors, mask, cu_seqlens, seq = _inputs("padded", torch.float32, 3, 16, lengths=(9, 4))
    q, k, v, dout = (t.detach().float() for t in tensors)
    lengths = mask.sum(1).to(torch.int32)
    out, lse = attention_kernel.attention_forward(q, k, v, lengths, None, seq, 0.25, 0.0, 0)
    lse_hbs = lse.transpose(0, 1).contiguous().transpose(0, 1)
    assert not lse_hbs.is_contiguous()
    grads = attention_kernel.attention_backward(dout, q, k, v, out, lse_hbs, lengths, None,
                                                seq, 0.25, 0.0, 0)
    oracle = _reference_with_grads(tensors, torch.float64, "padded", mask, cu_seqlens, seq)
    for name, g, o in zip(("dq", "dk", "dv"), grads, oracle[1:]):
        assert_close(g, o, max_rel=FP32_REL, name=f"non-contiguous lse {name}")


def _views_into_one_huge_storage(layout, heads, head_dim, lengths, far_stride, device):
    """q, k, v, out and dout as views of one fp16 storage of more than 2**31 elements whose
    batch (padded) or token (packed) stride is ``far_stride``: the last sequence starts past
    element 2**31. ``torch.empty`` only commits the pages that are written, so this costs a
    few MB of memory on the CPU, not the ~5 GB of address space it spans (on a GPU the
    whole storage is allocated)."""
    generator = torch.Generator().manual_seed(3)
    seq, row = max(lengths), heads * head_dim
    if layout == "padded":
        batch = len(lengths)
        shape, strides = (batch, heads, seq, head_dim), (far_stride, head_dim, row, 1)
        first_of_last = (batch - 1) * far_stride
    else:
        shape, strides = (sum(lengths), heads, head_dim), (far_stride, head_dim, 1)
        first_of_last = (sum(lengths) - 1) * far_stride
    storage = torch.empty(first_of_last + 5 * seq * row, dtype=torch.float16, device=device)
    views = []
    for slot in range(5):  # q, k, v, out, dout side by side within each far-strided block
        view = storage.as_strided(shape, strides, slot * seq * row)
        view.copy_(torch.randn(shape, generator=generator).half().to(device))
        views.append(view)
    return views


FAR_STRIDES = [("padded", 2**30), ("packed", 2**25 + 64)]


@pytest.mark.parametrize("layout, far_stride", FAR_STRIDES)
def test_offsets_past_2_31_elements_do_not_wrap(layout, far_stride, device="cpu"):
    """Tensors of more than 2**31 elements (padded: more than 5,461 sequences of 512 at
    hidden 768; packed: more than 2.8M tokens) put a sequence's first element past int32.
    The kernels computed ``batch * stride_batch`` and ``start * stride_token`` in int32,
    which wrapped to a negative address: a segfault in the interpreter, wrong memory on the
    GPU. The same values, laid out small and contiguous, must give bit-identical results."""
    heads, head_dim, lengths = 2, 16, (64, 16, 40)
    q, k, v, out, dout = _views_into_one_huge_storage(layout, heads, head_dim, lengths,
                                                      far_stride, device)
    seq, scale = max(lengths), 0.25
    last_start = far_stride * ((len(lengths) - 1) if layout == "padded" else sum(lengths[:-1]))
    assert far_stride < 2**31 <= last_start  # each stride fits int32; their product does not
    cu = (torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32,
                       device=device) if layout == "packed" else None)
    key_lengths = (torch.tensor(lengths, dtype=torch.int32, device=device)
                   if layout == "padded" else None)
    out, lse = attention_kernel.attention_forward(q, k, v, key_lengths, cu, seq, scale, 0.0, 0,
                                                  out=out)
    grads = attention_kernel.attention_backward(dout, q, k, v, out, lse, key_lengths, cu, seq,
                                                scale, 0.0, 0)
    small = [t.contiguous() for t in (q, k, v, dout)]
    out_small, lse_small = attention_kernel.attention_forward(*small[:3], key_lengths, cu, seq,
                                                              scale, 0.0, 0)
    grads_small = attention_kernel.attention_backward(small[3], *small[:3], out_small,
                                                      lse_small, key_lengths, cu, seq, scale,
                                                      0.0, 0)
    assert torch.isfinite(out_small).all()
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads),
                               (out_small, *grads_small)):
        assert torch.equal(got, want), f"{layout} {name}: results past 2**31 elements differ"


def test_token_stride_times_length_past_2_31_does_not_wrap(device="cpu"):
    """Within a sequence the kernels compute row * token_stride in int32. A layout whose
    token stride times the length passes 2**31 (a seq-first (S, B, H, D) tensor of more
    than 2**31 elements permuted to (B, H, S, D)) read rows 32-39 here from wrapped
    addresses (errors of 0.3-0.7); the launchers now copy such inputs, and write such an
    ``out`` through a copy. Results must equal the contiguous run bit for bit."""
    seq, head_dim, token_stride = 40, 16, 2**26
    assert token_stride < 2**31 <= (seq - 1) * token_stride
    storage = torch.empty((seq - 1) * token_stride + 5 * head_dim, dtype=torch.float16,
                          device=device)
    generator = torch.Generator().manual_seed(4)
    views = []
    for slot in range(5):  # q, k, v, out, dout
        view = storage.as_strided((1, 1, seq, head_dim), (0, 0, token_stride, 1),
                                  slot * head_dim)
        view.copy_(torch.randn(1, 1, seq, head_dim, generator=generator).half().to(device))
        views.append(view)
    q, k, v, out, dout = views
    out, lse = attention_kernel.attention_forward(q, k, v, None, None, seq, 0.25, 0.0, 0,
                                                  out=out)
    assert out.data_ptr() == views[3].data_ptr(), "the caller's out must hold the result"
    grads = attention_kernel.attention_backward(dout, q, k, v, out, lse, None, None, seq,
                                                0.25, 0.0, 0)
    small = [t.contiguous() for t in (q, k, v, dout)]
    out_small, lse_small = attention_kernel.attention_forward(*small[:3], None, None, seq,
                                                              0.25, 0.0, 0)
    grads_small = attention_kernel.attention_backward(small[3], *small[:3], out_small,
                                                      lse_small, None, None, seq, 0.25, 0.0, 0)
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads),
                               (out_small, *grads_small)):
        assert torch.equal(got, want), f"{name}: rows past a 2**31 in-sequence offset differ"


@pytest.mark.gpu
@pytest.mark.parametrize("layout, far_stride", FAR_STRIDES)
def test_gpu_offsets_past_2_31_elements_do_not_wrap(layout, far_stride):
    test_offsets_past_2_31_elements_do_not_wrap(layout, far_stride, device="cuda")


@pytest.mark.gpu
def test_gpu_token_stride_times_length_past_2_31_does_not_wrap():
    test_token_stride_times_length_past_2_31_does_not_wrap(device="cuda")
