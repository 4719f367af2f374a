"""Compile audit: every Triton kernel, for real GPUs, on a machine without one.

``python -m benchmarks.audit`` (or ``spanbert-fast audit``) calls each kernel launcher of
``kernels/`` with CPU tensors of SpanBERT's shapes and catches the launch instead of running
it, so the audit sees exactly the block sizes, warps, stages and constexprs each launcher
picks (for an autotuned kernel: every config of its set). Each caught launch is
specialised by Triton's own JIT binder, as it would be for the same tensors on a GPU
(16-byte aligned pointers and 16-divisible sizes and strides marked as such), and then
compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` for
sm_80, sm_90 and sm_100 with the ptxas the triton wheel bundles. Per compiled variant it
reports:

* registers per thread, stack frame and local memory, from ``cuobjdump
  --dump-resource-usage`` on the cubin, and spills (bytes of spill stores / loads) from
  ptxas' ``-v`` report: a stack frame alone is not a spill;
* shared memory (``metadata.shared``) against the arch's per-block limit;
* the tensor-core instruction each ``tl.dot`` lowered to (``mma.sync`` / ``wgmma`` /
  ``tcgen05.mma`` in the PTX; FMA when a dot stays off the tensor cores);
* the widest global load (``ld.global.v4`` = 128-bit, ``cp.async`` 16 bytes, TMA);
* theoretical occupancy: resident warps per SM from registers and shared memory.

Writes ``benchmarks/results/audit-triton<version>-<date>.{json,md}`` atomically.
``--compare BASELINE.json`` exits non-zero when a variant's registers grow by more than 10%
or it starts to spill. ``--subset`` compiles the representative subset the CI gates use.

The JIT's binding goes through triton internals (``create_function_from_signature``,
``JITFunction._pack_args``, ``knobs``) as of triton 3.7.1: a triton that renames them
fails here loudly rather than auditing a different specialisation.

The interpreter cannot compile: ``TRITON_INTERPRET`` must be unset in this process (the
test process sets it, so tests run the audit in a subprocess without it).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler.compiler import make_backend
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction, create_function_from_signature

SCHEMA_VERSION = 1
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
REGISTER_GROWTH_LIMIT = 0.10  # --compare: more than 10% more registers is a regression
INTERPRETER_REFUSED = ("the compile audit compiles for real GPUs and cannot run in the Triton "
                       "interpreter: unset TRITON_INTERPRET (e.g. `env -u TRITON_INTERPRET "
                       "python -m benchmarks.audit`)")


def _check_not_interpreted() -> None:
    """The kernels must have been decorated outside the interpreter (triton.jit reads
    TRITON_INTERPRET when a kernel is defined), and the launchers pick GPU tiles only then."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError(INTERPRETER_REFUSED)


@dataclass(frozen=True)
class Arch:
    """What bounds occupancy on one GPU generation (CUDA occupancy-calculator figures)."""

    capability: int
    name: str
    smem_per_sm: int  # bytes
    smem_per_block: int  # the opt-in maximum of one block (per-SM figure less 1 KB)
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    regs_per_sm: int = 65536
    max_regs_per_thread: int = 255


ARCHS = {
    80: Arch(80, "A100", 164 * 1024, 163 * 1024),
    90: Arch(90, "H100/H200", 228 * 1024, 227 * 1024),
    100: Arch(100, "B200", 228 * 1024, 227 * 1024),
}
SMEM_RESERVED_PER_BLOCK = 1024  # the driver keeps 1 KB of shared memory per block (sm_80+)
REG_ALLOC_UNIT = 256  # registers are allocated per warp in units of 256


def supported_archs() -> List[int]:
    """The archs of ARCHS the installed Triton's NVIDIA backend compiles for."""
    from triton.backends.nvidia.compiler import CUDABackend
    return [cap for cap in ARCHS if CUDABackend.supports_target(GPUTarget("cuda", cap, 32))]


# --------------------------------------------------------------------------------------
# Catching the launches
# --------------------------------------------------------------------------------------
@dataclass
class Launch:
    """One kernel launch as the launcher issued it: the JIT function and its arguments
    (constexprs and ``num_warps``/``num_stages`` in ``kwargs``)."""

    fn: JITFunction
    args: Tuple[Any, ...]
    kwargs: Dict[str, Any]
    config: str = ""  # "autotune i/n" for a config of an autotuned kernel


@contextlib.contextmanager
def caught_launches() -> Iterator[List[Launch]]:
    """Within the block, ``kernel[grid](...)`` records a :class:`Launch` and runs nothing;
    an autotuned kernel records one launch per config of its set."""
    launches: List[Launch] = []

    def jit_run(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, dict(kwargs)))

    def autotune_run(self, *args, grid=None, warmup=False, **kwargs):
        # The configs the launcher's own prune keeps for these arguments (on CPU tensors
        # a device-dependent prune has no device: the whole set for the dtype and shapes).
        configs = self.configs
        if self.early_config_prune is not None:
            configs = self.early_config_prune(self.configs, dict(zip(self.arg_names, args)),
                                              **kwargs)
        for i, config in enumerate(configs):
            launches.append(Launch(self.fn, args, {**kwargs, **config.all_kwargs()},
                                   f"autotune {i + 1}/{len(configs)}"))

    saved = JITFunction.run, Autotuner.run
    JITFunction.run, Autotuner.run = jit_run, autotune_run
    try:
        yield launches
    finally:
        JITFunction.run, Autotuner.run = saved


# --------------------------------------------------------------------------------------
# The cases: each kernel's launcher called with SpanBERT's shapes
# --------------------------------------------------------------------------------------
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
HEAD_DIMS = (32, 64, 128)
WIDTHS = {"base": 768, "large": 1024}
VOCAB = 28996  # SpanBERT's cased vocabulary
SEQ = 512  # padded length; packed sequences below sum to 500 tokens


@dataclass
class Case:
    """A launcher call: ``run()`` issues the launches; ``labels`` describe it."""

    op: str
    labels: Dict[str, Any]
    run: Callable[[], None]
    representative: bool = False  # in the CI subset (--subset)


def _attention_cases() -> Iterator[Case]:
    from spanbert_fast.kernels import attention as A
    heads = 2
    for dtype_name, dtype in DTYPES.items():
        for head_dim in HEAD_DIMS:
            for layout in ("padded", "packed"):
                for dropout in (0.0, 0.1):
                    def run(dtype=dtype, head_dim=head_dim, layout=layout, dropout=dropout):
                        if layout == "padded":
                            shape = (2, heads, SEQ, head_dim)
                            key_lengths = torch.tensor([SEQ, 300], dtype=torch.int32)
                            cu, max_seqlen = None, SEQ
                        else:
                            shape = (500, heads, head_dim)
                            key_lengths = None
                            cu, max_seqlen = torch.tensor([0, 200, 500], dtype=torch.int32), 300
                        q, k, v = (torch.randn(shape, dtype=dtype) for _ in range(3))
                        out, lse = A.attention_forward(q, k, v, key_lengths, cu, max_seqlen,
                                                       head_dim ** -0.5, dropout, 1234)
                        A.attention_backward(torch.randn_like(q), q, k, v, out, lse,
                                             key_lengths, cu, max_seqlen, head_dim ** -0.5,
                                             dropout, 1234)
                    # CI subset: packed (the training layout), bf16 at head dims 64 (base,
                    # large) and 128, fp16 at 64; dropout on and off.
                    rep = layout == "packed" and (dtype_name, head_dim) in (
                        ("bf16", 64), ("bf16", 128), ("fp16", 64))
                    yield Case("attention", dict(dtype=dtype_name, head_dim=head_dim,
                                                 layout=layout, dropout=dropout > 0), run,
                               representative=rep)


def _row_cases() -> Iterator[Case]:
    from spanbert_fast.kernels import linear_cross_entropy as CE
    from spanbert_fast.kernels import bias_gelu as G
    from spanbert_fast.kernels import layer_norm as LN
    from spanbert_fast.kernels import span_boundary_head as SB
    rows = 64
    for dtype_name, dtype in DTYPES.items():
        for model, width in WIDTHS.items():
            labels = dict(dtype=dtype_name, width=width)
            rep = model == "base" and dtype_name != "fp32"

            def layer_norm(dtype=dtype, width=width):
                x, r, dy = (torch.randn(rows, width, dtype=dtype) for _ in range(3))
                w, b = torch.randn(width, dtype=dtype), torch.randn(width, dtype=dtype)
                _, mean, rstd = LN.layer_norm_forward(x, w, b, 1e-12, r)
                LN.layer_norm_backward(dy, x, w, b, r, mean, rstd, [True, True, True, True])

            def gelu(dtype=dtype, width=width):
                # The intermediate (4 x hidden) of BERT's feed-forward block.
                x, dy = (torch.randn(rows, 4 * width, dtype=dtype) for _ in range(2))
                b = torch.randn(4 * width, dtype=dtype)
                G.forward(x, b)
                G.backward(dy, x, b, [True, True])
                G.forward_with_dropout(x, b, 0.1, 7)
                G.backward_with_dropout(dy, x, b, 0.1, 7, [True, True])

            def cross_entropy(dtype=dtype, width=width):
                h = torch.randn(rows, width, dtype=dtype)
                w = torch.randn(VOCAB, width, dtype=dtype) * 0.02
                labels_ = torch.randint(0, VOCAB, (rows,))
                CE.forward(h, w, torch.zeros(VOCAB, dtype=dtype), labels_, -100)
                CE.backward(torch.ones((), dtype=torch.float32), h, w, None, labels_, -100,
                            [True, True, False, False])

            def span_boundary(dtype=dtype, width=width):
                z, dy = (torch.randn(rows, width, dtype=dtype) for _ in range(2))
                table = torch.randn(200, width, dtype=dtype)
                index = torch.randint(0, 200, (rows,))
                b, w = torch.randn(width, dtype=dtype), torch.randn(width, dtype=dtype)
                for t, i in ((None, None), (table, index)):
                    SB.bias_gelu_layer_norm_forward(z, b, w, b, 1e-12, t, i)
                    SB.bias_gelu_layer_norm_backward(dy, z, b, w, 1e-12, t, i)

            yield Case("layer_norm", labels, layer_norm, rep)
            # bf16 alone stands for both in the CI subset: bias_gelu has 6 autotune configs x
            # forward/backward x dropout on/off = 24 variants per dtype.
            yield Case("bias_gelu", labels, gelu, rep and dtype_name == "bf16")
            yield Case("linear_cross_entropy", labels, cross_entropy, rep)
            yield Case("span_boundary_head", labels, span_boundary, rep)


def all_cases() -> List[Case]:
    return list(_attention_cases()) + list(_row_cases())


# --------------------------------------------------------------------------------------
# Compiling one variant
# --------------------------------------------------------------------------------------
@dataclass
class Variant:
    """A distinct compilation: one caught launch standing for every case whose launch
    specialises the same way (kernel, signature, constexprs, divisibility, options)."""

    op: str
    kernel: str
    launch: Launch
    key: str
    cases: List[Dict[str, Any]] = field(default_factory=list)

    @property
    def id(self) -> str:
        """Readable and stable across runs: kernel, first pointer's dtype, constexprs,
        warps/stages, and a hash of the full specialisation."""
        signature, constexprs, _, options = specialise(self.launch, 90)
        names = self.launch.fn.arg_names
        dtype = next((t[1:] for t in signature.values() if t.startswith("*")), "")
        consts = ",".join(f"{names[k[0]]}={_short(v)}" for k, v in sorted(constexprs.items())
                          if names[k[0]].isupper())
        digest = hashlib.sha1(self.key.encode()).hexdigest()[:8]
        return (f"{self.kernel}[{dtype}|{consts}|w{options['num_warps']}"
                f"s{options['num_stages']}]#{digest}")


def _short(value) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    text = str(value)
    return text.replace("fp32", "f32").replace("fp64", "f64")


def collect_variants(cases: Sequence[Case]) -> List[Variant]:
    """Run every case's launcher with launches caught; one Variant per distinct
    specialisation (sm_90's binding is the key; the binder does not depend on the arch)."""
    variants: Dict[str, Variant] = {}
    for case in cases:
        with caught_launches() as launches:
            case.run()
        if not launches:
            raise RuntimeError(f"{case.op} {case.labels}: the launcher launched nothing")
        for launch in launches:
            signature, constexprs, attrs, options = specialise(launch, 90)
            names = launch.fn.arg_names
            key = json.dumps([
                launch.fn.fn.__name__, signature,
                {names[k[0]]: _plain(v) for k, v in constexprs.items()},
                {names[k[0]]: _plain(v) for k, v in sorted(attrs.items())},
                options["num_warps"], options["num_stages"]], sort_keys=True)
            variant = variants.get(key)
            if variant is None:
                variant = variants[key] = Variant(case.op, launch.fn.fn.__name__, launch, key)
            labels = dict(case.labels, **({"config": launch.config} if launch.config else {}))
            if labels not in variant.cases:
                variant.cases.append(labels)
    return list(variants.values())


def _plain(value):
    """constexpr values (tl.float32, bools, ints) as JSON-friendly values."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


def specialise(launch: Launch, arch: int):
    """The JIT's own binding of ``launch`` for ``arch``: (signature, constexprs, attrs,
    options), exactly what ``JITFunction.run`` would hand to ``ASTSource`` on that GPU."""
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(launch.fn.signature, launch.fn.params, backend)
    kwargs = dict(launch.kwargs)
    kwargs.setdefault("debug", False)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = launch.fn._pack_args(
        backend, kwargs, bound_args, specialization, options)
    return signature, constexprs, attrs, options.__dict__


_RESOURCE_RE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def _cuobjdump() -> str:
    import triton.backends.nvidia as nvidia
    return os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")


def resource_usage(cubin: bytes) -> Dict[str, int]:
    """registers / stack / static shared / local bytes of the cubin's one kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        text = subprocess.run([_cuobjdump(), "--dump-resource-usage", handle.name],
                              check=True, capture_output=True, text=True).stdout
    match = _RESOURCE_RE.search(text)
    if match is None:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{text}")
    regs, stack, shared, local = (int(g) for g in match.groups())
    return dict(registers=regs, stack_bytes=stack, static_shared_bytes=shared,
                local_bytes=local)


_TT_DOT = re.compile(r"\btt\.dot\s")
_TC_PTX = (("tcgen05", re.compile(r"\btcgen05\.mma\b")),
           ("wgmma", re.compile(r"\bwgmma\.mma_async\b")),
           ("mma.sync", re.compile(r"\bmma\.sync\.aligned\b")))
_LOAD_RE = re.compile(r"\bld\.global(?:\.[a-z0-9_:]+)*?(?:\.v(\d))?\.(?:b|u|s|f)(\d+)\b")


def dot_lowering(ttir: str, ttgir: str, ptx: str) -> Dict[str, Any]:
    """How the kernel's ``tl.dot``s lowered: their count in the TTIR, the dots the TTGIR
    left as FMA loops (off the tensor cores), and the tensor-core instructions in the
    PTX (``mma.sync`` on sm_80, ``wgmma`` on sm_90, ``tcgen05.mma`` on sm_100)."""
    dots = len(_TT_DOT.findall(ttir))
    # After the TTGIR passes a tensor-core dot is a tt.dot with an #mma result (sm_80), a
    # ttng.warp_group_dot (sm_90) or a ttng.tc_gen5_mma (sm_100); a tt.dot left with a
    # #blocked result is an FMA loop. Software pipelining may clone a dot, so the FMA
    # dots are counted (any is a finding) rather than the tensor-core ones.
    fma = sum(1 for line in ttgir.splitlines()
              if _TT_DOT.search(line) and not re.search(r"->\s*tensor<[^>]*#mma", line))
    instructions = {name: len(rx.findall(ptx)) for name, rx in _TC_PTX}
    return dict(dots=dots, fma_dots=fma, tensor_core_dots=max(dots - fma, 0),
                tensor_core_instructions={k: v for k, v in instructions.items() if v})


def global_loads(ptx: str) -> Dict[str, Any]:
    """Global-load forms in the PTX by width in bits (``ld.global.v4.b32`` = 128), plus
    ``cp.async`` copies (bytes each) and TMA bulk loads."""
    widths: Dict[str, int] = {}
    for vec, bits in _LOAD_RE.findall(ptx):
        width = int(vec or 1) * int(bits)
        widths[str(width)] = widths.get(str(width), 0) + 1
    cp_async = re.findall(r"\bcp\.async\.c[ag]\.shared\.global[^\n]*?,\s*(\d+)\s*[,;]", ptx)
    tma = len(re.findall(r"\bcp\.async\.bulk\.tensor", ptx))
    widest = max([int(w) for w in widths] + [8 * int(b) for b in cp_async] + [0])
    return dict(ld_global_bits=dict(sorted(widths.items(), key=lambda kv: int(kv[0]))),
                cp_async=len(cp_async), tma=tma, widest_bits=widest)


def occupancy(arch: Arch, registers: int, shared: int, num_warps: int) -> Dict[str, Any]:
    """Resident warps per SM as registers and shared memory allow (theoretical)."""
    regs_per_warp = -(-max(registers, 1) * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    blocks_by_regs = (arch.regs_per_sm // regs_per_warp) // num_warps
    blocks_by_smem = (arch.smem_per_sm // (shared + SMEM_RESERVED_PER_BLOCK)
                      if shared <= arch.smem_per_block else 0)
    blocks_by_warps = arch.max_warps_per_sm // num_warps
    blocks = min(blocks_by_regs, blocks_by_smem, blocks_by_warps, arch.max_blocks_per_sm)
    limits = dict(registers=blocks_by_regs, shared=blocks_by_smem, warps=blocks_by_warps,
                  blocks=arch.max_blocks_per_sm)
    limiter = min(limits, key=lambda k: limits[k])
    warps = blocks * num_warps
    return dict(blocks_per_sm=blocks, warps_per_sm=warps,
                occupancy=round(warps / arch.max_warps_per_sm, 3), limited_by=limiter)


_PTXAS_SPILLS_RE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                              r"(\d+) bytes spill loads")


def ptxas_spills(log: str) -> Optional[Dict[str, int]]:
    """Spill stores / loads from ptxas' ``-v`` report (None when there is none). A stack
    frame without spill stores is not a spill (e.g. a call's saved registers); only
    ptxas' own report tells the two apart, so it is the spill figure when present."""
    match = _PTXAS_SPILLS_RE.search(log)
    if match is None:
        return None
    frame, stores, loads = (int(g) for g in match.groups())
    return dict(spill_store_bytes=stores, spill_load_bytes=loads)


@contextlib.contextmanager
def _fresh_compile_with_ptxas_log() -> Iterator[io.StringIO]:
    """Compile for real (no cache hit, which would skip ptxas and its report) and catch
    the ``ptxas -v`` report triton prints when ``dump_ptxas_log`` is set."""
    from triton import knobs
    saved = knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log
    knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log = True, True
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            yield log
    finally:
        knobs.compilation.always_compile, knobs.nvidia.dump_ptxas_log = saved


def compile_variant(variant: Variant, arch: int) -> Dict[str, Any]:
    """Compile one variant for ``arch``; the audit row (``error`` set on failure)."""
    _check_not_interpreted()
    spec = ARCHS[arch]
    start = time.perf_counter()
    row: Dict[str, Any] = dict(arch=f"sm_{arch}")
    try:
        signature, constexprs, attrs, options = specialise(variant.launch, arch)
        src = ASTSource(variant.launch.fn, signature, constexprs, attrs)
        with _fresh_compile_with_ptxas_log() as log:
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as err:  # a compile failure is a finding, not a crash of the audit
        row.update(error=f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:300]}",
                   compile_s=round(time.perf_counter() - start, 2))
        return row
    usage = resource_usage(compiled.asm["cubin"])
    spills = ptxas_spills(log.getvalue())
    if spills is None:  # no ptxas report: count any stack or local memory as a spill
        spills = dict(spill_store_bytes=usage["stack_bytes"] + usage["local_bytes"],
                      spill_load_bytes=usage["stack_bytes"] + usage["local_bytes"])
    shared = int(compiled.metadata.shared)
    num_warps = int(compiled.metadata.num_warps)
    row.update(usage)
    row.update(spills)
    row.update(
        spills=spills["spill_store_bytes"] > 0 or spills["spill_load_bytes"] > 0,
        shared_bytes=shared, shared_limit_bytes=spec.smem_per_block,
        shared_ok=shared <= spec.smem_per_block,
        num_warps=num_warps, num_stages=int(compiled.metadata.num_stages),
        **dot_lowering(compiled.asm["ttir"], compiled.asm["ttgir"], compiled.asm["ptx"]),
        loads=global_loads(compiled.asm["ptx"]),
        **occupancy(spec, usage["registers"], shared, num_warps),
        compile_s=round(time.perf_counter() - start, 2),
    )
    return row


# --------------------------------------------------------------------------------------
# The run, its files, the gates and --compare
# --------------------------------------------------------------------------------------
# The variants a forked worker compiles (set before the pool forks: workers get them by
# index, nothing is pickled but the index and the result row).
_POOL_VARIANTS: List[Variant] = []


def _compile_pair(pair: Tuple[int, int]) -> Tuple[int, int, Dict[str, Any]]:
    index, arch = pair
    return index, arch, compile_variant(_POOL_VARIANTS[index], arch)


def _compiled_pairs(variants: List[Variant], archs: Sequence[int], jobs: int):
    """``(index, arch, row)`` for every variant and arch, in completion order; ``jobs``
    forked processes compile side by side (the compiles are independent and CPU-bound)."""
    global _POOL_VARIANTS
    pairs = [(i, arch) for i in range(len(variants)) for arch in archs]
    _POOL_VARIANTS = variants
    try:
        if jobs <= 1:
            yield from map(_compile_pair, pairs)
            return
        import multiprocessing
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            yield from pool.imap_unordered(_compile_pair, pairs, chunksize=1)
    finally:
        _POOL_VARIANTS = []


def run_audit(cases: Sequence[Case], archs: Sequence[int],
              log: Callable[[str], None] = lambda line: None, jobs: int = 1) -> Dict[str, Any]:
    """Compile every variant of ``cases`` for ``archs`` (``jobs`` processes); the audit
    document."""
    _check_not_interpreted()
    start = time.perf_counter()
    variants = collect_variants(cases)
    log(f"{len(cases)} launcher cases -> {len(variants)} distinct variants x "
        f"{len(archs)} archs, {jobs} compile process{'es' if jobs > 1 else ''}")
    rows = []
    for variant in variants:
        signature, constexprs, _, options = specialise(variant.launch, 90)
        names = variant.launch.fn.arg_names
        rows.append(dict(id=variant.id, op=variant.op, kernel=variant.kernel,
                         constexprs={names[k[0]]: _plain(v)
                                     for k, v in sorted(constexprs.items())},
                         pointer_dtypes=sorted({t[1:] for t in signature.values()
                                                if t.startswith("*")}),
                         num_warps=options["num_warps"], num_stages=options["num_stages"],
                         cases=variant.cases, archs={}))
    total = len(variants) * len(archs)
    for done, (index, arch, result) in enumerate(_compiled_pairs(variants, archs, jobs), 1):
        rows[index]["archs"][f"sm_{arch}"] = result
        log(f"[{done}/{total}] {rows[index]['id']} on sm_{arch}: "
            + (result["error"] if "error" in result else
               f"{result['registers']} regs, {result['spill_store_bytes']} B spilled"))
    for row in rows:  # archs in the order asked for, whatever order the compiles finished
        row["archs"] = {f"sm_{arch}": row["archs"][f"sm_{arch}"] for arch in archs}
    now = datetime.datetime.now(datetime.timezone.utc)
    return dict(
        schema_version=SCHEMA_VERSION, suite="spanbert_fast.benchmarks.audit",
        created=now.isoformat(timespec="seconds"), date=now.date().isoformat(),
        versions=dict(triton=triton.__version__, torch=torch.__version__,
                      python=sys.version.split()[0]),
        archs={f"sm_{a}": dict(name=ARCHS[a].name, smem_per_sm=ARCHS[a].smem_per_sm,
                               smem_per_block=ARCHS[a].smem_per_block,
                               max_warps_per_sm=ARCHS[a].max_warps_per_sm) for a in archs},
        cases=len(cases), variants=len(rows), seconds=round(time.perf_counter() - start, 1),
        rows=rows)


def _low_precision(row: Dict[str, Any]) -> bool:
    """fp16/bf16 variants: the dtypes the spill and tensor-core gates are about."""
    return any(d in ("fp16", "bf16") for d in row["pointer_dtypes"])


def _autotuned(row: Dict[str, Any]) -> bool:
    """A config of an autotuned kernel (the launcher times several; a device prunes some)."""
    return any("config" in case for case in row["cases"])


def _arch_pruned(row: Dict[str, Any]) -> bool:
    """A config of an autotuned attention kernel, whose launcher prunes per arch the
    configs this audit saw spill there (kernels/attention_spills-triton<version>.json);
    every other kernel's configs must each compile cleanly."""
    return row["op"] == "attention" and _autotuned(row)


def autotune_group(row: Dict[str, Any]) -> Tuple[Any, ...]:
    """What an autotuned config competes within: kernel, dtype and every constexpr but the
    tile sizes the autotuner sets."""
    consts = tuple(sorted((k, v) for k, v in row["constexprs"].items()
                          if k not in ("BLOCK_M", "BLOCK_N")))
    return (row["kernel"], tuple(row["pointer_dtypes"]), consts)


# The autotuned attention kernels, by the name kernels/attention.py's CONFIGS and spill
# table give them.
ATTENTION_KERNELS = {"_attention_forward_kernel": "forward",
                     "_attention_backward_dkdv_kernel": "dkdv",
                     "_attention_backward_dq_kernel": "dq"}


def spill_table(doc: Dict[str, Any]) -> List[List[Any]]:
    """The attention autotuners' prune table: one entry ``[kernel, arch, dtype, BLOCK_D,
    VARLEN, HAS_DROPOUT, BLOCK_M, BLOCK_N, num_warps, num_stages, spill bytes]`` per config
    that spills (ptxas' spill stores), for the arches this audit compiled."""
    table = []
    for row in doc["rows"]:
        if row["kernel"] not in ATTENTION_KERNELS or not _arch_pruned(row):
            continue
        c = row["constexprs"]
        for arch, r in sorted(row["archs"].items()):
            if "error" in r or not r["spills"]:
                continue
            table.append([ATTENTION_KERNELS[row["kernel"]], int(arch.removeprefix("sm_")),
                          row["cases"][0]["dtype"],
                          c["BLOCK_D"], bool(c["VARLEN"]), bool(c["HAS_DROPOUT"]),
                          c["BLOCK_M"], c["BLOCK_N"], row["num_warps"], row["num_stages"],
                          r["spill_store_bytes"]])
    return sorted(table)


def gate_failures(doc: Dict[str, Any]) -> Dict[str, List[str]]:
    """Each gate's failures (empty lists when the audit passes):

    * compile: every variant compiles for every arch;
    * spills: no fp16/bf16 variant spills on sm_80 or sm_90; for autotuned attention, some
      config of each group compiles without spills there (its prune keeps only those);
    * shared: shared memory within the arch's per-block limit;
    * tensor_cores: every dot of an fp16/bf16 variant on a tensor-core instruction.
    """
    failures: Dict[str, List[str]] = dict(compile=[], spills=[], shared=[], tensor_cores=[])
    clean: Dict[Tuple[Any, str], bool] = {}
    for row in doc["rows"]:
        for arch, r in row["archs"].items():
            where = f"{row['id']} on {arch}"
            if "error" in r:
                failures["compile"].append(f"{where}: {r['error']}")
                continue
            if _arch_pruned(row):
                key = (autotune_group(row), arch)
                clean[key] = clean.get(key, False) or not r["spills"]
            elif r["spills"] and _low_precision(row) and arch in ("sm_80", "sm_90"):
                failures["spills"].append(
                    f"{where}: {r['registers']} registers, {r['spill_store_bytes']} B spill "
                    f"stores, {r['stack_bytes']} B stack")
            if not r["shared_ok"]:
                failures["shared"].append(f"{where}: {r['shared_bytes']} B shared > "
                                          f"{r['shared_limit_bytes']} B")
            if _low_precision(row) and r["fma_dots"]:
                failures["tensor_cores"].append(
                    f"{where}: {r['fma_dots']} of {r['dots']} dots on FMA, not tensor cores")
    for (group, arch), ok in sorted(clean.items(), key=str):
        if not ok and arch in ("sm_80", "sm_90") and any(
                d in ("fp16", "bf16") for d in group[1]):
            failures["spills"].append(f"{group[0]} {group[1]} {dict(group[2])} on {arch}: "
                                      "every autotune config spills")
    return failures


def compare(doc: Dict[str, Any], baseline: Dict[str, Any]) -> List[str]:
    """Regressions of ``doc`` against ``baseline`` for the (variant, arch) pairs in both:
    registers up by more than 10%, a spill that was not there, a compile that now fails."""
    base = {(row["id"], arch): r for row in baseline["rows"] for arch, r in row["archs"].items()}
    problems = []
    for row in doc["rows"]:
        for arch, new in row["archs"].items():
            old = base.get((row["id"], arch))
            if old is None or "error" in old:
                continue
            where = f"{row['id']} on {arch}"
            if "error" in new:
                problems.append(f"{where}: compiled in the baseline, now fails: {new['error']}")
                continue
            if new["registers"] > old["registers"] * (1 + REGISTER_GROWTH_LIMIT):
                problems.append(f"{where}: registers {old['registers']} -> {new['registers']} "
                                f"(> {REGISTER_GROWTH_LIMIT:.0%} growth)")
            if new["spills"] and not old["spills"]:
                problems.append(f"{where}: now spills ({new['spill_store_bytes']} B spill "
                                "stores; none in the baseline)")
    return problems


def summary_table(doc: Dict[str, Any], arch: str = "sm_90") -> str:
    """One markdown row per (kernel, dtype class) on ``arch``: variants, register, spill,
    shared-memory and occupancy ranges, and the dots' instruction (the README's table)."""
    groups: Dict[Tuple[str, str], List[Dict[str, Any]]] = {}
    for row in doc["rows"]:
        r = row["archs"].get(arch)
        if r is None or "error" in r:
            continue
        cls = "fp16/bf16" if _low_precision(row) else "/".join(
            d for d in row["pointer_dtypes"] if d.startswith("fp")) or "-"
        groups.setdefault((row["kernel"], cls), []).append((row, r))

    def span(values, fmt="{}"):
        lo, hi = min(values), max(values)
        return fmt.format(lo) if lo == hi else f"{fmt.format(lo)}-{fmt.format(hi)}"

    lines = ["| kernel | dtype | variants | registers | spill stores (B) | shared (KB) "
             "| warps/SM | dots on |", "|---|---|---|---|---|---|---|---|"]
    for (kernel, cls), items in groups.items():
        rs = [r for _, r in items]
        instructions = sorted({k for r in rs for k in r["tensor_core_instructions"]})
        fma = sum(r["fma_dots"] for r in rs)
        dots = ", ".join(instructions) or ("FMA" if fma else "-")
        lines.append(
            f"| `{kernel}` | {cls} | {len(rs)} | {span([r['registers'] for r in rs])} | "
            f"{span([r['spill_store_bytes'] for r in rs])} | "
            f"{span([r['shared_bytes'] / 1024 for r in rs], '{:.1f}')} | "
            f"{span([r['warps_per_sm'] for r in rs])} | {dots} |")
    pruned = {}
    for row in doc["rows"]:
        r = row["archs"].get(arch)
        if r is not None and "error" not in r and _arch_pruned(row):
            key = autotune_group(row)
            pruned[key] = pruned.get(key, False) or not r["spills"]
    if pruned:
        lines += ["", f"Autotuned attention on {arch}: {sum(pruned.values())} of "
                  f"{len(pruned)} (kernel, dtype, head dim, layout, dropout) groups have a "
                  "config that does not spill; the launcher's prune keeps only the least "
                  "spilling configs of each group."]
    return "\n".join(lines)


def markdown(doc: Dict[str, Any]) -> str:
    """One table per arch: a row per variant."""
    lines = [f"# Compile audit, triton {doc['versions']['triton']}, {doc['date']}", "",
             f"{doc['variants']} kernel variants from {doc['cases']} launcher cases, compiled "
             f"for {', '.join(doc['archs'])} in {doc['seconds']} s without a GPU "
             "(`python -m benchmarks.audit`). Spill = ptxas' spill stores (bytes); stack = the "
             "cubin's stack frame; occupancy = "
             "resident warps per SM (of 64) from registers and shared memory.", ""]
    failures = gate_failures(doc)
    lines.append("Gates: " + "; ".join(
        f"{gate} {'ok' if not items else f'{len(items)} FAILED'}"
        for gate, items in failures.items()))
    for gate, items in failures.items():
        lines.extend(f"- {gate}: {item}" for item in items)
    for arch in doc["archs"]:
        lines += ["", f"## Summary, {arch}", "", summary_table(doc, arch)]
    for arch, spec in doc["archs"].items():
        lines += ["", f"## {arch} ({spec['name']}, {spec['smem_per_block'] // 1024} KB shared "
                  "per block)", "",
                  "| variant | cases | regs | spill B | stack B | smem KB | dots (tc instr) | widest load "
                  "| warps/SM | limited by |", "|---|---|---|---|---|---|---|---|---|---|"]
        for row in doc["rows"]:
            r = row["archs"][arch]
            if "error" in r:
                lines.append(f"| `{row['id']}` | {len(row['cases'])} | compile error: "
                             f"{r['error']} | | | | | | | |")
                continue
            tc = ", ".join(f"{k} {v}" for k, v in r["tensor_core_instructions"].items())
            dots = (f"{r['dots']}" + (f" ({tc})" if tc else "")
                    + (f", {r['fma_dots']} FMA" if r["fma_dots"] else "")) if r["dots"] else "-"
            lines.append(
                f"| `{row['id']}` | {len(row['cases'])} | {r['registers']} | "
                f"{r['spill_store_bytes']} | {r['stack_bytes'] + r['local_bytes']} | "
                f"{r['shared_bytes'] / 1024:.1f} | "
                f"{dots} | {r['loads']['widest_bits']} bit | {r['warps_per_sm']} | "
                f"{r['limited_by']} |")
    return "\n".join(lines) + "\n"


def write_outputs(doc: Dict[str, Any], out_dir: str) -> Tuple[str, str]:
    """``<out_dir>/audit-triton<version>-<date>.{json,md}``, both written atomically."""
    from spanbert_fast.io import atomic_write_all
    os.makedirs(out_dir, exist_ok=True)
    paths = _output_paths(out_dir, doc["versions"]["triton"], doc["date"])
    contents = (json.dumps(doc, indent=1) + "\n", markdown(doc))
    atomic_write_all([(path, _text_writer(text)) for path, text in zip(paths, contents)])
    return paths


def _output_paths(out_dir: str, version: Optional[str] = None,
                  date: Optional[str] = None) -> Tuple[str, str]:
    """``<out_dir>/audit-triton<version>-<date>.{json,md}`` (today, installed triton)."""
    version = triton.__version__ if version is None else version
    date = (datetime.datetime.now(datetime.timezone.utc).date().isoformat()
            if date is None else date)
    stem = os.path.join(out_dir, f"audit-triton{version}-{date}")
    return stem + ".json", stem + ".md"


def _text_writer(content: str) -> Callable[[str], None]:
    """A writer for the package's atomic file writers: ``content`` into the temp file."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(content)
    return write


def _parse_archs(text: str) -> List[int]:
    archs = []
    for item in text.split(","):
        item = item.strip().lower().removeprefix("sm_")
        if not item.isdigit() or int(item) not in ARCHS:
            raise argparse.ArgumentTypeError(
                f"--arch takes a comma list of {', '.join(f'sm_{a}' for a in ARCHS)}, "
                f"got {text!r}")
        archs.append(int(item))
    return archs


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"--jobs takes a positive integer, got {text!r}")
    return value


def build_parser(prog: str = "python -m benchmarks.audit") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=_parse_archs, default=None,
                        help="comma list of sm_80, sm_90, sm_100 (default: all that the "
                             "installed triton compiles for)")
    parser.add_argument("--jobs", type=_positive_int, default=os.cpu_count() or 1,
                        help="compile processes side by side (default: one per CPU)")
    parser.add_argument("--subset", action="store_true",
                        help="only the representative subset the CI gates compile")
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help="folder of audit-triton<version>-<date>.{json,md} "
                             "(default: benchmarks/results)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing audit file of the same triton version and "
                             "date (refused otherwise)")
    parser.add_argument("--json", default=None,
                        help="write the audit document to this file instead (no .md)")
    parser.add_argument("--compare", metavar="BASELINE.json", default=None,
                        help="exit 1 when a variant's registers grew > 10%% or it started "
                             "to spill against this audit")
    parser.add_argument("--gates", action="store_true",
                        help="also exit 1 when a gate fails (compile, spills, shared, "
                             "tensor_cores)")
    parser.add_argument("--write-spill-table", metavar="PATH", default=None,
                        help="write the attention autotuners' prune table (the configs "
                             "that spill, per arch) from this audit to PATH, e.g. "
                             "kernels/attention_spills-triton<version>.json")
    parser.add_argument("--input", metavar="AUDIT.json", default=None,
                        help="check the gates / --compare on this audit instead of compiling")
    return parser


def _read_audit_file(parser, option: str, path: str) -> dict:
    """An audit document from ``path`` (JSON with ``rows``), or exit 2 naming the option."""
    try:
        with open(path, encoding="utf-8") as handle:
            doc = json.load(handle)
        if not isinstance(doc, dict) or "rows" not in doc:
            raise ValueError("no 'rows'")
    except (OSError, ValueError) as err:
        parser.error(f"{option} {path}: not an audit file ({err})")
    return doc


def main(argv: Optional[Sequence[str]] = None, prog: str = "python -m benchmarks.audit") -> int:
    """Run the audit (or check ``--input``); 1 when ``--compare`` finds a regression or,
    with ``--gates``, a gate fails."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.write_spill_table is not None:
        folder = os.path.dirname(os.path.abspath(args.write_spill_table))
        if not os.path.isdir(folder):
            parser.error(f"--write-spill-table {args.write_spill_table}: no folder {folder}")
    baseline = None
    if args.compare is not None:
        baseline = _read_audit_file(parser, "--compare", args.compare)
    if args.input is not None:
        doc = _read_audit_file(parser, "--input", args.input)
        _write_spill_table(doc, args.write_spill_table)
        return _report(doc, baseline, args)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error(INTERPRETER_REFUSED)
    targets = [args.json] if args.json is not None else list(_output_paths(args.out))
    existing = [p for p in targets if os.path.exists(p) and p != os.devnull]
    if existing and not args.overwrite:
        parser.error(f"would replace {', '.join(existing)}: pass --overwrite to replace, "
                     "or --out/--json to write elsewhere")
    supported = supported_archs()
    archs = args.arch if args.arch is not None else supported
    unsupported = [a for a in archs if a not in supported]
    if unsupported:
        parser.error(f"triton {triton.__version__} cannot compile for "
                     f"{', '.join(f'sm_{a}' for a in unsupported)}")
    cases = [c for c in all_cases() if c.representative or not args.subset]
    doc = run_audit(cases, archs, log=lambda line: print(line, file=sys.stderr, flush=True),
                    jobs=args.jobs)
    if args.json is not None:
        from spanbert_fast.io import atomic_write
        atomic_write(args.json, _text_writer(json.dumps(doc, indent=1) + "\n"))
        print(f"wrote {args.json}")
    else:
        for path in write_outputs(doc, args.out):
            print(f"wrote {path}")
    _write_spill_table(doc, args.write_spill_table)
    return _report(doc, baseline, args)


def spill_table_document(doc: Dict[str, Any]) -> Dict[str, Any]:
    """The prune table file's content for ``doc``."""
    return dict(triton=doc["versions"]["triton"], audit_date=doc["date"],
                archs=sorted(int(a.removeprefix("sm_")) for a in doc["archs"]),
                fields=["kernel", "arch", "dtype", "BLOCK_D", "VARLEN", "HAS_DROPOUT",
                        "BLOCK_M", "BLOCK_N", "num_warps", "num_stages", "spill_bytes"],
                spills=spill_table(doc))


def _write_spill_table(doc: Dict[str, Any], path: Optional[str]) -> None:
    if path is None:
        return
    from spanbert_fast.io import atomic_write
    text = json.dumps(spill_table_document(doc), indent=None, separators=(",", ":"))
    atomic_write(path, _text_writer(text.replace("],[", "],\n[") + "\n"))
    print(f"wrote {path}")


def _report(doc: Dict[str, Any], baseline: Optional[Dict[str, Any]], args) -> int:
    """Print the gates and the comparison; the exit status."""
    status = 0
    failures = gate_failures(doc)
    for gate, items in failures.items():
        print(f"gate {gate}: " + ("ok" if not items else f"{len(items)} failed"))
        for item in items:
            print(f"  {item}")
    if args.gates and any(failures.values()):
        status = 1
    if baseline is not None:
        problems = compare(doc, baseline)
        print(f"compare with {args.compare}: "
              + ("no regression" if not problems else f"{len(problems)} regressions"))
        for problem in problems:
            print(f"  {problem}")
        if problems:
            status = 1
    print(f"audit took {doc['seconds']} s")
    return status


if __name__ == "__main__":
    sys.exit(main())
