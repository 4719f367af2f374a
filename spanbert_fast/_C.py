"""Loads the compiled extension ``spanbert_fast._native`` (built from ``csrc/`` by setup.py).

The extension registers native operators under ``torch.ops.spanbert_fast``
(``word_starts``, ``span_masking``, and the test-only ``sample_span_lengths`` and
``philox4x32_10``); their fake (meta) implementations for torch.compile and ``opcheck``
are registered here, when the extension loads. It is optional: when it cannot be loaded
(never built, built against another torch, CUDA libraries missing, or disabled) :func:`load_extension` returns ``None``
after one ``UserWarning`` per process that says why and what to do, and callers use their
pure-torch fallback. Importing ``spanbert_fast`` never fails because of it.

(The compiled module is not named ``spanbert_fast._C``: a shared library of that name next
to this file would shadow it, as Python's importer prefers extension modules to sources.)

Environment:

* ``SPANBERT_FAST_DISABLE_EXTENSION=1``: behave as if the extension were missing (tests).
* ``SPANBERT_FAST_SKIP_EXTENSION=1``: the extension was skipped on purpose at install time;
  a failed load is then silent.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import threading
import warnings
from types import ModuleType

EXTENSION_MODULE = "spanbert_fast._native"
DISABLE_ENV = "SPANBERT_FAST_DISABLE_EXTENSION"
SKIP_ENV = "SPANBERT_FAST_SKIP_EXTENSION"

# Native operators and the fake (meta) implementations that let torch.compile trace them.
NATIVE_OPS = ("spanbert_fast::word_starts", "spanbert_fast::span_masking",
              "spanbert_fast::sample_span_lengths", "spanbert_fast::philox4x32_10")

_lock = threading.Lock()
_attempted = False
_module: ModuleType | None = None
_load_error: str | None = None


def load_extension() -> ModuleType | None:
    """The loaded extension module, or ``None`` (after one warning per process) if unavailable."""
    global _attempted, _module, _load_error
    if _attempted:
        return _module
    with _lock:
        if _attempted:
            return _module
        try:
            _module = _import_extension()
        except _ExtensionUnavailable as exc:
            _load_error = str(exc)
            if exc.warn:
                warnings.warn(_load_error, UserWarning, stacklevel=3)
        _attempted = True
    return _module


def extension_available() -> bool:
    """Whether the compiled extension is loaded (loading it on first call)."""
    return load_extension() is not None


def extension_load_error() -> str | None:
    """Why the extension is unavailable (the text of the warning), or ``None`` if it loaded."""
    load_extension()
    return _load_error


class _ExtensionUnavailable(Exception):
    def __init__(self, message: str, warn: bool = True):
        super().__init__(message)
        self.warn = warn


_FIX = (
    "To fix it, run `pip install -e . --no-build-isolation` in the spanbert_fast repository "
    "(rebuilds the extension against the installed torch), or set "
    f"{SKIP_ENV}=1 to silence this warning and use the torch fallback."
)


def _import_extension() -> ModuleType:
    if os.environ.get(DISABLE_ENV, "") == "1":
        raise _ExtensionUnavailable(
            f"spanbert_fast: the compiled extension was disabled by {DISABLE_ENV}=1; "
            "native operators fall back to their pure-torch implementations (slower). "
            f"Unset {DISABLE_ENV} to use the extension."
        )
    quiet = os.environ.get(SKIP_ENV, "") == "1"
    import torch  # the extension links against libtorch: load torch's libraries first

    try:
        spec = importlib.util.find_spec(EXTENSION_MODULE)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise _ExtensionUnavailable(
            f"spanbert_fast: the compiled extension {EXTENSION_MODULE} is not built; native "
            "operators fall back to their pure-torch implementations (slower). " + _FIX,
            warn=not quiet,
        )
    try:
        module = importlib.import_module(EXTENSION_MODULE)
    except Exception as exc:  # ImportError / OSError: ABI mismatch, missing CUDA libraries, ...
        built_for = _built_with_torch(spec.origin)
        mismatch = (
            f"it was built for torch {built_for}, this process runs torch {torch.__version__}"
            if built_for
            else f"this process runs torch {torch.__version__}"
        )
        raise _ExtensionUnavailable(
            f"spanbert_fast: the compiled extension {spec.origin} could not be loaded "
            f"({type(exc).__name__}: {exc}); {mismatch}. Native operators fall back to their "
            "pure-torch implementations (slower). " + _FIX,
            warn=not quiet,
        ) from exc
    if module.built_with_torch != _macro_token(torch.__version__):
        raise _ExtensionUnavailable(
            f"spanbert_fast: the compiled extension {spec.origin} was built for torch "
            f"{module.built_with_torch}, this process runs torch {torch.__version__}; not "
            "using it (a C++ ABI mismatch can crash). Native operators fall back to their "
            "pure-torch implementations (slower). " + _FIX,
            warn=not quiet,
        )
    _register_fakes()
    return module


def _macro_token(text: str) -> str:
    # The same reduction setup.py applies before passing the version to the compiler.
    return re.sub(r"[^A-Za-z0-9.+_-]", "_", text) or "unknown"


def _built_with_torch(path: str | None) -> str | None:
    """The torch version recorded in the shared library (csrc/python_module.cpp), if readable."""
    if not path:
        return None
    try:
        with open(path, "rb") as handle:
            match = re.search(rb"spanbert_fast-build: torch=([^ ;\x00]+)", handle.read())
    except OSError:
        return None
    return match.group(1).decode("ascii", "replace") if match else None


def load_native_ops():
    """``torch.ops.spanbert_fast`` with every native op's fake implementation registered,
    or None when the extension is unavailable. Lazy: importing this module loads nothing."""
    if load_extension() is None:
        return None
    import torch

    return torch.ops.spanbert_fast


def _register_fakes() -> None:
    """Fake (meta) implementations of every native op (torch.compile, opcheck)."""
    import torch

    def word_starts_fake(input_ids, is_continuation, attention_mask=None):
        # Same output metadata as the native op: a new contiguous bool tensor.
        return input_ids.new_empty(input_ids.shape, dtype=torch.bool)

    def span_masking_fake(input_ids, token_flags, attention_mask, word_starts, offsets,
                          unigram_cdf, seed, mask_token_id, mask_ratio_numerator,
                          mask_ratio_denominator, span_word_thresholds, mask_threshold,
                          random_threshold, max_span_len, sbo_special_boundaries=False):
        # Device checks like the native op's (a tensor on "meta" among CPU ones lands here).
        for name, tensor in (("token_flags", token_flags), ("attention_mask", attention_mask),
                             ("word_starts", word_starts), ("offsets", offsets),
                             ("unigram_cdf", unigram_cdf)):
            if tensor is not None and tensor.device != input_ids.device:
                raise ValueError(f"span_masking: {name} must be on the device of input_ids "
                                 f"({input_ids.device}), got {tensor.device}")
        # The number of SBO targets depends on the data: an unbacked size.
        num_targets = torch.library.get_ctx().new_dynamic_size()
        return (input_ids.new_empty(input_ids.shape, dtype=torch.int64),
                input_ids.new_empty(input_ids.shape, dtype=torch.int64),
                input_ids.new_empty((num_targets, 5), dtype=torch.int64))

    def sample_span_lengths_fake(seed, offsets, count, span_word_thresholds):
        return offsets.new_empty((offsets.shape[0], count), dtype=torch.int64)

    def philox_fake(counter, key):
        return counter.new_empty((counter.shape[0], 4), dtype=torch.int64)

    fakes = {"spanbert_fast::word_starts": word_starts_fake,
             "spanbert_fast::span_masking": span_masking_fake,
             "spanbert_fast::sample_span_lengths": sample_span_lengths_fake,
             "spanbert_fast::philox4x32_10": philox_fake}
    for name in NATIVE_OPS:
        try:
            torch.library.register_fake(name, fakes[name])
        except RuntimeError as exc:  # this module was reloaded: the fake is already there
            if "already" not in str(exc):
                raise
