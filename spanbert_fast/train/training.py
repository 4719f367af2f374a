"""Pieces shared by the pretraining and fine-tuning loops: device and precision choice,
seeding, AdamW parameter groups and the learning-rate schedule."""

from __future__ import annotations

import contextlib
import os
import random
from typing import Dict, List

import numpy as np
import torch
from torch import nn

from .input_files import InputError

__all__ = [
    "PRECISIONS",
    "resolve_device",
    "resolve_precision",
    "check_backend",
    "autocast",
    "make_grad_scaler",
    "seed_everything",
    "adamw_parameter_groups",
    "warmup_then_decay",
    "rng_state",
    "set_rng_state",
]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto``: this process's GPU (``cuda:local_rank``) when CUDA is available, else CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise InputError("--device cuda asked for, but torch sees no CUDA device")
        return torch.device("cuda", local_rank)
    if name == "cpu":
        return torch.device("cpu")
    raise InputError(f"--device must be auto, cpu or cuda, got {name!r}")


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto``: bf16 autocast on a GPU that supports it, fp16 on an older GPU, fp32 on CPU.
    Reduced precision is refused on CPU (autocast there is slow and not what SpanBERT did)."""
    if name not in PRECISIONS:
        raise InputError(f"--precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
    if device.type != "cuda":
        if name in ("bf16", "fp16"):
            raise InputError(f"--precision {name} needs a CUDA device; on CPU use fp32")
        return "fp32"
    if name == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return name


def check_backend(backend: str, device: torch.device) -> None:
    """Raise :class:`InputError` now when ``backend`` (or ``SPANBERT_FAST_BACKEND`` under
    ``auto``) cannot run the model's ops on ``device``. The model resolves its backend at
    its first forward, which under the commands came after files were written to --out."""
    from .. import ops

    forced = os.environ.get("SPANBERT_FAST_BACKEND", "").strip()
    named = (f"SPANBERT_FAST_BACKEND={forced}" if backend == "auto" and forced
             else f"--backend {backend}")
    # The model asks with its int64 input_ids, before any float tensor exists.
    probe = torch.zeros(1, 1, dtype=torch.int64, device=device)
    for op in ops.OPS:  # every op the model dispatches
        try:
            ops.resolve_backend(backend, op, [probe])
        except ops.BackendUnavailableError as err:
            reasons = [line.strip()[2:] for line in str(err).splitlines()
                       if line.startswith("  - ")] or [str(err).splitlines()[0]]
            raise InputError(f"{named} cannot run on {device.type}: {'; '.join(reasons)}; "
                             f"use --backend torch (or auto)") from None
        except ValueError as err:  # SPANBERT_FAST_BACKEND is not a backend
            raise InputError(str(err)) from None


def autocast(device: torch.device, precision: str):
    """The autocast context for ``precision`` (a no-op for fp32). Weights stay fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """A loss scaler, enabled only for fp16 (bf16 has fp32's exponent range)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> Dict[str, object]:
    """Every RNG a training step may draw from (dropout uses torch's), as tensors and
    plain values (loadable with ``torch.load(weights_only=True)``)."""
    numpy_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": numpy_state[0], "keys": torch.from_numpy(numpy_state[1].copy()),
                  "pos": int(numpy_state[2]), "has_gauss": int(numpy_state[3]),
                  "cached_gaussian": float(numpy_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, object]) -> None:
    python_state = state["python"]
    # weights_only loading turns the inner tuple into a list; random wants tuples.
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["name"], numpy_state["keys"].numpy(), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def adamw_parameter_groups(model: nn.Module, weight_decay: float,
                           exempt_norm_and_bias: bool = True) -> List[Dict[str, object]]:
    """Two AdamW groups: weight matrices and embeddings, then biases and LayerNorm
    parameters. With ``exempt_norm_and_bias`` (BERT's convention, and the original SpanBERT
    fine-tuning code's) the second group gets no weight decay; without it (the original
    SpanBERT pretraining command: fairseq's Adam decays every parameter) both groups get
    ``weight_decay``, and the two groups keep optimizer states interchangeable. Tied
    parameters appear once."""
    no_decay_ids = set()
    for module in model.modules():
        is_layer_norm = isinstance(module, nn.LayerNorm) or type(module).__name__ == "LayerNorm"
        for name, param in module.named_parameters(recurse=False):
            if is_layer_norm or name == "bias" or name.endswith("_bias"):
                no_decay_ids.add(id(param))
    decay, no_decay = [], []
    for param in model.parameters():  # deduplicates tied parameters
        if param.requires_grad:
            (no_decay if id(param) in no_decay_ids else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0 if exempt_norm_and_bias else weight_decay}]


def warmup_then_decay(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                      power: float = 1.0) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_steps`` then polynomial decay to 0 at ``total_steps``
    (``power`` 1: linear, as BERT and SpanBERT). Optimizer step ``s`` (0-based) runs at
    ``lr * (s + 1) / warmup_steps`` during warm-up, then ``lr * ((T - s) / (T - W)) ** power``,
    so no step runs at learning rate 0."""
    warmup_steps = max(0, int(warmup_steps))
    total_steps = max(1, int(total_steps))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        remaining = max(0, total_steps - step)
        return (remaining / max(1, total_steps - warmup_steps)) ** power

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
