"""spanbert_fast: a kernel-optimized SpanBERT encoder for PyTorch.

Drop-in for ``transformers.BertModel`` (same parameter names, inputs and outputs) with
SpanBERT's pretraining heads (masked LM + span-boundary objective) and a QA head. Every
fused computation runs through :mod:`spanbert_fast.ops`, which picks a backend: Triton
kernels on CUDA, the pure-PyTorch reference elsewhere. Importing this package needs
neither triton nor the compiled extension.
"""

from .config import SpanBertConfig
from .modeling import (
    SBO_TARGET_FIELDS,
    SpanBertForPreTraining,
    SpanBertForQuestionAnswering,
    SpanBertModel,
    SpanBertModelOutput,
    SpanBertPreTrainingOutput,
    SpanBertQuestionAnsweringOutput,
)
from . import masking, ops
from .accelerate import AccelerationError, accelerate, is_accelerated
from .masking import SpanMasker, SpanMaskingCollator, SpanMaskingOutput

__version__ = "0.1.0"

__all__ = [
    "SpanBertConfig",
    "SpanBertModel",
    "SpanBertForPreTraining",
    "SpanBertForQuestionAnswering",
    "SpanBertModelOutput",
    "SpanBertPreTrainingOutput",
    "SpanBertQuestionAnsweringOutput",
    "SBO_TARGET_FIELDS",
    "SpanMasker",
    "SpanMaskingCollator",
    "SpanMaskingOutput",
    "ops",
    "masking",
    "accelerate",
    "is_accelerated",
    "AccelerationError",
    "__version__",
]
