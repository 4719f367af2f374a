"""Build script for spanbert_fast: the Python package, Triton kernels and the C++/CUDA extension.

Install (torch must already be installed; it is deliberately not a build requirement,
since an unpinned torch pulls a multi-GB CUDA build):

    pip install -e . --no-build-isolation

Environment flags:

    SPANBERT_FAST_BUILD_CUDA=auto|1|0   auto (default): build the CUDA kernels when torch is a
                                        CUDA build and a CUDA toolkit is found (else the CPU
                                        operators, with a warning saying why); 1: require
                                        them (fail with the reason if impossible); 0: CPU
                                        operators only.
    SPANBERT_FAST_SKIP_EXTENSION=1      build no native code at all; the package runs on its
                                        pure-torch fallback (and torch is not needed to build).
    MAX_JOBS=N                          parallel compile jobs (read by torch's ninja build).
    TORCH_CUDA_ARCH_LIST="9.0"          CUDA architectures (default: the visible GPUs; with
                                        none visible, DEFAULT_CUDA_ARCHS below).
    CUDA_HOME=/usr/local/cuda-13.0      the CUDA toolkit (default: the first place that holds
                                        bin/nvcc and include/cuda_runtime.h, see
                                        cuda_toolkit_candidates).

Nothing is downloaded at build time: the GPU machine that builds this has no network.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
EXTENSION_NAME = "spanbert_fast._native"

INSTALL_TORCH_HINT = (
    "install torch first (on a CPU-only machine: `pip install torch==2.13.0`, or "
    "`pip install -r requirements-cpu.txt`), then install this package with "
    "`pip install -e . --no-build-isolation` so that the build sees that torch "
    "(pip's default build isolation hides it). To install without the native extension, "
    "set SPANBERT_FAST_SKIP_EXTENSION=1."
)


def read_version() -> str:
    with open(os.path.join(ROOT, "spanbert_fast", "__init__.py"), encoding="utf-8") as handle:
        match = re.search(r'^__version__\s*=\s*["\']([^"\']+)["\']', handle.read(), re.M)
    if match is None:
        raise SystemExit("setup.py: no __version__ = '...' line in spanbert_fast/__init__.py")
    return match.group(1)


def env_choice(name: str, default: str, allowed: tuple[str, ...]) -> str:
    value = os.environ.get(name, "").strip().lower() or default
    if value not in allowed:
        raise SystemExit(f"setup.py: {name} must be one of {'|'.join(allowed)}, got {value!r}")
    return value


def macro_token(text: str) -> str:
    """`text` reduced to characters that pass through -D unquoted (see csrc/python_module.cpp)."""
    return re.sub(r"[^A-Za-z0-9.+_-]", "_", text) or "unknown"


def put_venv_bin_on_path() -> None:
    # pip run as .venv/bin/pip without activating the venv leaves .venv/bin (where the
    # `ninja` wheel puts its binary) off PATH; torch then falls back to a serial build.
    bin_dir = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if os.path.exists(os.path.join(bin_dir, "ninja")) and bin_dir not in path.split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + path


# With no GPU visible and TORCH_CUDA_ARCH_LIST unset, torch has nothing to derive the
# architectures from (torch 2.11 then fails with an IndexError), so this list is used:
# Ampere (A100) and Hopper (H100/H200), plus Blackwell (B200) when nvcc can build for it,
# and the newest one's PTX for GPUs after those. Each architecture adds only a device-code
# pass of the two .cu files: the whole build with all three took 20-24 s on 2 cores.
DEFAULT_CUDA_ARCHS = ("8.0", "9.0", "10.0")
# Where the CUDA installers put the toolkit: <prefix>/cuda (usually a link) and
# <prefix>/cuda-<version>.
CUDA_INSTALL_PREFIX = "/usr/local"


def is_cuda_toolkit_root(path: str | None) -> bool:
    """True when `path` holds a usable toolkit: an executable bin/nvcc and
    include/cuda_runtime.h (torch's build takes both from CUDA_HOME)."""
    return bool(path) and (
        os.path.isfile(os.path.join(path, "include", "cuda_runtime.h"))
        and os.access(os.path.join(path, "bin", "nvcc"), os.X_OK)
    )


def nvcc_wrapper_targets(nvcc: str) -> list[str]:
    """The absolute `.../bin/nvcc` paths that a shell-script `nvcc` names (a wrapper such as
    `exec /usr/local/cuda-13.0/bin/nvcc "$@"`); [] for a binary or an unreadable file."""
    try:
        with open(nvcc, "rb") as handle:
            head = handle.read(65536)
    except OSError:
        return []
    if not head.startswith(b"#!"):
        return []
    text = head.decode("utf-8", "replace")
    return re.findall(r"(/[^\s'\"`;|&<>()$]*/bin/nvcc)(?![\w.-])", text)


def _version_key(path: str) -> list[int]:
    return [int(number) for number in re.findall(r"\d+", os.path.basename(path))]


def cuda_toolkit_candidates(torch_cuda_home: str | None) -> list[tuple[str, str]]:
    """(where it came from, path) of every place a CUDA toolkit root may be, best first:
    $CUDA_HOME, $CUDA_PATH, torch's guess, the folder above the real nvcc on PATH and above
    what a wrapper script nvcc runs, /usr/local/cuda, then /usr/local/cuda-* newest first
    (CUDA_INSTALL_PREFIX).

    (torch guesses the folder above the first nvcc on PATH; for a wrapper script in
    /usr/local/bin that is /usr/local, which holds no CUDA headers.)
    """
    candidates = []
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(variable):
            candidates.append((variable, os.environ[variable]))
    if torch_cuda_home:
        candidates.append(("torch's CUDA_HOME guess", torch_cuda_home))
    nvcc = shutil.which("nvcc")
    if nvcc:
        real_nvcc = os.path.realpath(nvcc)
        candidates.append((f"nvcc on PATH ({real_nvcc})",
                           os.path.dirname(os.path.dirname(real_nvcc))))
        for target in nvcc_wrapper_targets(real_nvcc):
            real_target = os.path.realpath(target)
            candidates.append((f"what {nvcc} runs ({target})",
                               os.path.dirname(os.path.dirname(real_target))))
    default_root = os.path.join(CUDA_INSTALL_PREFIX, "cuda")
    candidates.append((default_root, default_root))
    for root in sorted(glob.glob(default_root + "-*"), key=_version_key, reverse=True):
        candidates.append((root, root))
    return candidates


def find_cuda_toolkit(torch_cuda_home: str | None) -> tuple[str | None, list[str]]:
    """The first candidate (see cuda_toolkit_candidates) that really holds a toolkit, and a
    note on each candidate rejected before it (or on all of them, when none holds one)."""
    rejected: list[str] = []
    seen: set[str] = set()
    for origin, path in cuda_toolkit_candidates(torch_cuda_home):
        root = os.path.realpath(path)
        if root in seen:
            continue
        seen.add(root)
        if is_cuda_toolkit_root(root):
            return path, rejected
        if os.path.exists(path) or origin in ("CUDA_HOME", "CUDA_PATH"):
            missing = [name for name in ("bin/nvcc", "include/cuda_runtime.h")
                       if not os.path.exists(os.path.join(root, name))]
            rejected.append(f"{origin}: {path} has no {' or '.join(missing)}")
    return None, rejected


def nvcc_gpu_archs(nvcc: str) -> set[str] | None:
    """The compute capabilities ("9.0", "10.0", ...) that `nvcc --list-gpu-arch` lists, or
    None when nvcc cannot say (older than CUDA 11)."""
    try:
        result = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True,
                                timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        return None
    archs = {f"{major}.{minor}"
             for major, minor in re.findall(r"\bcompute_(\d+)(\d)\b", result.stdout)}
    return archs or None


def default_cuda_arch_list(supported: set[str] | None) -> str | None:
    """TORCH_CUDA_ARCH_LIST for a build that sees no GPU: DEFAULT_CUDA_ARCHS that nvcc
    supports (8.0 and 9.0 only, when nvcc cannot list them), the newest with +PTX; None
    when nvcc supports none of them."""
    if supported is None:
        archs = [arch for arch in DEFAULT_CUDA_ARCHS if arch in ("8.0", "9.0")]
    else:
        archs = [arch for arch in DEFAULT_CUDA_ARCHS if arch in supported]
    if not archs:
        return None
    return ";".join(archs[:-1] + [archs[-1] + "+PTX"])


def gpus_visible(torch) -> bool:
    """Whether torch sees a GPU, whose architecture torch's build then targets itself."""
    try:
        return torch.cuda.device_count() > 0
    except Exception:  # a driver that fails to initialise sees no GPU either
        return False


def native_extensions() -> tuple[list, dict]:
    """The extension modules to build and the cmdclass that builds them."""
    if env_choice("SPANBERT_FAST_SKIP_EXTENSION", "0", ("0", "1")) == "1":
        print("spanbert_fast: SPANBERT_FAST_SKIP_EXTENSION=1, building no native extension "
              "(the package will use its torch fallback)")
        return [], {}
    build_cuda = env_choice("SPANBERT_FAST_BUILD_CUDA", "auto", ("auto", "1", "0"))
    max_jobs = os.environ.get("MAX_JOBS")
    if max_jobs is not None and not (max_jobs.isdigit() and int(max_jobs) > 0):
        raise SystemExit(f"setup.py: MAX_JOBS must be a positive integer, got {max_jobs!r}")

    try:
        import torch
        from torch.utils import cpp_extension
        from torch.utils.cpp_extension import (
            CUDA_HOME,
            BuildExtension,
            CppExtension,
            CUDAExtension,
        )
    except ImportError as exc:
        raise SystemExit(
            f"setup.py: cannot import torch ({exc}); the C++ extension is built against the "
            f"installed torch, so {INSTALL_TORCH_HINT}"
        ) from None

    cuda_missing = []
    if torch.version.cuda is None:
        cuda_missing.append(f"torch {torch.__version__} is a CPU-only build")
    toolkit, rejected, default_archs = None, [], None
    if build_cuda != "0":
        toolkit, rejected = find_cuda_toolkit(CUDA_HOME)
        if toolkit is None:
            cuda_missing.append(
                "no CUDA toolkit was found ("
                + ("; ".join(rejected) or "no nvcc on PATH, CUDA_HOME unset")
                + "): set CUDA_HOME to the folder that holds bin/nvcc and include/cuda_runtime.h"
            )
        elif (torch.version.cuda is not None
              and not os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
              and not gpus_visible(torch)):
            nvcc = os.path.join(toolkit, "bin", "nvcc")
            default_archs = default_cuda_arch_list(nvcc_gpu_archs(nvcc))
            if default_archs is None:
                cuda_missing.append(
                    f"no GPU is visible and TORCH_CUDA_ARCH_LIST is unset, and {nvcc} builds none "
                    f"of {'/'.join(DEFAULT_CUDA_ARCHS)}: set TORCH_CUDA_ARCH_LIST (e.g. \"9.0\")"
                )
    if build_cuda == "1" and cuda_missing:
        raise SystemExit(
            "setup.py: SPANBERT_FAST_BUILD_CUDA=1 but the CUDA kernels cannot be built: "
            + "; ".join(cuda_missing)
            + ". Install a CUDA build of torch and the CUDA toolkit, or use "
            "SPANBERT_FAST_BUILD_CUDA=auto|0."
        )
    with_cuda = build_cuda != "0" and not cuda_missing
    if with_cuda:
        for note in rejected:
            if note.startswith(("CUDA_HOME:", "CUDA_PATH:")):
                print(f"spanbert_fast: WARNING: {note}; using {toolkit} instead", file=sys.stderr)
        # torch's build reads its module-level CUDA_HOME (nvcc, headers, libraries), guessed
        # at import time; replace the guess by the toolkit that holds the headers.
        os.environ["CUDA_HOME"] = toolkit
        cpp_extension.CUDA_HOME = toolkit
        if default_archs is not None:
            os.environ["TORCH_CUDA_ARCH_LIST"] = default_archs
    elif build_cuda == "auto" and torch.version.cuda is not None:
        print(f"spanbert_fast: WARNING: torch {torch.__version__} is a CUDA build, but the CUDA "
              f"kernels are not built ({'; '.join(cuda_missing)}); building the CPU operators "
              "only. SPANBERT_FAST_BUILD_CUDA=1 makes this an error.", file=sys.stderr)

    sources = sorted(glob.glob("csrc/*.cpp"))
    if with_cuda:
        sources += sorted(glob.glob("csrc/*.cu"))
    defines = [
        f"-DSBF_TORCH_VERSION={macro_token(torch.__version__)}",
        f"-DSBF_CUDA_VERSION={macro_token(torch.version.cuda or 'none') if with_cuda else 'none'}",
    ]
    if with_cuda:
        defines.append("-DSBF_WITH_CUDA")
    # No -std here: torch adds the standard its own headers need (C++17 up to some 2.x,
    # C++20 in 2.13). Our sources are C++17 and also valid C++20; the .cu files compile
    # alone with -std=c++17 in .ci/run.
    compile_args = {
        "cxx": ["-O3", "-g0", *defines],
        # nvcc rejects -g0; without -g/-G it emits no debug info, and -g0 goes to the host
        # compiler.
        "nvcc": ["-O3", "-Xcompiler=-g0", *defines],
    }
    extension_class = CUDAExtension if with_cuda else CppExtension
    extension = extension_class(
        name=EXTENSION_NAME,
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args=compile_args if with_cuda else {"cxx": compile_args["cxx"]},
    )
    put_venv_bin_on_path()
    if with_cuda:
        arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
        if default_archs is not None:
            archs = f"no GPU is visible, so the default TORCH_CUDA_ARCH_LIST={default_archs}"
        elif arch_list:
            archs = f"TORCH_CUDA_ARCH_LIST={arch_list}"
        else:
            archs = "the architectures of the visible GPUs"
        skipped = f"; skipped {'; '.join(rejected)}" if rejected else ""
        how = f"with CUDA {torch.version.cuda} kernels (CUDA_HOME={toolkit}{skipped}; {archs})"
    elif build_cuda == "0":
        how = "CPU operators only (SPANBERT_FAST_BUILD_CUDA=0)"
    else:
        how = f"CPU operators only ({'; '.join(cuda_missing)})"
    print(f"spanbert_fast: building {EXTENSION_NAME} against torch {torch.__version__} {how}")
    return [extension], {"build_ext": BuildExtension}


# setuptools and pip run this file as __main__; tests/install/test_build.py loads it for its functions
# (with setuptools.setup stubbed out), which must build nothing.
ext_modules, cmdclass = native_extensions() if __name__ == "__main__" else ([], {})

setup(
    name="spanbert_fast",
    version=read_version(),
    description="A kernel-optimized SpanBERT encoder for PyTorch",
    python_requires=">=3.10",
    # kernels/ and benchmarks/ live at the top of the repo (DESIGN.md) and install inside
    # the package, so `spanbert-fast bench` works from anywhere.
    packages=["spanbert_fast", "spanbert_fast.ops", "spanbert_fast.masking",
              "spanbert_fast.train", "spanbert_fast.kernels", "spanbert_fast.benchmarks",
              "spanbert_fast.benchmarks.cases"],
    package_dir={"spanbert_fast": "spanbert_fast", "spanbert_fast.kernels": "kernels",
                 "spanbert_fast.benchmarks": "benchmarks",
                 "spanbert_fast.benchmarks.cases": "benchmarks/cases"},
    # The real-length cases' WordPiece vocabulary (benchmarks/cases/real_text.py).
    package_data={"spanbert_fast.benchmarks": ["data/*.txt"],
                  # the attention autotuners' per-arch prune table (kernels/attention.py)
                  "spanbert_fast.kernels": ["attention_spills-triton*.json"]},
    entry_points={"console_scripts": ["spanbert-fast = spanbert_fast.train.cli:main"]},
    install_requires=[
        "torch>=2.6",
        "numpy",
        "safetensors",
        "tokenizers",
        "tqdm",
        'triton>=3.6; platform_system=="Linux"',
    ],
    extras_require={"bench": ["matplotlib", "pytest-benchmark"],
                    "test": ["pytest", "pytest-timeout", "transformers"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
