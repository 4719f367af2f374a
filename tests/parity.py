"""The parity helpers every test shares: comparisons that say where they fail (worst index,
count and share of mismatches, NaN/inf disagreement, the habit STYLE.md asks for), the
low-precision 2x rule, and :func:`grads_of` for an output and its input gradients."""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch


def max_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max |actual - expected| / max |expected|``: the error relative to the tensor's
    scale, so elements near zero do not blow it up. Computed in fp64."""
    a = actual.detach().double()
    e = expected.detach().double()
    scale = e.abs().max().item() if e.numel() else 0.0
    diff = (a - e).abs().max().item() if e.numel() else 0.0
    return diff / max(scale, 1e-30)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, max_rel: float,
                 name: str = "tensor") -> None:
    """Fail unless shapes agree, NaN/inf sit at the same places, and
    :func:`max_relative_error` <= ``max_rel``; the message locates the damage."""
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    a_bad, e_bad = ~torch.isfinite(a), ~torch.isfinite(e)
    if not torch.equal(a_bad, e_bad):
        where = (a_bad != e_bad).nonzero()[:5].tolist()
        raise AssertionError(f"{name}: NaN/inf disagree at {int((a_bad != e_bad).sum())} "
                             f"places, first {where}")
    a = a.masked_fill(a_bad, 0.0)
    e = e.masked_fill(e_bad, 0.0)
    err = max_relative_error(a, e)
    if err <= max_rel:
        return
    scale = max(e.abs().max().item(), 1e-30)
    diff = (a - e).abs()
    worst = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
    over = int((diff > max_rel * scale).sum())
    raise AssertionError(
        f"{name}: max relative error {err:.3e} > {max_rel:.1e}; worst at {worst}: "
        f"got {a[worst].item():.6g}, expected {e[worst].item():.6g}; "
        f"{over}/{diff.numel()} elements ({100.0 * over / max(diff.numel(), 1):.2f}%) over")


def assert_within_2x_of_torch(kernel: torch.Tensor, torch_same_dtype: torch.Tensor,
                              oracle: torch.Tensor, *, name: str = "tensor",
                              floor: float = 1e-6) -> None:
    """STYLE.md's low-precision rule: the kernel's error against an fp64 (or fp32) oracle
    must be at most 2x the error of plain torch in the same dtype against that oracle.

    ``floor`` (relative to the oracle's scale) keeps the bound meaningful where torch
    happens to be exact, e.g. when the low-precision result rounds identically.
    """
    torch_err = max_relative_error(torch_same_dtype, oracle)
    bound = 2.0 * torch_err + floor
    assert_close(kernel, oracle, max_rel=bound,
                 name=f"{name} (torch's own error {torch_err:.2e}, bound 2x + {floor:.0e})")


def grads_of(fn: Callable, args: Sequence, dy: torch.Tensor,
             dtype: Optional[torch.dtype] = None) -> List[Optional[torch.Tensor]]:
    """``[out, *grads]``: ``out = fn(*args)`` and the gradient of ``<out, dy>`` with respect to
    every float tensor of ``args``, in order (None for an argument that is None; integer
    tensors and scalars get no entry). ``dtype``: run in that dtype (fp64: the oracle);
    the float tensors and ``dy`` are cast first, and the caller's tensors are never
    flagged as requiring grad."""
    def leaf(a):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return a.detach().to(dtype or a.dtype).requires_grad_()
        return a

    leaves = [leaf(a) for a in args]
    out = fn(*leaves)
    wanted = [a for a in leaves if isinstance(a, torch.Tensor) and a.requires_grad]
    grads = iter(torch.autograd.grad(out, wanted, dy.to(out.dtype)))
    result: List[Optional[torch.Tensor]] = [out.detach()]
    for original, a in zip(args, leaves):
        if original is None:
            result.append(None)
        elif isinstance(a, torch.Tensor) and a.requires_grad:
            result.append(next(grads))
    return result


def one_cli_error_line(capsys) -> str:
    """The command line's whole stderr must be one ``spanbert-fast: error: ...`` line (no
    traceback); returns it."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("spanbert-fast: error: ") and "Traceback" not in err
    return lines[0]
