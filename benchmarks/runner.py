"""Runs the selected cases and returns the result document (see :mod:`benchmarks.schema`).

For every (case, shape, mode) the runner builds the instance, calls each variant once on
the first input (the warm-up, and the output that parity compares), then times the
variants with :func:`benchmarks.timing.measure`, rotating through all inputs, in
interleaved rounds on CPU (median over rounds), and on CUDA records each one's peak memory.
Ratios to the case's speed reference are computed when the row set is complete.
A variant that raises becomes an ``error`` row and the run goes on; one that runs out of
memory becomes a ``skipped`` row.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import statistics
import sys
import time
import traceback
from typing import Any, Dict, List, Optional

import torch

from . import cases as _cases  # noqa: F401  (registers every case)
from . import timing
from .registry import CASES, Case, Instance, Shape
from .schema import SCHEMA_VERSION, row_key
from .settings import RunContext, SuiteSettings, describe_device, library_versions

__all__ = ["run_suite", "busy_machine_warning", "busy_share_of_others", "BUSY_LIMIT"]


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        print("(tqdm is not installed: no progress bar)", file=sys.stderr)
        return None
    return tqdm(total=total, file=sys.stderr, desc="benchmarks", unit="row-set",
                dynamic_ncols=True, leave=True)


def _grad_mode(mode: str):
    return torch.no_grad() if mode == "fwd" else torch.enable_grad()


def _parity(instance: Instance, out: Any, oracle_out: Any) -> Dict[str, Any]:
    from .cases.inputs import relative_error

    if oracle_out is None:
        return {"parity_error": None, "parity_finite": None}
    view = instance.parity_view or (lambda o, inp: o if isinstance(o, list) else [o])
    first = instance.inputs[0]
    error, finite = relative_error(list(view(out, first)), list(view(oracle_out, first)))
    return {"parity_error": error if finite else None, "parity_finite": finite}


def _derived(row: Dict[str, Any], ceilings: Dict[str, Dict[str, Any]]) -> None:
    seconds = row["time_s"]
    row["tokens_per_s"] = row["tokens"] / seconds if row["tokens"] else None
    row["flops_per_s"] = row["flops"] / seconds if row["flops"] else None
    row["bytes_per_s"] = row["bytes"] / seconds if row["bytes"] else None
    utilisation = None
    if row["bound"] == "compute" and row["flops_per_s"]:
        utilisation = row["flops_per_s"] / ceilings["matmul_run"]["flops_per_s"]
    elif row["bound"] == "memory" and row["bytes_per_s"]:
        utilisation = row["bytes_per_s"] / ceilings["copy"]["bytes_per_s"]
    row["utilisation"] = utilisation


def _measure_instance(case: Case, shape: Shape, mode: str, instance: Instance,
                      ctx: RunContext, ceilings, policy: timing.TimingPolicy,
                      bar) -> List[Dict[str, Any]]:
    settings = ctx.settings
    base = {"case": case.name, "group": case.group, "mode": mode, "model": settings.model,
            "dtype": settings.dtype, "shape": {"batch": shape.batch, "seq": shape.seq,
                                               "padded": shape.padded, **instance.details},
            "shape_label": shape.label, "speed_reference": instance.speed_reference,
            "parity_oracle": instance.oracle_name, "tokens": int(instance.tokens),
            "flops": instance.flops, "bytes": instance.bytes, "bound": instance.bound}
    rows: List[Dict[str, Any]] = []
    for name, reason in instance.skipped.items():
        rows.append({**base, "variant": name, "status": "skipped", "reason": reason})

    oracle_out = None
    if callable(instance.oracle):
        try:
            with _grad_mode(mode):
                oracle_out = instance.oracle(instance.inputs[0])
        except Exception:  # noqa: BLE001 - the rows are still timed, without parity
            print(f"\nparity oracle failed: {case.name} {mode} {shape.label}\n"
                  + traceback.format_exc(), file=sys.stderr)
    # The oracle variant runs first so that every other row can be compared with it.
    order = list(instance.variants)
    if isinstance(instance.oracle, str):
        order.remove(instance.oracle)
        order.insert(0, instance.oracle)
    # Phase 1: one call per variant (the warm-up, and the output parity compares).
    live: Dict[str, Dict[str, Any]] = {}
    hints: Dict[str, float] = {}
    for name in order:
        fn = instance.variants[name]
        row = {**base, "variant": name, "status": "ok", "reason": None}
        rows.append(row)
        if bar is not None:
            bar.set_postfix_str(f"{case.name} {mode} {shape.label} {name}", refresh=True)
        try:
            with _grad_mode(mode):
                timing.synchronize(ctx.device)
                start = time.perf_counter()
                out = fn(instance.inputs[0])
                timing.synchronize(ctx.device)
                hints[name] = time.perf_counter() - start
            if isinstance(instance.oracle, str) and name == instance.oracle:
                oracle_out = out
            row.update(_parity(instance, out, oracle_out))
            del out
            live[name] = row
        except Exception as err:  # noqa: BLE001 - one broken variant must not end the run
            _fail(row, err, f"{case.name} {mode} {shape.label} {name}")
    del oracle_out

    # Phase 2: time the variants in interleaved rounds (see TimingPolicy.cpu_rounds).
    calls = {name: timing.rotating(instance.variants[name], instance.inputs, grad=mode != "fwd")
             for name in live}
    rounds = policy.rounds(ctx.device)
    samples: Dict[str, List[Optional[float]]] = {name: [None] * rounds for name in live}
    for index in range(rounds):
        round_policy = policy.for_round(index, ctx.device)
        for name in list(live):
            if bar is not None:
                bar.set_postfix_str(f"{case.name} {mode} {shape.label} {name} (timing)",
                                    refresh=True)
            try:
                seconds = float(timing.measure(calls[name], ctx.device, round_policy,
                                               first_call_s=hints[name]))
            except Exception as err:  # noqa: BLE001
                _fail(live.pop(name), err, f"{case.name} {mode} {shape.label} {name}")
                continue
            samples[name][index] = seconds
            hints[name] = seconds
    measured: Dict[str, Dict[str, Any]] = {}
    for name, row in live.items():
        row["time_s"] = statistics.median(t for t in samples[name] if t is not None)
        try:
            row["peak_memory_bytes"] = timing.measure_peak_memory(calls[name], ctx.device)
        except Exception as err:  # noqa: BLE001
            _fail(row, err, f"{case.name} {mode} {shape.label} {name}")
            continue
        _derived(row, ceilings)
        measured[name] = row

    reference = instance.speed_reference if instance.speed_reference in measured else None
    for row in rows:
        row["is_reference"] = row["variant"] == instance.speed_reference
        row["ratio_to_reference"] = row["ratio_round_spread"] = None
        if row["status"] == "ok" and reference is not None:
            ratios = [t / r for t, r in zip(samples[row["variant"]], samples[reference])
                      if t is not None and r is not None]
            # Paired: each round's time over the reference's time in the same round, so a
            # slow spell of the machine cancels; the median over rounds.
            row["ratio_to_reference"] = statistics.median(ratios)
            row["ratio_round_spread"] = max(ratios) / min(ratios) - 1.0
        row["key"] = row_key(row)
    # Report order: the case's variant order, then the skipped ones.
    rank = {name: i for i, name in enumerate(list(instance.variants) + list(instance.skipped))}
    return sorted(rows, key=lambda r: rank.get(r["variant"], len(rank)))


def _instance_error_row(case: Case, shape: Shape, mode: str, settings: SuiteSettings,
                        err: Exception) -> Dict[str, Any]:
    """The row that stands for a row set whose inputs could not be built."""
    print(f"\nbenchmark row set could not be built: {case.name} {mode} {shape.label}\n"
          + traceback.format_exc(), file=sys.stderr)
    row = {"case": case.name, "group": case.group, "mode": mode, "model": settings.model,
           "dtype": settings.dtype, "shape": {"batch": shape.batch, "seq": shape.seq,
                                              "padded": shape.padded},
           "shape_label": shape.label, "variant": "(all)", "status": "error",
           "reason": f"building the inputs failed: {type(err).__name__}: {err}",
           "speed_reference": "", "is_reference": False, "tokens": 0, "bound": "compute",
           "parity_oracle": "", "ratio_to_reference": None}
    row["key"] = row_key(row)
    return row


def _fail(row: Dict[str, Any], err: Exception, where: str) -> None:
    """Turn ``row`` into a skipped row (out of memory) or an error row (anything else)."""
    if isinstance(err, torch.OutOfMemoryError):
        row.update(status="skipped", reason=f"out of memory: {str(err).splitlines()[0]}")
        return
    row.update(status="error", reason=f"{type(err).__name__}: {err}")
    print(f"\nbenchmark row failed: {where}\n" + traceback.format_exc(), file=sys.stderr)


def _release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_suite(settings: SuiteSettings) -> Dict[str, Any]:
    """Run every selected case under ``settings``; return the result document."""
    started = time.perf_counter()
    load_at_start = _load_average()
    busy_at_start = busy_share_of_others() if settings.device.type == "cpu" else None
    ctx = RunContext.create(settings)
    policy = timing.QUICK_POLICY if settings.quick else timing.FULL_POLICY
    torch.manual_seed(settings.seed)
    ceilings = timing.measure_ceilings(ctx.device, ctx.dtype, policy)

    skipped_cases = []
    plan = []
    for name in settings.cases:
        case = CASES[name]
        reason = case.available(ctx)
        if reason is not None:
            skipped_cases.append({"case": name, "group": case.group, "reason": reason})
            continue
        plan.extend((case, shape, mode) for shape in case.shapes(ctx) for mode in case.modes)

    bar = _progress(len(plan), settings.progress)
    rows: List[Dict[str, Any]] = []
    state_of: Optional[str] = None
    state = None
    try:
        for case, shape, mode in plan:
            if state_of != case.name:
                state = None
                _release_memory(ctx.device)
                try:
                    state = case.build_state(ctx)
                    state_of = case.name
                except Exception as err:  # noqa: BLE001
                    print(f"\nbenchmark case {case.name} could not be set up\n"
                          + traceback.format_exc(), file=sys.stderr)
                    skipped_cases.append({"case": case.name, "group": case.group,
                                          "reason": f"set-up failed: {type(err).__name__}: {err}",
                                          "error": True})
                    state_of = case.name
                    state = _FAILED
            if state is _FAILED:
                if bar is not None:
                    bar.update(1)
                continue
            try:
                instance = case.build_instance(state, shape, mode, ctx)
            except Exception as err:  # noqa: BLE001 - the other row sets still run
                rows.append(_instance_error_row(case, shape, mode, settings, err))
            else:
                rows.extend(_measure_instance(case, shape, mode, instance, ctx, ceilings,
                                              policy, bar))
                del instance
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        state = None
        _release_memory(ctx.device)

    # Again at the end: load that starts mid-run (a CI neighbour) slows and flattens the
    # ratios just as much, and the gate refuses runs that were measured under it.
    busy_at_end = busy_share_of_others() if settings.device.type == "cpu" else None
    now = datetime.datetime.now().astimezone()
    return {
        "schema_version": SCHEMA_VERSION,
        "suite": "spanbert_fast.benchmarks",
        "created": now.isoformat(timespec="seconds"),
        "date": now.date().isoformat(),
        "device": describe_device(ctx.device),
        "versions": library_versions(),
        "settings": settings.as_json(),
        "timer": timing.describe_timer(ctx.device, policy),
        "ceilings": ceilings,
        "rows": rows,
        "skipped_cases": skipped_cases,
        "notes": _notes(ctx, _busiest(busy_at_start, busy_at_end)),
        "load_average_at_start": load_at_start,
        "cpu_busy_by_others_at_start": busy_at_start,
        "cpu_busy_by_others_at_end": busy_at_end,
        "wall_time_s": time.perf_counter() - started,
    }


_FAILED = object()


def _load_average() -> Optional[List[float]]:
    """The 1/5/15-minute load averages (None where the OS has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _cpu_times() -> Optional[List[int]]:
    try:
        with open("/proc/stat", "r", encoding="utf-8") as handle:
            fields = handle.readline().split()[1:]
    except OSError:
        return None
    return [int(f) for f in fields]


def busy_share_of_others(window_s: float = 0.5) -> Optional[float]:
    """Share of all CPUs kept busy by other processes over ``window_s`` while this one
    sleeps (Linux /proc/stat; None elsewhere). The load average lags by a minute and
    counts this process's own earlier work, so it cannot tell an idle machine."""
    first = _cpu_times()
    time.sleep(window_s)
    second = _cpu_times()
    if first is None or second is None or len(first) < 5:
        return None
    delta = [b - a for a, b in zip(first, second)]
    total = sum(delta)
    idle = delta[3] + delta[4]  # idle + iowait
    return round(1.0 - idle / total, 3) if total > 0 else None


# Share of the CPUs kept busy by other processes from which a CPU run is not trusted: on a
# 2-core machine a loaded run's 2-thread calls wait for scheduler quanta (~12 ms), which
# flattens every ratio toward 1.0 and hides regressions.
BUSY_LIMIT = 0.25


def _busiest(*shares: Optional[float]) -> Optional[float]:
    known = [s for s in shares if s is not None]
    return max(known) if known else None


def busy_machine_warning(busy: Optional[float]) -> Optional[str]:
    """A warning when other processes kept the CPUs busy at the start or the end of the run
    (timings of a CPU run are then slow and noisy, and ratios flatten toward 1.0)."""
    if busy is None or busy < BUSY_LIMIT:
        return None
    return (f"other processes kept {busy:.0%} of the CPUs busy during the run: CPU "
            "timings are slowed and noisy; re-run on an idle machine before trusting them, "
            "gating on them or committing a baseline")


def _notes(ctx: RunContext, busy_at_start: Optional[float]) -> List[str]:
    notes = [
        "ratio = median over the timing rounds of this row's time / the speed reference's "
        "time in the same round (lower is faster); the regression gate compares these "
        "ratios of our rows (ours-*), not absolute times. ratio_round_spread in the JSON is "
        "max/min - 1 of the per-round ratios: the row's own noise.",
        "parity = max |row - oracle| / max |oracle| over real (unpadded) positions; fwd+bwd "
        "rows take the worst of the output and every gradient, each gradient divided by at "
        "least 1e-3 of the largest one (a gradient that is zero in exact arithmetic, such as "
        "the key bias's, would otherwise divide noise by noise).",
        "utilisation = achieved FLOP/s against the measured matmul ceiling (compute-bound "
        "rows) or bytes/s against the measured copy ceiling (memory-bound rows); FLOPs and "
        "bytes count useful work only (padding excluded), see benchmarks/formulas.py.",
    ]
    warning = busy_machine_warning(busy_at_start)
    if warning:
        notes.insert(0, "WARNING: " + warning)
    if not ctx.on_cuda:
        notes.append("CPU run: torch backend only (Triton kernels need CUDA; the suite never "
                     "uses the interpreter); peak memory is not measured (torch keeps no CPU "
                     "allocator statistics), so there is no memory-vs-batch plot.")
    return notes
