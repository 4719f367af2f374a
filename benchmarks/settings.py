"""Run settings, their per-device defaults, and the machine the suite runs on.

:class:`SuiteSettings` is what the command line produces; :class:`RunContext` is what the
cases see (the resolved device, dtype and model config, and which Triton kernels can run).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import math
import os
import platform
import re
import zlib
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, List, Optional, Tuple

import torch

from spanbert_fast import SpanBertConfig, ops

__all__ = [
    "DTYPES",
    "MODELS",
    "DEFAULT_SHAPES",
    "SuiteSettings",
    "RunContext",
    "InterpreterRefused",
    "refuse_triton_interpreter",
    "resolve_device",
    "last_level_cache_bytes",
    "default_quick",
    "describe_device",
    "library_versions",
]

DTYPES: Dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16,
                                  "fp16": torch.float16}
MODELS = {"tiny": SpanBertConfig.tiny, "base": SpanBertConfig.base, "large": SpanBertConfig.large}

# (device type, quick) -> default sequence lengths and batch sizes.
# CPU quick is sized for the 2-core CI-class machine: BERT-base forward+backward at batch
# 2 x 128 tokens is ~1 s a call there and each variant is called ~5 times, so seq 256
# would double the run; the default run then takes ~3 min on an idle machine. The GPU
# defaults cover the latency regime (batch 8) and the throughput regime (batch 32 x 512).
DEFAULT_SHAPES: Dict[Tuple[str, bool], Dict[str, Tuple[int, ...]]] = {
    ("cpu", True): {"seqs": (32, 64, 128), "batches": (2,)},
    ("cpu", False): {"seqs": (128, 256, 512), "batches": (8,)},
    ("cuda", True): {"seqs": (128, 512), "batches": (8,)},
    ("cuda", False): {"seqs": (128, 256, 512), "batches": (8, 32)},
}


class InterpreterRefused(RuntimeError):
    """TRITON_INTERPRET=1 is set: timings would measure the interpreter, not kernels."""


def refuse_triton_interpreter() -> None:
    """Raise :class:`InterpreterRefused` when ``TRITON_INTERPRET=1`` is set."""
    if os.environ.get("TRITON_INTERPRET", "0").strip() not in ("", "0"):
        raise InterpreterRefused(
            "TRITON_INTERPRET is set: the benchmark suite never runs in the Triton "
            "interpreter (it would time a Python emulator, not kernels). Unset it "
            "(`env -u TRITON_INTERPRET ...`) and run again.")


def resolve_device(requested: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; ``cpu``/``cuda``/``cuda:N`` as given.
    Raises ``ValueError`` (saying why) for a device this machine does not have."""
    requested = (requested or "auto").strip().lower()
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", requested):
        raise ValueError(f"expected auto, cpu, cuda or cuda:N, got {requested!r}")
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{requested!r} asked for, but torch sees no CUDA device "
                             f"(torch {torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{requested!r} asked for, but only {torch.cuda.device_count()} "
                             "CUDA device(s) are visible")
    return device


def default_quick(device: torch.device) -> bool:
    """``--quick`` is the default on CPU (a full CPU run takes far too long to be useful)."""
    return device.type == "cpu"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", "r", encoding="utf-8") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def last_level_cache_bytes() -> int:
    """Size of the CPU's largest cache (Linux sysfs); 32 MiB when it cannot be read."""
    sizes = []
    root = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(root):
            try:
                with open(os.path.join(root, entry, "size"), "r", encoding="utf-8") as handle:
                    text = handle.read().strip().upper()
            except OSError:
                continue
            scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            digits = text.rstrip("KMG")
            if digits.isdigit():
                sizes.append(int(digits) * scale)
    except OSError:
        pass
    return max(sizes) if sizes else 32 << 20


def describe_device(device: torch.device) -> Dict[str, object]:
    """Name, slug (used in output file names) and size of the device."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = props.name
        return {"type": "cuda", "name": name, "slug": _slug(name),
                "memory_bytes": int(props.total_memory),
                "multiprocessors": int(props.multi_processor_count),
                "capability": f"{props.major}.{props.minor}",
                "cuda": torch.version.cuda}
    name = _cpu_name()
    threads = torch.get_num_threads()
    return {"type": "cpu", "name": name, "slug": f"cpu-{_slug(name)}-{threads}t",
            "threads": threads, "logical_cores": os.cpu_count(),
            "last_level_cache_bytes": last_level_cache_bytes()}


def library_versions() -> Dict[str, Optional[str]]:
    """Versions of everything that moves the numbers (None: not installed). Read from the
    installed metadata so that triton is not imported on machines that do not use it."""
    out: Dict[str, Optional[str]] = {"python": platform.python_version(),
                                     "torch": torch.__version__}
    for dist in ("triton", "transformers", "numpy"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    try:
        import spanbert_fast
        out["spanbert_fast"] = getattr(spanbert_fast, "__version__", None)
    except ImportError:  # pragma: no cover - the suite imports it already
        out["spanbert_fast"] = None
    return out


@dataclass
class SuiteSettings:
    """Everything a run depends on; the command line fills it (see ``benchmarks.cli``)."""

    device: torch.device
    model: str = "base"
    dtype: str = "fp32"
    seqs: Tuple[int, ...] = (128,)
    batches: Tuple[int, ...] = (2,)
    cases: Tuple[str, ...] = ()
    quick: bool = True
    out_dir: str = os.path.join("benchmarks", "results")
    progress: bool = True
    plots: bool = True
    seed: int = 0
    argv: List[str] = field(default_factory=list)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def model_config(self) -> SpanBertConfig:
        return MODELS[self.model]()

    def as_json(self) -> Dict[str, object]:
        return {"model": self.model, "dtype": self.dtype, "seq": list(self.seqs),
                "batch": list(self.batches), "cases": list(self.cases), "quick": self.quick,
                "seed": self.seed, "argv": list(self.argv)}


_OP_NAMES = ("attention", "layer_norm", "bias_gelu", "span_boundary_head", "linear_cross_entropy")


@dataclass
class RunContext:
    """What a case builder sees. ``inputs_per_row``: how many inputs each row rotates
    through; ``triton_ops``: ops whose Triton kernel can run on this device."""

    settings: SuiteSettings
    device: torch.device
    dtype: torch.dtype
    config: SpanBertConfig
    inputs_per_row: int
    triton_ops: FrozenSet[str]
    started: datetime.datetime

    @classmethod
    def create(cls, settings: SuiteSettings) -> "RunContext":
        return cls(settings=settings, device=settings.device, dtype=settings.torch_dtype,
                   config=settings.model_config(),
                   # Three inputs make every timed call miss the cache on the previous
                   # call's data; more only costs memory for the big cases.
                   inputs_per_row=3,
                   triton_ops=frozenset(triton_ops_available(settings.device)),
                   started=datetime.datetime.now())

    @property
    def on_cuda(self) -> bool:
        return self.device.type == "cuda"

    def inputs_for(self, bytes_per_input: float) -> int:
        """How many inputs a row rotates through: on CPU enough to fill twice the
        last-level cache (so a memory-bound op reads from DRAM, as it would inside the
        model), 3..64; on CUDA ``inputs_per_row`` (do_bench flushes L2 before each call)."""
        if self.on_cuda:
            return self.inputs_per_row
        wanted = math.ceil(2 * last_level_cache_bytes() / max(1.0, float(bytes_per_input)))
        return int(min(64, max(self.inputs_per_row, wanted)))

    def generator(self, *key: object) -> torch.Generator:
        """A CPU generator seeded from the run seed and ``key`` (e.g. the case name and
        shape label; a stable CRC, not Python's per-process salted ``hash``). Inputs are
        drawn on the CPU and moved, so every device gets the same numbers."""
        salt = zlib.crc32("/".join(str(k) for k in key).encode())
        gen = torch.Generator()
        gen.manual_seed(self.settings.seed * 1_000_003 + salt)
        return gen

    def triton_reason(self, op: str) -> Optional[str]:
        """None when the Triton kernel for ``op`` runs here, else why not."""
        if op in self.triton_ops:
            return None
        if not self.on_cuda:
            return "CPU run: Triton kernels need CUDA (the suite never uses the interpreter)"
        return _triton_unavailable_reason(op, self.device)


def _triton_unavailable_reason(op: str, device: torch.device) -> str:
    probe = torch.empty(1, device=device)
    try:
        ops.resolve_backend("triton", op, [probe])
    except ops.BackendUnavailableError as err:
        lines = [line.strip(" -") for line in str(err).splitlines()[1:] if line.strip().startswith("-")]
        return "; ".join(lines) or str(err)
    return "unavailable"


def triton_ops_available(device: torch.device) -> List[str]:
    """Ops whose Triton backend can run on ``device`` (always empty off CUDA: the suite
    never uses the interpreter)."""
    if device.type != "cuda":
        return []
    probe = torch.empty(1, device=device)
    found = []
    for op in _OP_NAMES:
        try:
            if ops.resolve_backend("triton", op, [probe]) == "triton":
                found.append(op)
        except ops.BackendUnavailableError:
            pass
    return found
