"""Build script for spanbert_fast: the Python package, Triton kernels and the C++/CUDA extension.

Install (torch must already be installed; it is deliberately not a build requirement,
since an unpinned torch pulls a multi-GB CUDA build):

    pip install -e . --no-build-isolation

Environment flags:

    SPANBERT_FAST_BUILD_CUDA=auto|1|0   auto (default): build the CUDA kernels when torch is a
                                        CUDA build and nvcc is found; 1: require them (fail
                                        with the reason if impossible); 0: CPU operators only.
    SPANBERT_FAST_SKIP_EXTENSION=1      build no native code at all; the package runs on its
                                        pure-torch fallback (and torch is not needed to build).
    MAX_JOBS=N                          parallel compile jobs (read by torch's ninja build).
    TORCH_CUDA_ARCH_LIST="9.0"          CUDA architectures (torch's default: the visible GPUs).

Nothing is downloaded at build time: the GPU machine that builds this has no network.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
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


def find_nvcc(torch_cuda_home: str | None) -> str | None:
    """nvcc where torch's build will look: $CUDA_HOME/$CUDA_PATH, torch's CUDA_HOME, then PATH.

    (A CPU build of torch leaves its CUDA_HOME unset even when nvcc is installed.)
    """
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), torch_cuda_home):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


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

    nvcc = find_nvcc(CUDA_HOME)
    has_nvcc = nvcc is not None
    cuda_missing = []
    if torch.version.cuda is None:
        cuda_missing.append(f"torch {torch.__version__} is a CPU-only build")
    if not has_nvcc:
        cuda_missing.append("nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
    if build_cuda == "1" and cuda_missing:
        raise SystemExit(
            "setup.py: SPANBERT_FAST_BUILD_CUDA=1 but the CUDA kernels cannot be built: "
            + "; ".join(cuda_missing)
            + ". Install a CUDA build of torch and the CUDA toolkit, or use "
            "SPANBERT_FAST_BUILD_CUDA=auto|0."
        )
    with_cuda = build_cuda != "0" and not cuda_missing

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
    print(
        f"spanbert_fast: building {EXTENSION_NAME} against torch {torch.__version__} "
        + (f"with CUDA {torch.version.cuda} kernels ({nvcc})" if with_cuda
           else f"CPU operators only ({'; '.join(cuda_missing) or 'SPANBERT_FAST_BUILD_CUDA=0'})")
    )
    return [extension], {"build_ext": BuildExtension}


ext_modules, cmdclass = native_extensions()

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
    package_data={"spanbert_fast.benchmarks": ["data/*.txt"]},
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
