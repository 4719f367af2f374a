"""The case registry: what a benchmark case is and how one is added.

A *case* is one computation measured several ways (its *variants*: our backends, the
reference, peers such as transformers or a plain torch call). The runner asks each case
for its shapes, builds an :class:`Instance` per (shape, mode), and times every variant of
it side by side, so each row carries its ratio to the case's *speed reference* measured in
the same run; that ratio, not the absolute time, is what the regression gate compares.

Adding rows never touches the runner, the report or the gate:

* a new Triton kernel for an existing op: nothing to do. The op cases ask
  :func:`spanbert_fast.ops.resolve_backend` whether ``triton`` can run and add an
  ``ours-triton`` variant when it can (on CUDA), else record why it was skipped;
* a new computation: write ``build_state`` / ``build_instance`` in a module under
  ``benchmarks/cases/``, wrap them in a :class:`Case`, call :func:`register_case`, and
  import the module from ``benchmarks/cases/__init__.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

__all__ = [
    "MODES",
    "GROUPS",
    "Shape",
    "Instance",
    "Case",
    "CASES",
    "register_case",
    "select_cases",
]

# "fwd": the forward pass under torch.no_grad(); "fwd+bwd": forward, then gradients of
# every input/parameter that a training step would need (torch.autograd.grad, so nothing
# accumulates between timed calls).
MODES = ("fwd", "fwd+bwd")
# Case groups, in the order the report lists them.
GROUPS = ("encoder", "ops", "pretraining", "sampler")


@dataclass(frozen=True)
class Shape:
    """A batch shape. ``padded``: row lengths drawn uniformly from [seq/8, seq] (the row
    keeps ``seq`` columns, the rest is padding); otherwise every row is ``seq`` long."""

    batch: int
    seq: int
    padded: bool = False

    @property
    def label(self) -> str:
        return f"b{self.batch}-s{self.seq}-{'padded' if self.padded else 'full'}"


# A variant maps one pre-generated input to its output: a tensor, or a list of tensors
# (forward output first, then the gradients, in fwd+bwd mode).
VariantFn = Callable[[Any], Any]


@dataclass
class Instance:
    """One (case, shape, mode) ready to time.

    ``inputs``: pre-generated inputs the timed calls rotate through (so no variant is
    flattered by finding its input in cache). ``variants``: name -> callable, in report
    order. ``speed_reference``: the variant every row's time is divided by.
    ``oracle``: the name of a variant whose output is the parity oracle, or a callable
    computing it from an input (e.g. the fp32 reference); ``oracle_name`` says what it is.
    ``parity_view(output, input)``: the tensors that parity compares (real positions only).
    ``tokens``: real tokens per call (tokens/s); ``flops`` / ``bytes``: from
    :mod:`benchmarks.formulas` (None when not meaningful); ``bound``: which ceiling the
    utilisation is measured against ("compute" or "memory"). ``skipped``: variant ->
    reason it cannot run here. ``details``: extra shape facts for the JSON row.
    """

    inputs: List[Any]
    variants: Dict[str, VariantFn]
    speed_reference: str
    oracle: Any
    oracle_name: str
    tokens: int
    flops: Optional[float] = None
    bytes: Optional[float] = None
    bound: str = "compute"
    parity_view: Optional[Callable[[Any, Any], Sequence[torch.Tensor]]] = None
    skipped: Dict[str, str] = field(default_factory=dict)
    details: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ValueError("Instance.inputs must hold at least one input")
        if self.speed_reference not in self.variants:
            raise ValueError(f"speed_reference {self.speed_reference!r} is not one of the "
                             f"variants {list(self.variants)}")
        if isinstance(self.oracle, str) and self.oracle not in self.variants:
            raise ValueError(f"oracle {self.oracle!r} is not one of the variants {list(self.variants)}")
        if self.bound not in ("compute", "memory"):
            raise ValueError(f"bound must be 'compute' or 'memory', got {self.bound!r}")


@dataclass
class Case:
    """A registered benchmark case.

    ``build_state(ctx)`` builds what every shape shares (models, weights) once per run;
    ``build_instance(state, shape, mode, ctx)`` returns an :class:`Instance`;
    ``shapes(ctx)`` lists the shapes for this run's settings; ``available(ctx)`` returns
    None, or the reason the whole case cannot run here (then it is listed as skipped).
    """

    name: str
    group: str
    description: str
    modes: Tuple[str, ...]
    shapes: Callable[[Any], List[Shape]]
    build_instance: Callable[[Any, Shape, str, Any], Instance]
    build_state: Callable[[Any], Any] = lambda ctx: None
    available: Callable[[Any], Optional[str]] = lambda ctx: None

    def __post_init__(self) -> None:
        if self.group not in GROUPS:
            raise ValueError(f"Case {self.name!r}: group must be one of {GROUPS}, got {self.group!r}")
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise ValueError(f"Case {self.name!r}: modes must be a non-empty subset of {MODES}, "
                             f"got {self.modes!r}")


CASES: Dict[str, Case] = {}


def register_case(case: Case) -> Case:
    """Add ``case`` to :data:`CASES` (names are unique; a case may share only its own
    group's name); returns it."""
    if (case.name in CASES or case.name == "all"
            or (case.name in GROUPS and case.name != case.group)):
        raise ValueError(f"benchmark case name {case.name!r} is already taken")
    CASES[case.name] = case
    return case


def select_cases(spec: Optional[Sequence[str]]) -> List[str]:
    """Case names selected by a list of case names and/or group names ("all" or None:
    everything), in registry order. Raises ``ValueError`` naming the unknown entries."""
    if not spec:
        return list(CASES)
    wanted = set()
    unknown = []
    for item in spec:
        item = item.strip()
        if not item:
            continue
        if item == "all":
            wanted.update(CASES)
        elif item in GROUPS:
            wanted.update(name for name, case in CASES.items() if case.group == item)
        elif item in CASES:
            wanted.add(item)
        else:
            unknown.append(item)
    if unknown:
        raise ValueError(
            f"unknown case or group {', '.join(repr(u) for u in unknown)}; known cases: "
            f"{', '.join(CASES)}; groups: {', '.join(GROUPS)}, all")
    if not wanted:
        raise ValueError("no case selected")
    return [name for name in CASES if name in wanted]
