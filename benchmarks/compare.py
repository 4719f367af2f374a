"""The regression gate: compare a run's *ratios* with a baseline's.

Absolute times move with the machine, its load and its clocks; the ratio of a row's time to
its case's speed reference measured in the same run (e.g. ours / transformers-sdpa) moves
only when the code does. A row regresses when ``new_ratio > old_ratio * (1 + limit)`` and
improves when ``new_ratio < old_ratio * (1 - limit)``. Rows are matched by their ``key``
(case, mode, model, dtype, shape, variant); rows present on one side only are listed, never
failed. Only our rows (variants ``ours-*``) are gated: a peer's ratio to another peer
(transformers-eager / transformers-sdpa) moves only with the environment, and reference
rows are 1 by definition.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

__all__ = ["GATED_VARIANT_PREFIX", "RowChange", "Comparison", "compare_results",
           "parse_max_regression"]


def parse_max_regression(text: Any) -> float:
    """``"10%"`` or ``"0.1"`` (or 0.1) -> 0.1. Raises ``ValueError`` saying what is
    accepted: a percentage, or a fraction in (0, 1)."""
    raw = str(text).strip()
    match = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*%", raw)
    try:
        value = float(match.group(1)) / 100.0 if match else float(raw)
    except ValueError:
        raise ValueError(f"expected a percentage like 10% or a fraction like 0.1, got {text!r}") from None
    if not match and value >= 1.0:
        raise ValueError(f"{text!r} is ambiguous: write a percentage (e.g. {raw}%) or a "
                         "fraction below 1 (e.g. 0.1)")
    if not (0.0 < value < 10.0) or value != value:
        raise ValueError(f"expected a limit above 0 (e.g. 10% or 0.1), got {text!r}")
    return value


@dataclass
class RowChange:
    key: str
    case: str
    mode: str
    shape_label: str
    variant: str
    speed_reference: str
    old_ratio: float
    new_ratio: float
    noise: Optional[float] = None  # the larger round-to-round spread of the two runs

    @property
    def change(self) -> float:
        """Relative change of the ratio (+0.25: 25 % slower relative to the reference)."""
        return self.new_ratio / self.old_ratio - 1.0

    def describe(self) -> str:
        noise = f", round-to-round noise {self.noise:.0%}" if self.noise is not None else ""
        return (f"{self.case} {self.mode} {self.shape_label} {self.variant}: "
                f"{self.old_ratio:.3f} -> {self.new_ratio:.3f} x {self.speed_reference} "
                f"({self.change:+.1%}{noise})")


@dataclass
class Comparison:
    max_regression: float
    regressions: List[RowChange] = field(default_factory=list)
    improvements: List[RowChange] = field(default_factory=list)
    unchanged: List[RowChange] = field(default_factory=list)
    only_in_baseline: List[str] = field(default_factory=list)
    only_in_new: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.regressions

    def format(self) -> str:
        limit = f"{self.max_regression:.0%}" if self.max_regression >= 0.01 else f"{self.max_regression:.2%}"
        lines = [f"Regression gate: ratio to the in-run speed reference, limit {limit} "
                 f"({len(self.regressions)} regressed, {len(self.improvements)} improved, "
                 f"{len(self.unchanged)} within the limit)"]
        lines += [f"  warning: {w}" for w in self.warnings]
        lines += [f"  REGRESSED {c.describe()}" for c in self.regressions]
        lines += [f"  IMPROVED  {c.describe()}" for c in self.improvements]
        if self.only_in_baseline:
            lines.append(f"  {len(self.only_in_baseline)} baseline row(s) not measured now, "
                         f"e.g. {self.only_in_baseline[0]}")
        if self.only_in_new:
            lines.append(f"  {len(self.only_in_new)} new row(s) without a baseline, "
                         f"e.g. {self.only_in_new[0]}")
        lines.append("  PASS" if self.ok else
                     f"  FAIL: {len(self.regressions)} row(s) slower than the baseline ratio by "
                     f"more than {limit}")
        return "\n".join(lines)


GATED_VARIANT_PREFIX = "ours"


def _comparable(doc: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    return {row["key"]: row for row in doc["rows"]
            if row.get("status") == "ok" and not row.get("is_reference")
            and row.get("ratio_to_reference")
            and str(row.get("variant", "")).startswith(GATED_VARIANT_PREFIX)}


def _noise(old: Dict[str, Any], new: Dict[str, Any]) -> Optional[float]:
    spreads = [r.get("ratio_round_spread") for r in (old, new)]
    spreads = [x for x in spreads if isinstance(x, (int, float))]
    return max(spreads) if spreads else None


def compare_results(baseline: Dict[str, Any], new: Dict[str, Any],
                    max_regression: float) -> Comparison:
    """Compare ``new``'s row ratios with ``baseline``'s (both result documents)."""
    result = Comparison(max_regression=max_regression)
    old_rows, new_rows = _comparable(baseline), _comparable(new)
    old_device = baseline.get("device", {}).get("slug")
    new_device = new.get("device", {}).get("slug")
    if old_device != new_device:
        result.warnings.append(f"baseline was measured on {old_device}, this run on "
                               f"{new_device}: ratios can differ between machines")
    for key, row in new_rows.items():
        old: Optional[Dict[str, Any]] = old_rows.get(key)
        if old is None:
            result.only_in_new.append(key)
            continue
        change = RowChange(key=key, case=row["case"], mode=row["mode"],
                           shape_label=row["shape_label"], variant=row["variant"],
                           speed_reference=row["speed_reference"],
                           old_ratio=float(old["ratio_to_reference"]),
                           new_ratio=float(row["ratio_to_reference"]),
                           noise=_noise(old, row))
        if change.new_ratio > change.old_ratio * (1.0 + max_regression):
            result.regressions.append(change)
        elif change.new_ratio < change.old_ratio * (1.0 - max_regression):
            result.improvements.append(change)
        else:
            result.unchanged.append(change)
    result.only_in_baseline = [k for k in old_rows if k not in new_rows]
    result.regressions.sort(key=lambda c: -c.change)
    result.improvements.sort(key=lambda c: c.change)
    return result
