"""Test configuration shared by every test file.

Triton kernels run on CPU in the interpreter here; TRITON_INTERPRET must be set before
triton is first imported, which is why it is set at the top of this file.
"""

import os
import sys

import torch  # importing torch does not import triton (checked below)

assert "triton" not in sys.modules, "triton was imported before TRITON_INTERPRET could be set"
if not torch.cuda.is_available():
    # No GPU: run Triton kernels on CPU in the interpreter. With a GPU, the kernels compile
    # for real (set TRITON_INTERPRET=1 yourself to debug them there).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

if os.environ.get("TRITON_INTERPRET") == "1":
    # Import (decorate) every Triton kernel now, in interpreter mode: triton.jit reads
    # TRITON_INTERPRET when a kernel is defined, and a test that unsets it to check the
    # errors without the interpreter must not be the first to import the kernels (every
    # later launch then failed with "0 active drivers", depending on test order).
    from spanbert_fast import ops as _ops  # noqa: E402
    _ops.dispatch.probe_triton()


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """One intra-op thread for a module of tiny-model runs: they gain nothing from two, and
    on a busy 2-core machine two spinning OpenMP threads made the QA overfit test 4x slower
    (46 s vs 12 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
