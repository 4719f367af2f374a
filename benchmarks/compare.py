"""The regression gate: compare a run's *ratios* with a baseline's.

Absolute times move with the machine, its load and its clocks; the ratio of a row's time to
its case's speed reference measured in the same run (e.g. ours / transformers-sdpa) moves
only when the code does. A row regresses when ``new_ratio > old_ratio * (1 + limit)`` and
improves when ``new_ratio < old_ratio * (1 - limit)``. Rows are matched by their ``key``
(case, mode, model, dtype, shape, variant). Only our rows (variants ``ours-*``) are gated: a
peer's ratio to another peer (transformers-eager / transformers-sdpa) moves only with the
environment, and reference rows are 1 by definition.

The gate also fails, rather than pass on nothing, when:

* a gated baseline row whose case and shape this run measured has no ratio now (the row
  was skipped or failed, or its reference failed): a kernel that stopped running is a
  regression, not a missing row;
* the two runs are not comparable: another device, model size or dtype;
* either run was measured while other processes kept the CPUs busy (their ratios flatten
  toward 1.0 and hide regressions);
* no row was compared at all.

Baseline rows of cases or shapes this run did not select are listed, not failed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from .runner import BUSY_LIMIT

__all__ = ["GATED_VARIANT_PREFIX", "RowChange", "Comparison", "compare_results",
           "incomparable_settings", "parse_max_regression"]


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
    lost: List[str] = field(default_factory=list)      # gated rows without a ratio now
    errors: List[str] = field(default_factory=list)    # why the runs cannot be compared
    warnings: List[str] = field(default_factory=list)

    @property
    def compared(self) -> int:
        return len(self.regressions) + len(self.improvements) + len(self.unchanged)

    @property
    def ok(self) -> bool:
        return not (self.regressions or self.lost or self.errors)

    def format(self) -> str:
        limit = f"{self.max_regression:.0%}" if self.max_regression >= 0.01 else f"{self.max_regression:.2%}"
        lines = [f"Regression gate: ratio to the in-run speed reference, limit {limit} "
                 f"({len(self.regressions)} regressed, {len(self.improvements)} improved, "
                 f"{len(self.unchanged)} within the limit)"]
        lines += [f"  warning: {w}" for w in self.warnings]
        lines += [f"  CANNOT COMPARE: {e}" for e in self.errors]
        lines += [f"  REGRESSED {c.describe()}" for c in self.regressions]
        lines += [f"  LOST      {entry}" for entry in self.lost]
        lines += [f"  IMPROVED  {c.describe()}" for c in self.improvements]
        if self.only_in_baseline:
            lines.append(f"  {len(self.only_in_baseline)} baseline row(s) not measured now, "
                         f"e.g. {self.only_in_baseline[0]}")
        if self.only_in_new:
            lines.append(f"  {len(self.only_in_new)} new row(s) without a baseline, "
                         f"e.g. {self.only_in_new[0]}")
        if self.ok:
            lines.append("  PASS")
        else:
            reasons = []
            if self.errors:
                reasons.append("the runs cannot be compared")
            if self.regressions:
                reasons.append(f"{len(self.regressions)} row(s) slower than the baseline ratio "
                               f"by more than {limit}")
            if self.lost:
                reasons.append(f"{len(self.lost)} gated row(s) no longer measured")
            lines.append("  FAIL: " + "; ".join(reasons))
        return "\n".join(lines)


GATED_VARIANT_PREFIX = "ours"


def _comparable(doc: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    return {row["key"]: row for row in doc["rows"]
            if row.get("status") == "ok" and not row.get("is_reference")
            and row.get("ratio_to_reference")
            and str(row.get("variant", "")).startswith(GATED_VARIANT_PREFIX)}


def incomparable_settings(baseline: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    """Why ``new`` (a result, or just its ``device`` and ``settings``) cannot be gated on
    ``baseline``: another device, model size or dtype. Empty when comparable."""
    errors = []
    fields: List[Tuple[str, Any, Any]] = [
        ("device", baseline.get("device", {}).get("slug"), new.get("device", {}).get("slug")),
        ("model", baseline.get("settings", {}).get("model"), new.get("settings", {}).get("model")),
        ("dtype", baseline.get("settings", {}).get("dtype"), new.get("settings", {}).get("dtype")),
    ]
    for what, old, now in fields:
        if old != now:
            errors.append(f"the baseline's {what} is {old}, this run's is {now}: ratios are "
                          f"compared on the same {what} only. Measure a baseline on this "
                          f"machine with these settings (spanbert-fast bench --out DIR) and "
                          f"commit its JSON")
    return errors


def _busy_errors(baseline: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    errors = []
    for label, doc in (("the baseline", baseline), ("this run", new)):
        shares = [doc.get(k) for k in ("cpu_busy_by_others_at_start",
                                       "cpu_busy_by_others_at_end")]
        shares = [x for x in shares if isinstance(x, (int, float))]
        if shares and max(shares) >= BUSY_LIMIT:
            errors.append(f"{label} was measured while other processes kept {max(shares):.0%} "
                          "of the CPUs busy: its ratios are not trustworthy (they flatten "
                          "toward 1.0); re-run it on an idle machine")
    return errors


def _noise(old: Dict[str, Any], new: Dict[str, Any]) -> Optional[float]:
    spreads = [r.get("ratio_round_spread") for r in (old, new)]
    spreads = [x for x in spreads if isinstance(x, (int, float))]
    return max(spreads) if spreads else None


def compare_results(baseline: Dict[str, Any], new: Dict[str, Any],
                    max_regression: float) -> Comparison:
    """Compare ``new``'s row ratios with ``baseline``'s (both result documents)."""
    result = Comparison(max_regression=max_regression)
    result.errors = incomparable_settings(baseline, new) + _busy_errors(baseline, new)
    if result.errors:
        return result
    old_rows, new_rows = _comparable(baseline), _comparable(new)
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
    # A gated baseline row is expected now when this run measured its case, mode and shape.
    measured = {(r.get("case"), r.get("mode"), r.get("shape_label")) for r in new["rows"]}
    now_by_key = {r.get("key"): r for r in new["rows"]}
    for key, old in old_rows.items():
        if key in new_rows:
            continue
        if (old["case"], old["mode"], old["shape_label"]) in measured:
            row = now_by_key.get(key)
            why = ("not measured" if row is None else
                   f"{row.get('status')}: {row.get('reason') or 'no ratio (its speed reference failed)'}")
            result.lost.append(f"{key} (baseline ratio {float(old['ratio_to_reference']):.3f}; "
                               f"now {why})")
        else:
            result.only_in_baseline.append(key)
    if result.compared == 0 and not result.lost:
        result.errors.append("no row of this run has a baseline row to compare with (other "
                             "cases, shapes or variants): the gate would compare nothing")
    result.regressions.sort(key=lambda c: -c.change)
    result.improvements.sort(key=lambda c: c.change)
    return result
