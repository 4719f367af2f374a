"""The build: package layout, the compiled extension, its fallback and its CUDA sources.

This machine kind is CI's: the extension must be built here (``make setup`` builds it), so
a missing extension fails these tests unless SPANBERT_FAST_SKIP_EXTENSION=1 says it was
skipped on purpose.
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import spanbert_fast
from spanbert_fast import _C, masking

REPO_ROOT = Path(__file__).resolve().parents[2]
VOCAB_SIZE = 28996  # SpanBERT's cased WordPiece vocabulary
SEQ_LENGTHS = (1, 7, 127, 513)


def _skip_reason() -> str | None:
    for variable in (_C.SKIP_ENV, _C.DISABLE_ENV):
        if os.environ.get(variable) == "1":
            return f"{variable}=1: the compiled extension is not used in this run"
    return None


@pytest.fixture
def native_word_starts():
    """torch.ops.spanbert_fast.word_starts; fails (not skips) when the extension is missing."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    assert _C.extension_available(), (
        "the compiled extension should be built on this machine (make setup builds it): "
        f"{_C.extension_load_error()}"
    )
    return torch.ops.spanbert_fast.word_starts


def _random_inputs(batch, seq, seed, vocab_size=VOCAB_SIZE, mask_dtype=torch.bool):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (batch, seq), generator=generator)
    # About a third of a WordPiece vocabulary are ## continuations.
    is_continuation = torch.rand(vocab_size, generator=generator) < 0.3
    lengths = torch.randint(0, seq + 1, (batch,), generator=generator)
    attention_mask = (torch.arange(seq)[None, :] < lengths[:, None]).to(mask_dtype)
    return input_ids, is_continuation, attention_mask


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    child_env = {k: v for k, v in os.environ.items() if k not in (_C.SKIP_ENV, _C.DISABLE_ENV)}
    child_env.update(env)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, env=child_env, cwd=REPO_ROOT.parent, timeout=120,
    )


# --------------------------------------------------------------------------- layout


def test_package_and_kernels_import_from_outside_the_repo():
    result = _run_python(
        """
        import spanbert_fast, spanbert_fast.kernels
        print(spanbert_fast.__version__, spanbert_fast.kernels.__file__)
        """
    )
    assert result.returncode == 0, result.stderr
    version, kernels_file = result.stdout.split()
    assert version == spanbert_fast.__version__
    assert Path(kernels_file) == REPO_ROOT / "kernels" / "__init__.py"


def test_extension_is_built_and_loadable(native_word_starts):
    extension = _C.load_extension()
    assert extension.__name__ == _C.EXTENSION_MODULE
    assert extension.built_with_torch == _C._macro_token(torch.__version__)
    assert _C.extension_load_error() is None
    assert torch.ops.spanbert_fast.word_starts.default is not None


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("seq", SEQ_LENGTHS)
@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, None])
def test_native_matches_torch_fallback(native_word_starts, batch, seq, mask_dtype):
    input_ids, is_continuation, attention_mask = _random_inputs(
        batch, seq, seed=1000 * batch + seq, mask_dtype=mask_dtype or torch.bool
    )
    if mask_dtype is None:
        attention_mask = None
    expected = masking.sampler._word_starts_torch(input_ids, is_continuation, attention_mask)
    native = native_word_starts(input_ids, is_continuation, attention_mask)
    public = masking.word_starts(input_ids, is_continuation, attention_mask)
    for name, got in (("native op", native), ("masking.word_starts", public)):
        assert got.dtype == torch.bool and got.shape == input_ids.shape and got.is_contiguous()
        mismatches = (got != expected).nonzero()
        assert mismatches.numel() == 0, (
            f"{name}: {len(mismatches)} of {expected.numel()} positions differ from the torch "
            f"fallback, first at {tuple(mismatches[0].tolist())}"
        )


def test_all_padding_rows_and_continuations(native_word_starts):
    input_ids, is_continuation, attention_mask = _random_inputs(4, 127, seed=7)
    attention_mask[1] = False  # a row that is all padding
    attention_mask[3] = True
    is_continuation[input_ids[3, :10]] = True  # a row that opens with continuations
    native = native_word_starts(input_ids, is_continuation, attention_mask)
    assert not native[1].any()
    assert not native[3, :10].any()
    assert torch.equal(native, masking.sampler._word_starts_torch(input_ids, is_continuation, attention_mask))


@pytest.mark.parametrize("shape", [(0, 7), (0, 0), (3, 0)])
def test_empty_inputs(native_word_starts, shape):
    input_ids = torch.empty(shape, dtype=torch.int64)
    is_continuation = torch.zeros(5, dtype=torch.bool)
    for mask in (None, torch.ones(shape, dtype=torch.bool)):
        for got in (native_word_starts(input_ids, is_continuation, mask),
                    masking.word_starts(input_ids, is_continuation, mask)):
            assert got.shape == shape and got.dtype == torch.bool


def test_non_contiguous_inputs(native_word_starts):
    input_ids, is_continuation, attention_mask = _random_inputs(16, 64, seed=3)
    ids_t, mask_t = input_ids.t(), attention_mask.t()  # (64, 16), strides (1, 64)
    table = torch.stack([is_continuation, ~is_continuation], dim=1)[:, 0]  # stride 2
    assert not ids_t.is_contiguous() and not table.is_contiguous()
    expected = masking.sampler._word_starts_torch(ids_t, table, mask_t)
    assert torch.equal(native_word_starts(ids_t, table, mask_t), expected)
    assert torch.equal(masking.word_starts(ids_t, table, mask_t), expected)


def test_int32_ids_are_accepted_by_the_python_wrapper():
    input_ids, is_continuation, attention_mask = _random_inputs(2, 7, seed=5)
    expected = masking.sampler._word_starts_torch(input_ids, is_continuation, attention_mask)
    got = masking.word_starts(input_ids.int(), is_continuation, attention_mask)
    assert torch.equal(got, expected)


def test_opcheck(native_word_starts):
    input_ids, is_continuation, attention_mask = _random_inputs(3, 7, seed=11)
    for mask in (attention_mask, None):
        torch.library.opcheck(native_word_starts.default, (input_ids, is_continuation, mask))


# --------------------------------------------------------------------------- bad input


def _good():
    input_ids, is_continuation, attention_mask = _random_inputs(2, 7, seed=13, vocab_size=50)
    return {"input_ids": input_ids, "is_continuation": is_continuation,
            "attention_mask": attention_mask}


def _with(**changes):
    arguments = _good()
    for name, change in changes.items():
        arguments[name] = change(arguments[name])
    return arguments


# (case, arguments, error of the Python wrapper, text both errors contain)
BAD_INPUTS = [
    ("float ids", _with(input_ids=lambda x: x.float()), TypeError, "input_ids"),
    ("int16 ids", _with(input_ids=lambda x: x.short()), TypeError, "input_ids"),
    ("1-D ids", _with(input_ids=lambda x: x[0], attention_mask=lambda m: None), ValueError,
     "input_ids must be 2-D"),
    ("3-D ids", _with(input_ids=lambda x: x[None], attention_mask=lambda m: None), ValueError,
     "input_ids must be 2-D"),
    ("id too large", _with(input_ids=lambda x: x.index_fill(1, torch.tensor([3]), 50)),
     ValueError, "input_ids must be in [0, 50)"),
    ("negative id", _with(input_ids=lambda x: x.index_fill(1, torch.tensor([6]), -1)),
     ValueError, "input_ids must be in [0, 50)"),
    ("int table", _with(is_continuation=lambda t: t.long()), TypeError, "is_continuation"),
    ("2-D table", _with(is_continuation=lambda t: t[None]), ValueError,
     "is_continuation must be 1-D"),
    ("mask shape", _with(attention_mask=lambda m: m[:, :-1]), ValueError,
     "attention_mask must have the shape of input_ids"),
    ("float mask", _with(attention_mask=lambda m: m.float()), TypeError, "attention_mask"),
]


@pytest.mark.parametrize("case, arguments, error, text", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_python_wrapper(case, arguments, error, text):
    with pytest.raises(error, match=re.escape(text)):
        masking.word_starts(**arguments)


@pytest.mark.parametrize("case, arguments, error, text", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_native_op(native_word_starts, case, arguments, error, text):
    """The op's own errors are typed (TORCH_CHECK_TYPE / TORCH_CHECK_VALUE): the wrapper's
    TypeError or ValueError, through the dispatcher, with no C++ backtrace in the text."""
    if case == "int16 ids":
        text = "input_ids must be int64"
    with pytest.raises(error, match=re.escape(text)) as caught:
        native_word_starts(arguments["input_ids"], arguments["is_continuation"],
                           arguments["attention_mask"])
    assert "Exception raised from" not in str(caught.value)


def test_bad_input_names_the_position():
    arguments = _with(input_ids=lambda x: x.index_put((torch.tensor([1]), torch.tensor([4])),
                                                      torch.tensor(99)))
    with pytest.raises(ValueError, match=r"got 99 at position \(1, 4\)") as from_python:
        masking.word_starts(**arguments)
    if _C.extension_available():
        # The op's message is the wrapper's, word for word (the op raises it alone while
        # torch.compile traces the wrapper, which then skips its own check).
        with pytest.raises(ValueError) as from_op:
            torch.ops.spanbert_fast.word_starts(*arguments.values())
        assert str(from_op.value) == str(from_python.value)


def test_bad_input_not_tensors_and_devices():
    arguments = _good()
    with pytest.raises(TypeError, match="input_ids must be a torch.Tensor, got list"):
        masking.word_starts(arguments["input_ids"].tolist(), arguments["is_continuation"])
    with pytest.raises(TypeError, match="attention_mask must be a torch.Tensor or None"):
        masking.word_starts(arguments["input_ids"], arguments["is_continuation"], [[1]])
    with pytest.raises(ValueError, match="is_continuation must be on the device of input_ids"):
        masking.word_starts(arguments["input_ids"], arguments["is_continuation"].to("meta"))
    with pytest.raises(ValueError, match="attention_mask must be on the device of input_ids"):
        masking.word_starts(arguments["input_ids"], arguments["is_continuation"],
                            arguments["attention_mask"].to("meta"))


@pytest.mark.gpu
def test_native_op_cuda_matches_and_checks_devices(native_word_starts):
    if not _C.load_extension().with_cuda:
        pytest.fail("this extension was built without CUDA kernels on a machine with a GPU")
    input_ids, is_continuation, attention_mask = _random_inputs(8, 513, seed=17)
    expected = masking.sampler._word_starts_torch(input_ids, is_continuation, attention_mask)
    got = native_word_starts(input_ids.cuda(), is_continuation.cuda(), attention_mask.cuda())
    assert torch.equal(got.cpu(), expected)
    with pytest.raises(ValueError, match="is_continuation must be on the device of input_ids"):
        native_word_starts(input_ids.cuda(), is_continuation, None)
    with pytest.raises(ValueError, match=r"input_ids must be in \[0, 28996\)"):
        native_word_starts((input_ids + VOCAB_SIZE).cuda(), is_continuation.cuda(), None)


# --------------------------------------------------------------------------- setup.py


def _load_setup_py():
    """setup.py as a module, for its functions: it builds nothing unless run as __main__, and
    setuptools.setup is stubbed out so that loading it installs nothing either."""
    import importlib.util
    from unittest import mock

    spec = importlib.util.spec_from_file_location("spanbert_fast_setup_py", REPO_ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    with mock.patch("setuptools.setup", lambda **kwargs: None):
        spec.loader.exec_module(module)
    return module


def _executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def _fake_toolkit(root: Path, archs=("80", "90", "100"), headers=True) -> Path:
    """A CUDA toolkit root as setup.py sees it: bin/nvcc (which lists `archs`) and, with
    `headers`, include/cuda_runtime.h."""
    listing = "\\n".join(f"compute_{arch}" for arch in archs)
    _executable(root / "bin" / "nvcc", f'#!/bin/sh\nprintf "{listing}\\n"\n')
    if headers:
        (root / "include").mkdir(parents=True)
        (root / "include" / "cuda_runtime.h").write_text("#pragma once\n")
    return root


@pytest.fixture
def cuda_machine(tmp_path, monkeypatch):
    """A machine like CI's, in tmp_path: `nvcc` on PATH is a wrapper script in
    <tmp>/local/bin that execs <tmp>/cuda-13.0/bin/nvcc (torch guesses <tmp>/local, which
    holds no headers); no CUDA_HOME, no TORCH_CUDA_ARCH_LIST, no GPU, and torch looks like a
    CUDA build to setup.py. Everything setup.py changes is restored afterwards."""
    from torch.utils import cpp_extension

    setup_py = _load_setup_py()
    toolkit = _fake_toolkit(tmp_path / "cuda-13.0")
    wrapper = _executable(tmp_path / "local" / "bin" / "nvcc",
                          f'#!/bin/sh\nexec {toolkit}/bin/nvcc "$@"\n')
    for variable in ("CUDA_HOME", "CUDA_PATH", "TORCH_CUDA_ARCH_LIST", "SPANBERT_FAST_BUILD_CUDA",
                     "SPANBERT_FAST_SKIP_EXTENSION", "MAX_JOBS"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("PATH", f"{wrapper.parent}{os.pathsep}/usr/bin{os.pathsep}/bin")
    monkeypatch.setattr(setup_py, "CUDA_INSTALL_PREFIX", str(tmp_path / "no-default-install"))
    monkeypatch.setattr(setup_py, "gpus_visible", lambda torch: False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path / "local"))
    monkeypatch.chdir(REPO_ROOT)  # setup.py globs csrc/ relative to the working directory
    return setup_py, toolkit, wrapper


def test_setup_finds_the_toolkit_behind_a_wrapper_nvcc(cuda_machine, tmp_path):
    setup_py, toolkit, wrapper = cuda_machine
    assert setup_py.nvcc_wrapper_targets(str(wrapper)) == [str(toolkit / "bin" / "nvcc")]
    root, rejected = setup_py.find_cuda_toolkit(str(tmp_path / "local"))
    assert root == str(toolkit)
    assert rejected == [f"torch's CUDA_HOME guess: {tmp_path / 'local'} has no "
                        "include/cuda_runtime.h"]


def test_setup_toolkit_search_order(cuda_machine, tmp_path, monkeypatch, capsys):
    setup_py, toolkit, _ = cuda_machine
    # A symlinked nvcc: the folder above its real path.
    linked = _fake_toolkit(tmp_path / "opt" / "cuda-12.8")
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "nvcc").symlink_to(linked / "bin" / "nvcc")
    monkeypatch.setenv("PATH", str(tmp_path / "links"))
    assert setup_py.find_cuda_toolkit(None) == (str(linked), [])
    # $CUDA_HOME first when it holds a toolkit; skipped, and said so, when it does not.
    explicit = _fake_toolkit(tmp_path / "explicit")
    monkeypatch.setenv("CUDA_HOME", str(explicit))
    assert setup_py.find_cuda_toolkit(None) == (str(explicit), [])
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "missing"))
    missing = f"CUDA_HOME: {tmp_path / 'missing'} has no bin/nvcc or include/cuda_runtime.h"
    assert setup_py.find_cuda_toolkit(None) == (str(linked), [missing])
    setup_py.native_extensions()
    assert f"WARNING: {missing}; using {linked} instead" in capsys.readouterr().err
    # Nothing on PATH: the installers' default places, the newest version first.
    monkeypatch.delenv("CUDA_HOME")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    prefix = tmp_path / "usr-local"
    for version in ("12.8", "13.0", "9.2"):
        _fake_toolkit(prefix / f"cuda-{version}")
    monkeypatch.setattr(setup_py, "CUDA_INSTALL_PREFIX", str(prefix))
    assert setup_py.find_cuda_toolkit(None) == (str(prefix / "cuda-13.0"), [])
    # A binary nvcc names no other nvcc.
    assert setup_py.nvcc_wrapper_targets(sys.executable) == []


def test_setup_default_arch_list():
    setup_py = _load_setup_py()
    assert setup_py.default_cuda_arch_list({"7.5", "8.0", "8.6", "9.0", "10.0", "12.0"}) == \
        "8.0;9.0;10.0+PTX"
    assert setup_py.default_cuda_arch_list({"7.5", "8.0", "9.0"}) == "8.0;9.0+PTX"
    assert setup_py.default_cuda_arch_list(None) == "8.0;9.0+PTX"  # nvcc cannot list them
    assert setup_py.default_cuda_arch_list({"12.0"}) is None


def test_setup_builds_cuda_with_the_found_toolkit_and_default_archs(cuda_machine, capsys):
    """CI's machine (a wrapper nvcc, no GPU, nothing set): before, torch's build got
    CUDA_HOME=/usr/local (no cuda_runtime.h) and no architectures (IndexError in torch 2.11)."""
    from torch.utils import cpp_extension

    setup_py, toolkit, _ = cuda_machine
    (extension,), cmdclass = setup_py.native_extensions()
    assert any(source.endswith(".cu") for source in extension.sources)
    assert "-DSBF_WITH_CUDA" in extension.extra_compile_args["cxx"]
    assert os.environ["CUDA_HOME"] == cpp_extension.CUDA_HOME == str(toolkit)
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0;10.0+PTX"
    out = capsys.readouterr().out
    assert f"CUDA_HOME={toolkit}" in out
    assert "no GPU is visible, so the default TORCH_CUDA_ARCH_LIST=8.0;9.0;10.0+PTX" in out


def test_setup_keeps_a_given_arch_list(cuda_machine, monkeypatch):
    setup_py, _, _ = cuda_machine
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    setup_py.native_extensions()
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "9.0"


def test_setup_without_cuda_headers_falls_back_or_fails(cuda_machine, tmp_path, monkeypatch,
                                                        capsys):
    setup_py, _, _ = cuda_machine
    headless = _fake_toolkit(tmp_path / "nvcc-only", headers=False)
    _executable(tmp_path / "local" / "bin" / "nvcc", f'#!/bin/sh\nexec {headless}/bin/nvcc "$@"\n')
    # auto: the CPU operators, and a warning that says why.
    (extension,), _ = setup_py.native_extensions()
    assert not any(source.endswith(".cu") for source in extension.sources)
    assert "-DSBF_WITH_CUDA" not in extension.extra_compile_args["cxx"]
    err = capsys.readouterr().err
    assert "WARNING" in err and "CUDA kernels are not built" in err
    assert f"{headless} has no include/cuda_runtime.h" in err and "set CUDA_HOME" in err
    # 1: an error that says the same.
    monkeypatch.setenv("SPANBERT_FAST_BUILD_CUDA", "1")
    with pytest.raises(SystemExit, match="SPANBERT_FAST_BUILD_CUDA=1 but the CUDA kernels cannot "
                                         r"be built: no CUDA toolkit was found .*set CUDA_HOME"):
        setup_py.native_extensions()


def test_setup_without_a_buildable_default_arch_fails_under_1(cuda_machine, tmp_path,
                                                              monkeypatch):
    setup_py, toolkit, _ = cuda_machine
    _fake_toolkit(toolkit, archs=("120",), headers=False)  # an nvcc for sm_120 only
    monkeypatch.setenv("SPANBERT_FAST_BUILD_CUDA", "1")
    with pytest.raises(SystemExit, match=r"no GPU is visible and TORCH_CUDA_ARCH_LIST is unset.*"
                                         r"set TORCH_CUDA_ARCH_LIST"):
        setup_py.native_extensions()


# --------------------------------------------------------------------------- fallback


_FALLBACK_SCRIPT = """
    import json, warnings
    import torch
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        import spanbert_fast
        import spanbert_fast.masking
        from spanbert_fast import _C
        {prepare}
        ids = torch.tensor([[5, 3, 9, 0], [1, 2, 3, 4]])
        table = torch.tensor([False, False, True, True, False, False, False, False, False, True])
        mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
        first = spanbert_fast.masking.word_starts(ids, table, mask)
        second = spanbert_fast.masking.word_starts(ids, table)
        available = _C.extension_available()
    print(json.dumps({{
        "available": available,
        "first": first.tolist(),
        "second": second.tolist(),
        "warnings": [str(w.message) for w in caught if issubclass(w.category, UserWarning)
                     and "spanbert_fast" in str(w.message)],
    }}))
"""
_FALLBACK_EXPECTED_FIRST = [[True, False, False, False], [True, False, False, True]]
_FALLBACK_EXPECTED_SECOND = [[True, False, False, True], [True, False, False, True]]


def _run_fallback(prepare: str = "", **env: str) -> dict:
    result = _run_python(_FALLBACK_SCRIPT.format(prepare=prepare), **env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["first"] == _FALLBACK_EXPECTED_FIRST
    assert report["second"] == _FALLBACK_EXPECTED_SECOND
    return report


def test_disabled_extension_falls_back_and_warns_once():
    report = _run_fallback(SPANBERT_FAST_DISABLE_EXTENSION="1")
    assert not report["available"]
    assert len(report["warnings"]) == 1, report["warnings"]
    assert "SPANBERT_FAST_DISABLE_EXTENSION=1" in report["warnings"][0]


def test_missing_extension_falls_back_and_says_how_to_fix():
    report = _run_fallback(prepare='_C.EXTENSION_MODULE = "spanbert_fast._not_built"')
    assert not report["available"]
    assert len(report["warnings"]) == 1, report["warnings"]
    message = report["warnings"][0]
    assert "is not built" in message
    assert "pip install -e . --no-build-isolation" in message
    assert "SPANBERT_FAST_SKIP_EXTENSION=1" in message


def test_extension_built_for_another_torch_says_which(tmp_path):
    # Not a loadable library, but it carries the build record that _C.py looks for.
    package = tmp_path / "sbf_fake_build"
    package.mkdir()
    (package / "__init__.py").write_text("")
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    (package / f"_native{suffix}").write_bytes(b"\x00junk spanbert_fast-build: torch=1.2.3 cuda=none;")
    prepare = f'import sys; sys.path.insert(0, {str(tmp_path)!r}); ' \
              '_C.EXTENSION_MODULE = "sbf_fake_build._native"'
    report = _run_fallback(prepare=prepare)
    assert len(report["warnings"]) == 1, report["warnings"]
    message = report["warnings"][0]
    assert "could not be loaded" in message and "ImportError" in message
    assert f"built for torch 1.2.3, this process runs torch {torch.__version__}" in message
    assert "pip install -e . --no-build-isolation" in message


def test_skip_variable_silences_a_missing_extension():
    report = _run_fallback(prepare='_C.EXTENSION_MODULE = "spanbert_fast._not_built"',
                           SPANBERT_FAST_SKIP_EXTENSION="1")
    assert not report["available"]
    assert report["warnings"] == []


# --------------------------------------------------------------------------- namespace


_COEXIST_SCRIPT = """
    import torch
    from spanbert_fast import _C

    def define_python_op():
        @torch.library.custom_op("spanbert_fast::build_test_dummy", mutates_args=())
        def dummy(x: torch.Tensor) -> torch.Tensor:
            return x * 2

        @dummy.register_fake
        def _(x):
            return torch.empty_like(x)

    steps = {steps}
    for step in steps:
        if step == "python":
            import spanbert_fast.ops  # the project's own Python-registered ops
            define_python_op()
        else:
            assert _C.extension_available(), _C.extension_load_error()
    ids = torch.tensor([[1, 2]])
    table = torch.tensor([False, True, False])
    assert torch.ops.spanbert_fast.word_starts(ids, table).tolist() == [[False, True]]
    assert torch.ops.spanbert_fast.build_test_dummy(torch.ones(2)).tolist() == [2.0, 2.0]
    print("ok")
"""


@pytest.mark.parametrize("steps", [["native", "python"], ["python", "native"]])
def test_native_and_python_ops_share_the_namespace(native_word_starts, steps):
    result = _run_python(_COEXIST_SCRIPT.format(steps=steps))
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


# --------------------------------------------------------------------------- torch.compile


@pytest.mark.slow
def test_torch_compile_fullgraph(native_word_starts):
    torch._dynamo.reset()

    def native_then_more(input_ids, is_continuation, attention_mask):
        starts = native_word_starts(input_ids, is_continuation, attention_mask)
        return starts & (input_ids > 100)

    def through_the_wrapper(input_ids, is_continuation, attention_mask):
        return masking.word_starts(input_ids, is_continuation, attention_mask)

    input_ids, is_continuation, attention_mask = _random_inputs(4, 127, seed=19)
    for function in (native_then_more, through_the_wrapper):
        compiled = torch.compile(function, fullgraph=True)
        expected = function(input_ids, is_continuation, attention_mask)
        assert torch.equal(compiled(input_ids, is_continuation, attention_mask), expected)
    # Traced, the wrapper skips its own id check (data-dependent); the op's ValueError is the
    # same, word for word.
    input_ids[2, 50] = VOCAB_SIZE
    with pytest.raises(ValueError) as eager:
        through_the_wrapper(input_ids, is_continuation, attention_mask)
    with pytest.raises(ValueError) as traced:
        compiled(input_ids, is_continuation, attention_mask)
    assert str(traced.value) == str(eager.value)


# --------------------------------------------------------------------------- CUDA sources


CUDA_SOURCES = sorted((REPO_ROOT / "csrc").glob("*.cu"))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=[s.name for s in CUDA_SOURCES])
def test_cuda_source_compiles_alone(source, tmp_path):
    # The same command as .ci/run: no torch headers, so a CPU machine keeps the .cu honest.
    command = ["nvcc", "-c", "-arch=sm_90", "-std=c++17", "-Xcompiler=-g0", "-O3",
               "-I", str(REPO_ROOT / "csrc"), "-o", str(tmp_path / f"{source.stem}.o"),
               str(source)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stderr}"


def _cuda_include_dir():
    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parents[1]))
    for home in candidates:
        if home and (Path(home) / "include" / "cuda_runtime_api.h").is_file():
            return Path(home) / "include"
    return None


CPP_SOURCES = sorted((REPO_ROOT / "csrc").glob("*.cpp"))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None or _cuda_include_dir() is None,
                    reason="needs g++ and the CUDA toolkit's headers")
@pytest.mark.parametrize("source", CPP_SOURCES, ids=[s.name for s in CPP_SOURCES])
def test_cpp_sources_compile_as_in_a_cuda_build(source, tmp_path):
    """The torch-facing CUDA code (extension.cpp's wrappers, span_masking's dispatch to
    them) sits behind SBF_WITH_CUDA, which a CPU build of torch never defines: without
    this check a typo there would only show on a GPU machine's build. A syntax-only
    compile against torch's headers and the CUDA toolkit's; the CPU wheel lacks one
    generated header (c10/cuda/impl/cuda_cmake_macros.h), which an empty stand-in replaces."""
    stub = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    stub.parent.mkdir(parents=True)
    stub.write_text("#pragma once\n")
    from torch.utils.cpp_extension import include_paths
    import sysconfig
    command = ["g++", "-std=c++20", "-fsyntax-only", "-DSBF_WITH_CUDA", "-I", str(REPO_ROOT / "csrc"),
               "-I", str(tmp_path), "-I", str(_cuda_include_dir()),
               "-I", sysconfig.get_paths()["include"]]
    for path in include_paths():
        command += ["-I", path]
    command.append(str(source))
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stderr[-4000:]}"
