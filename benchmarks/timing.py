"""Timing: one function, :func:`measure`, times every row (tests replace it).

GPU: ``triton.testing.do_bench`` (it warms up, flushes L2 between calls and returns the
median when asked). CPU: ``torch.utils.benchmark.Timer`` at the process's thread count
(its default is 1 thread, which would misreport a multi-core machine), median of
``blocked_autorange`` after a warm-up. Calls slower than the budget / samples (0.1 s in a
quick round: BERT-base forward and backward) are timed one by one with ``perf_counter``
instead: ``blocked_autorange`` would spend an extra untimed call estimating its block size
for every measurement, and ``Timer.timeit`` makes two untimed warm-up calls per sample.
The runner's first (parity) call counts as the first warm-up call.

Callers pass a zero-argument ``call`` that rotates through pre-generated inputs
(:func:`rotating`), so no timed call finds its input already in cache.

Ceilings (:func:`measure_ceilings`) are what the machine can do at all: a large matmul
(bf16 on GPU, fp32 on CPU, plus the run's dtype when different) and a large device copy
(bytes read + bytes written). Rows report utilisation against them.
"""

from __future__ import annotations

import itertools
import statistics
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, Optional, Sequence

import torch

__all__ = [
    "TimingPolicy",
    "QUICK_POLICY",
    "FULL_POLICY",
    "synchronize",
    "rotating",
    "measure",
    "measure_peak_memory",
    "measure_ceilings",
    "describe_timer",
]


@dataclass(frozen=True)
class TimingPolicy:
    """How long to measure. ``cpu_budget_s``: ``blocked_autorange``'s ``min_run_time``;
    ``cpu_min_samples``: timed calls for slow calls (and the threshold that makes a call
    slow: ``cpu_min_samples * call time >= budget``); ``cpu_warmup_calls`` /
    ``cpu_warmup_s``: untimed calls before measuring (at least that many, and for fast
    calls for at least that long); ``gpu_warmup_ms`` / ``gpu_rep_ms``: ``do_bench``'s
    arguments. ``cpu_rounds``: the runner measures the variants of a row set in that many
    interleaved rounds (A B C A B C ...) and keeps each variant's median over rounds, so a
    burst of load from another process slows every variant of a round instead of skewing
    one ratio; every budget above is for the whole, split over the rounds by
    :meth:`for_round`. The GPU is not shared: one round there."""

    cpu_budget_s: float
    cpu_min_samples: int
    cpu_warmup_calls: int
    cpu_warmup_s: float
    gpu_warmup_ms: int
    gpu_rep_ms: int
    cpu_rounds: int = 1

    def rounds(self, device: torch.device) -> int:
        return self.cpu_rounds if device.type == "cpu" else 1

    def for_round(self, index: int, device: torch.device) -> "TimingPolicy":
        """The policy of round ``index`` (0-based): an equal share of the budget and of
        the samples; only the first round warms up for long (later rounds follow other
        parallel work, so the OpenMP workers are mostly awake)."""
        rounds = self.rounds(device)
        if rounds == 1:
            return self
        return replace(self, cpu_budget_s=self.cpu_budget_s / rounds,
                       cpu_min_samples=max(1, -(-self.cpu_min_samples // rounds)),
                       cpu_warmup_calls=self.cpu_warmup_calls if index == 0 else 0,
                       cpu_warmup_s=self.cpu_warmup_s if index == 0 else 0.02, cpu_rounds=1)


# Quick CPU: 5 rounds of 0.08 s. On the idle 2-core VM three runs of the same code gave
# ratios within 6-7 % of each other on average (90th percentile 14 %), but sub-millisecond
# rows (attention against CPU sdpa) moved by up to 50 %: their own times swing 2x between
# blocks of calls there. Gate CPU runs loosely (benchmarks/README.md).
QUICK_POLICY = TimingPolicy(cpu_budget_s=0.4, cpu_min_samples=5, cpu_warmup_calls=1,
                            cpu_warmup_s=0.1, gpu_warmup_ms=25, gpu_rep_ms=100, cpu_rounds=5)
FULL_POLICY = TimingPolicy(cpu_budget_s=1.0, cpu_min_samples=5, cpu_warmup_calls=2,
                           cpu_warmup_s=0.3, gpu_warmup_ms=100, gpu_rep_ms=500, cpu_rounds=5)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rotating(fn: Callable[[Any], Any], inputs: Sequence[Any],
             grad: bool = False) -> Callable[[], Any]:
    """A zero-argument call that feeds ``fn`` the next input on each call, under
    ``torch.no_grad()`` unless ``grad``."""
    cycle = itertools.cycle(inputs)
    if grad:
        return lambda: fn(next(cycle))

    def call() -> Any:
        with torch.no_grad():
            return fn(next(cycle))

    return call


def describe_timer(device: torch.device, policy: TimingPolicy) -> str:
    if device.type == "cuda":
        return (f"triton.testing.do_bench (warmup {policy.gpu_warmup_ms} ms, rep "
                f"{policy.gpu_rep_ms} ms), median")
    rounds = policy.rounds(device)
    share = policy.for_round(0, device)
    slow = share.cpu_budget_s / share.cpu_min_samples
    return (f"torch.utils.benchmark.Timer.blocked_autorange ({torch.get_num_threads()} threads; "
            f"perf_counter per call for calls >= {slow:.2g} s), median of {rounds} interleaved "
            f"rounds")


def measure(call: Callable[[], Any], device: torch.device, policy: TimingPolicy, *,
            first_call_s: Optional[float] = None) -> float:
    """Median seconds per ``call()`` on ``device``.

    ``first_call_s``: how long an untimed warm-up call took, when the caller already made
    one; otherwise this function makes it.
    """
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(call, warmup=policy.gpu_warmup_ms,
                                             rep=policy.gpu_rep_ms, return_mode="median")) / 1e3
    from torch.utils.benchmark import Timer

    # Warm up for a while, not for one call: on the 2-core CI-class VM the OpenMP workers
    # fall asleep whenever the process did serial work (building inputs, parity), and the
    # next few parallel calls then take ~15 ms each instead of ~15 us (measured with a
    # 19x328 @ 328x64 linear). The fastest warm-up call then says whether a call is slow.
    fastest = first_call_s if first_call_s is not None else float("inf")
    spent, calls = 0.0, (0 if first_call_s is None else 1)
    while calls < policy.cpu_warmup_calls or (spent < policy.cpu_warmup_s
                                              and fastest * policy.cpu_min_samples < policy.cpu_budget_s):
        start = time.perf_counter()
        call()
        elapsed = time.perf_counter() - start
        fastest = min(fastest, elapsed)
        spent += elapsed
        calls += 1
    if fastest * policy.cpu_min_samples >= policy.cpu_budget_s:
        # A slow call (>= 0.1 s in a quick round): Timer would add nothing at this size but
        # an untimed block-size-estimate call per measurement (blocked_autorange) or two
        # untimed warm-up calls per sample (timeit), doubling the run; time calls directly.
        samples = []
        for _ in range(policy.cpu_min_samples):
            start = time.perf_counter()
            call()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples)
    timer = Timer(stmt="call()", globals={"call": call}, num_threads=torch.get_num_threads())
    return float(timer.blocked_autorange(min_run_time=policy.cpu_budget_s).median)


def measure_peak_memory(call: Callable[[], Any], device: torch.device) -> Optional[int]:
    """Peak bytes allocated by torch on ``device`` during one ``call()`` (weights and inputs
    included); None on CPU, where torch keeps no allocator statistics."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    call()
    synchronize(device)
    return int(torch.cuda.max_memory_allocated(device))


def _matmul_ceiling(device: torch.device, dtype: torch.dtype, n: int,
                    policy: TimingPolicy) -> Dict[str, Any]:
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen).to(device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    seconds = _best_of(lambda: torch.matmul(a, b, out=out), device, policy)
    return {"dtype": str(dtype).replace("torch.", ""), "n": n,
            "flops_per_s": 2.0 * n ** 3 / seconds}


def _best_of(call: Callable[[], Any], device: torch.device, policy: TimingPolicy) -> float:
    """A ceiling is the best the machine does: on CPU the fastest of three measurements
    (an idle 2-core VM gave 186 GFLOP/s best-of against 166 median for a 2048^3 fp32
    matmul, and a single measurement right after start-up gave 137); on GPU do_bench's
    median (it warms up on its own)."""
    if device.type == "cuda":
        return measure(call, device, policy)
    return min(measure(call, device, policy) for _ in range(3))


def measure_ceilings(device: torch.device, dtype: torch.dtype,
                     policy: TimingPolicy) -> Dict[str, Dict[str, Any]]:
    """The machine's measured peaks: ``matmul`` (bf16 on GPU, fp32 on CPU), ``matmul_run``
    (in the run's dtype; the one rows are compared with) and ``copy`` (device-to-device
    copy, read + write bytes per second)."""
    if device.type == "cuda":
        # 8192^3 bf16: ~1.1 TFLOP a call, long enough to hide launch overhead on an H100.
        peak_dtype, n, copy_bytes = torch.bfloat16, 8192, 1 << 30
    else:
        # 2048^3 fp32: ~17 GFLOP, ~0.1 s on 2 cores; MKL/oneDNN reach their plateau there.
        # 256 MiB copies are larger than any last-level cache this suite runs on.
        peak_dtype, n, copy_bytes = torch.float32, 2048, 256 << 20
    ceilings = {"matmul": _matmul_ceiling(device, peak_dtype, n, policy)}
    if dtype != peak_dtype:
        run_n = n if device.type == "cuda" else 1024
        ceilings["matmul_run"] = _matmul_ceiling(device, dtype, run_n, policy)
    else:
        ceilings["matmul_run"] = dict(ceilings["matmul"])
    src = torch.empty(copy_bytes // 4, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    seconds = _best_of(lambda: dst.copy_(src), device, policy)
    ceilings["copy"] = {"bytes": copy_bytes, "bytes_per_s": 2.0 * copy_bytes / seconds}
    del src, dst
    return ceilings
