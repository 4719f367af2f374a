"""Performance tests: one pytest-benchmark test per registered case and mode.

    pytest benchmarks/ --benchmark-json=bench.json     # not part of CI's `pytest` (testpaths = tests)

Each test times our best variant of the case (``ours-triton`` where it runs, else
``ours-torch``) with the ``benchmark`` fixture, grouped by case, and records in
``extra_info`` what a raw time cannot say: the ratio of our time to the speed reference's,
measured as ``spanbert-fast bench`` measures it (the suite's timer, ``do_bench`` on CUDA,
both variants in interleaved rounds, the median of the per-round ratios: what ``--compare``
gates on), the reference's median time, and the parity error against the case's oracle.
The fixture's own time is pytest-benchmark's wall clock (a synchronize per call on CUDA),
for its history and ``--benchmark-compare``; it is not what the ratio divides. A new case
registered in ``benchmarks/cases/`` gets its tests here without any change.

Shape (one per test): batch ``SPANBERT_BENCH_BATCH`` (default 2 on CPU, 8 on CUDA) x
seq ``SPANBERT_BENCH_SEQ`` (default 128) of model ``SPANBERT_BENCH_MODEL`` (default base),
dtype ``SPANBERT_BENCH_DTYPE`` (fp32 on CPU, bf16 on CUDA), device
``SPANBERT_BENCH_DEVICE`` (default auto). Never in the Triton interpreter.
"""

from __future__ import annotations

import os
import statistics
from typing import Any, Dict, Tuple

import pytest
import torch

from . import cases as _cases  # noqa: F401  (registers every case)
from . import timing
from .cases.inputs import relative_error
from .registry import CASES, Shape
from .settings import (InterpreterRefused, RunContext, SuiteSettings, refuse_triton_interpreter,
                       resolve_device)

try:
    refuse_triton_interpreter()
except InterpreterRefused as _err:
    pytest.skip(str(_err), allow_module_level=True)

_DEVICE = resolve_device(os.environ.get("SPANBERT_BENCH_DEVICE", "auto"))
_ON_CUDA = _DEVICE.type == "cuda"
_SETTINGS = SuiteSettings(
    device=_DEVICE,
    model=os.environ.get("SPANBERT_BENCH_MODEL", "base"),
    dtype=os.environ.get("SPANBERT_BENCH_DTYPE", "bf16" if _ON_CUDA else "fp32"),
    seqs=(int(os.environ.get("SPANBERT_BENCH_SEQ", "128")),),
    batches=(int(os.environ.get("SPANBERT_BENCH_BATCH", "8" if _ON_CUDA else "2")),),
    quick=True, progress=False, plots=False)

# One case's shared state at a time (the encoder case holds three copies of the model).
_STATE: Dict[str, Any] = {}


@pytest.fixture(scope="module")
def ctx() -> RunContext:
    return RunContext.create(_SETTINGS)


def _state(case, ctx):
    if case.name not in _STATE:
        _STATE.clear()
        _STATE[case.name] = case.build_state(ctx)
    return _STATE[case.name]


def _ours(variants) -> str:
    for name in ("ours-triton", "ours-torch", "ours"):
        if name in variants:
            return name
    return next(iter(variants))


def _oracle_output(instance, mode: str, variant_outputs: Dict[str, Any]):
    if instance.oracle is None:
        return None
    if isinstance(instance.oracle, str):
        return variant_outputs[instance.oracle]
    with torch.no_grad() if mode == "fwd" else torch.enable_grad():
        return instance.oracle(instance.inputs[0])


def _params():
    for name, case in CASES.items():
        for mode in case.modes:
            yield pytest.param(name, mode, id=f"{name}-{mode}")


def _interleaved_ratio(instance, ours: str, reference: str, grad: bool,
                       device: torch.device) -> Tuple[float, float]:
    """(median over rounds of ours / reference timed in the same round, the reference's
    median time): the suite's own measurement, so the ratio means what the gate compares."""
    calls = {name: timing.rotating(instance.variants[name], instance.inputs, grad=grad)
             for name in (ours, reference)}
    policy = timing.QUICK_POLICY
    ratios, reference_times = [], []
    for index in range(policy.rounds(device)):
        round_policy = policy.for_round(index, device)
        times = {name: float(timing.measure(call, device, round_policy))
                 for name, call in calls.items()}
        ratios.append(times[ours] / times[reference])
        reference_times.append(times[reference])
    return statistics.median(ratios), statistics.median(reference_times)


@pytest.mark.parametrize("case_name, mode", list(_params()))
def test_case(case_name: str, mode: str, benchmark, ctx: RunContext) -> None:
    case = CASES[case_name]
    reason = case.available(ctx)
    if reason is not None:
        pytest.skip(reason)
    shape = Shape(_SETTINGS.batches[0], _SETTINGS.seqs[0])
    instance = case.build_instance(_state(case, ctx), shape, mode, ctx)
    ours = _ours(instance.variants)
    grad = mode != "fwd"

    def first_output(name: str):
        with torch.no_grad() if not grad else torch.enable_grad():
            return instance.variants[name](instance.inputs[0])

    outputs = {ours: first_output(ours)}
    if isinstance(instance.oracle, str) and instance.oracle not in outputs:
        outputs[instance.oracle] = first_output(instance.oracle)
    oracle = _oracle_output(instance, mode, outputs)
    view = instance.parity_view or (lambda o, inp: o if isinstance(o, list) else [o])
    parity: Tuple[float, bool] = (float("nan"), False)
    if oracle is not None:
        parity = relative_error(list(view(outputs[ours], instance.inputs[0])),
                                list(view(oracle, instance.inputs[0])))
    outputs.clear()

    reference = instance.speed_reference
    ratio, reference_s = _interleaved_ratio(instance, ours, reference, grad, ctx.device)
    benchmark.group = f"{case.group}:{case.name}"
    benchmark.extra_info.update({
        "variant": ours, "mode": mode, "shape": shape.label, "model": _SETTINGS.model,
        "dtype": _SETTINGS.dtype, "device": str(ctx.device), "speed_reference": reference,
        "speed_reference_median_s": reference_s,
        "parity_oracle": instance.oracle_name,
        "parity_error": parity[0] if parity[1] else None,
        "skipped_variants": dict(instance.skipped)})
    call = timing.rotating(instance.variants[ours], instance.inputs, grad=grad)
    if ctx.device.type == "cuda":
        def synchronized():
            out = call()
            torch.cuda.synchronize(ctx.device)
            return out
        benchmark(synchronized)
    else:
        benchmark(call)
    benchmark.extra_info["ratio_to_reference"] = ratio
    if oracle is not None:
        assert parity[1], f"{case_name} {mode} {ours}: NaN/inf in the output or the oracle"
