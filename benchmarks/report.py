"""Rendering a result document: the terminal table, the Markdown page and the plots."""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Tuple

from .registry import GROUPS
from .schema import check_result, dump_result, write_atomically

__all__ = [
    "format_header",
    "format_table",
    "format_markdown",
    "plot_speedup",
    "plot_memory",
    "write_outputs",
    "output_stem",
]

_COLUMNS = ("case", "mode", "shape", "variant", "time", "tokens/s", "rate", "util",
            "vs ref", "parity")


def _time(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def _si(value: Optional[float], unit: str) -> str:
    if value is None:
        return "-"
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def _rate(row: Dict[str, Any]) -> str:
    if row.get("bound") == "memory" and row.get("bytes_per_s"):
        return _si(row["bytes_per_s"], "B/s")
    if row.get("flops_per_s"):
        return _si(row["flops_per_s"], "FLOP/s")
    return "-"


def _parity(row: Dict[str, Any]) -> str:
    if row.get("parity_finite") is False:
        return "NaN/inf"
    error = row.get("parity_error")
    if error is None:
        return "-"
    return "0" if error == 0 else f"{error:.1e}"


def _cells(row: Dict[str, Any]) -> List[str]:
    if row["status"] != "ok":
        tail = [row["status"].upper() + ": " + (row.get("reason") or "")[:60]]
        return [row["case"], row["mode"], row["shape_label"], row["variant"]] + tail
    ratio = row.get("ratio_to_reference")
    vs_ref = "ref" if row.get("is_reference") else (f"{ratio:.2f}x" if ratio else "-")
    util = row.get("utilisation")
    return [row["case"], row["mode"], row["shape_label"], row["variant"], _time(row["time_s"]),
            _si(row.get("tokens_per_s"), "").strip() or "-", _rate(row),
            f"{util:.1%}" if util is not None else "-", vs_ref, _parity(row)]


def _ordered_rows(doc: Dict[str, Any], include_skipped: bool = False) -> List[Dict[str, Any]]:
    rank = {g: i for i, g in enumerate(GROUPS)}
    rows = [r for r in doc["rows"] if include_skipped or r["status"] != "skipped"]
    # Stable: keeps the run's order inside a group.
    return sorted(rows, key=lambda r: rank.get(r["group"], len(rank)))


def format_header(doc: Dict[str, Any]) -> List[Tuple[str, str]]:
    """(label, value) pairs describing the machine, the versions, the settings and the
    measured ceilings."""
    device, versions, settings, ceilings = (doc["device"], doc["versions"], doc["settings"],
                                            doc["ceilings"])
    where = device["name"]
    if device["type"] == "cpu":
        where += f" ({device.get('threads')} threads)"
    else:
        where += f" (CUDA {device.get('cuda')}, sm {device.get('capability')})"
    libs = ", ".join(f"{k} {v}" for k, v in versions.items() if v is not None)
    matmul = ceilings["matmul"]
    ceiling = f"matmul {_si(matmul['flops_per_s'], 'FLOP/s')} ({matmul['dtype']}, n={matmul['n']})"
    run = ceilings["matmul_run"]
    if run["dtype"] != matmul["dtype"]:
        ceiling += f", {_si(run['flops_per_s'], 'FLOP/s')} ({run['dtype']})"
    ceiling += f"; copy {_si(ceilings['copy']['bytes_per_s'], 'B/s')}"
    shape = (f"model {settings['model']}, dtype {settings['dtype']}, seq {settings['seq']}, "
             f"batch {settings['batch']}{', quick' if settings['quick'] else ''}")
    return [("device", where), ("date", doc["created"]), ("versions", libs),
            ("settings", shape), ("timer", doc["timer"]), ("ceilings", ceiling)]


def _skipped_summary(doc: Dict[str, Any]) -> List[str]:
    lines = [f"{c['case']}: {c['reason']}" for c in doc["skipped_cases"]]
    seen = OrderedDict()
    for row in doc["rows"]:
        if row["status"] == "skipped":
            seen.setdefault((row["case"], row["variant"], row["reason"]), None)
    lines += [f"{case} {variant}: {reason}" for case, variant, reason in seen]
    return lines


def format_table(doc: Dict[str, Any]) -> str:
    """The terminal table (plain text, aligned), with the header and what was skipped."""
    out = [f"{label:>9}: {value}" for label, value in format_header(doc)]
    ordered = _ordered_rows(doc)
    table = [list(_COLUMNS)] + [_cells(r) for r in ordered]
    widths = [max(len(r[i]) for r in table if i < len(r)) for i in range(len(_COLUMNS))]
    out.append("")
    group = None
    for i, cells in enumerate(table):
        if i > 0:
            row_group = ordered[i - 1]["group"]
            if row_group != group:
                group = row_group
                out.append(f"-- {group} " + "-" * max(0, sum(widths) + 2 * len(widths) - 4 - len(group)))
        if len(cells) < len(_COLUMNS):  # skipped / error rows: one long cell at the end
            out.append("  ".join(c.ljust(w) for c, w in zip(cells[:-1], widths)) + "  " + cells[-1])
        else:
            out.append("  ".join(c.rjust(w) if j >= 4 else c.ljust(w)
                                 for j, (c, w) in enumerate(zip(cells, widths))).rstrip())
    warnings = [n for n in doc["notes"] if n.startswith("WARNING")]
    if warnings:
        out.append("")
        out += warnings
    skipped = _skipped_summary(doc)
    if skipped:
        out.append("")
        out.append("skipped:")
        out += [f"  {line}" for line in skipped]
    out.append("")
    out.append("vs ref = median over timing rounds of time / the case's speed reference's time "
               "in the same round (lower is faster); parity = max relative error against the "
               "oracle; util = against the ceilings above.")
    return "\n".join(out)


def format_markdown(doc: Dict[str, Any], plots: Dict[str, Optional[str]]) -> str:
    device = doc["device"]
    lines = [f"# spanbert_fast benchmarks: {device['name']}, {doc['date']}", ""]
    lines += ["| | |", "| --- | --- |"]
    lines += [f"| {label} | {value} |" for label, value in format_header(doc)]
    lines += ["", "## Results", "",
              "`vs ref`: median over the timing rounds of this row's time / the speed "
              "reference's time in the same round (lower is faster; the reference row says "
              "`ref`). `parity`: max |row - oracle| / max |oracle| over real positions (and "
              "every gradient in fwd+bwd rows).", ""]
    speed_refs = OrderedDict()
    for row in doc["rows"]:
        speed_refs.setdefault(row["case"], (row["speed_reference"], row["parity_oracle"]))
    header = ["case", "mode", "shape", "variant", "time", "tokens/s", "rate", "util", "vs ref",
              "parity"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in _ordered_rows(doc):
        cells = _cells(row)
        if len(cells) < len(header):
            cells = cells[:-1] + [cells[-1]] + [""] * (len(header) - len(cells))
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    lines += ["", "Speed references and parity oracles:", ""]
    lines += [f"- `{case}`: speed reference `{ref}`, parity oracle `{oracle}`"
              for case, (ref, oracle) in speed_refs.items()]
    skipped = _skipped_summary(doc)
    if skipped:
        lines += ["", "## Skipped", ""] + [f"- {line}" for line in skipped]
    lines += ["", "## Plots", ""]
    if plots.get("speedup"):
        lines.append(f"![speed-up over the speed reference vs sequence length]"
                     f"({os.path.basename(plots['speedup'])})")
    else:
        lines.append("No speed-up plot (matplotlib missing, or plots disabled).")
    if plots.get("memory"):
        lines += ["", f"![peak memory vs batch]({os.path.basename(plots['memory'])})"]
    else:
        lines += ["", "Peak memory was not measured in this run (CPU: torch keeps no allocator "
                      "statistics for CPU tensors), so there is no memory-vs-batch plot."]
    lines += ["", "## Notes", ""] + [f"- {note}" for note in doc["notes"]]
    lines += ["", f"Wall time of the run: {doc['wall_time_s']:.0f} s.", ""]
    return "\n".join(lines)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _panels(doc: Dict[str, Any]) -> "OrderedDict[Tuple[str, str], List[Dict[str, Any]]]":
    panels: "OrderedDict[Tuple[str, str], List[Dict[str, Any]]]" = OrderedDict()
    for row in _ordered_rows(doc):
        if row["status"] == "ok":
            panels.setdefault((row["case"], row["mode"]), []).append(row)
    return panels


def plot_speedup(doc: Dict[str, Any], path: str) -> Optional[str]:
    """One panel per (case, mode): speed-up over the speed reference (reference time / row
    time, higher is better) against sequence length, one line per variant, solid for full
    batches and dashed for padded ones, at the batch size with the most points."""
    plt = _pyplot()
    panels = _panels(doc)
    if plt is None or not panels:
        return None
    cases = list(OrderedDict.fromkeys(case for case, _ in panels))
    modes = ["fwd", "fwd+bwd"]
    # One colour per variant across every panel.
    colours: Dict[str, str] = {}
    for rows in panels.values():
        for r in rows:
            if not r["is_reference"]:
                colours.setdefault(r["variant"], f"C{len(colours) % 10}")
    fig, axes = plt.subplots(len(cases), len(modes), figsize=(12, 3.1 * len(cases)),
                             squeeze=False)
    for i, case in enumerate(cases):
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            rows = panels.get((case, mode))
            if not rows:
                ax.axis("off")
                ax.text(0.5, 0.5, f"{case} {mode}: not measured", ha="center", va="center",
                        transform=ax.transAxes, color="grey")
                continue
            counts: Dict[int, int] = {}
            for r in rows:
                counts[r["shape"]["batch"]] = counts.get(r["shape"]["batch"], 0) + 1
            batch = max(counts, key=lambda b: (counts[b], b))
            series: "OrderedDict[Tuple[str, bool], List[Tuple[int, float]]]" = OrderedDict()
            for r in rows:
                if r["shape"]["batch"] != batch or r["is_reference"] or not r["ratio_to_reference"]:
                    continue
                series.setdefault((r["variant"], r["shape"]["padded"]), []).append(
                    (r["shape"]["seq"], 1.0 / r["ratio_to_reference"]))
            seqs = sorted({r["shape"]["seq"] for r in rows if r["shape"]["batch"] == batch})
            values = [1.0]
            for (variant, padded), points in series.items():
                points.sort()
                values += [p[1] for p in points]
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                        linestyle="--" if padded else "-", color=colours[variant],
                        label=f"{variant}{' (padded)' if padded else ''}")
            ax.axhline(1.0, color="black", linewidth=0.8)
            # Never zoom in closer than 0.8x..1.25x: run-to-run noise must look small.
            ax.set_ylim(min(0.8, min(values) / 1.1), max(1.25, max(values) * 1.1))
            ax.set_xscale("log", base=2)
            ax.set_xticks(seqs)
            ax.set_xticklabels([str(s) for s in seqs])
            ax.set_xlabel("sequence length")
            ax.set_ylabel(f"speed-up vs\n{rows[0]['speed_reference']}", fontsize=8)
            ax.set_title(f"{case} {mode} (batch {batch})", fontsize=10)
            ax.grid(True, alpha=0.3)
            if series:
                ax.legend(fontsize=7, loc="best")
    device = doc["device"]["name"]
    fig.suptitle(f"Speed-up over the in-run speed reference (higher is better; 1 = reference)\n"
                 f"{device}, {doc['settings']['model']} {doc['settings']['dtype']}, {doc['date']}",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    write_atomically(path, lambda handle: fig.savefig(handle, dpi=110, format="png"))
    plt.close(fig)
    return path


def plot_memory(doc: Dict[str, Any], path: str) -> Optional[str]:
    """Peak memory against batch size per (case, mode) at the longest sequence, one line
    per variant; None when no row measured memory (CPU runs)."""
    rows = [r for r in doc["rows"] if r["status"] == "ok" and r.get("peak_memory_bytes")
            and not r["shape"]["padded"]]
    plt = _pyplot()
    if plt is None or not rows:
        return None
    panels: "OrderedDict[Tuple[str, str], List[Dict[str, Any]]]" = OrderedDict()
    for r in rows:
        panels.setdefault((r["case"], r["mode"]), []).append(r)
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 3.0 * len(panels)), squeeze=False)
    for ax, ((case, mode), items) in zip(axes[:, 0], panels.items()):
        seq = max(r["shape"]["seq"] for r in items)
        series: "OrderedDict[str, List[Tuple[int, float]]]" = OrderedDict()
        for r in items:
            if r["shape"]["seq"] == seq:
                series.setdefault(r["variant"], []).append(
                    (r["shape"]["batch"], r["peak_memory_bytes"] / 2 ** 30))
        for variant, points in series.items():
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=variant)
        ax.set_xlabel("batch")
        ax.set_ylabel("peak GiB")
        ax.set_title(f"{case} {mode} (seq {seq})", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Peak memory (weights included), {doc['device']['name']}, {doc['date']}",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    write_atomically(path, lambda handle: fig.savefig(handle, dpi=110, format="png"))
    plt.close(fig)
    return path


# Options that narrow or change what a run measures: such a run must not overwrite the
# day's default run (e.g. the committed results) under the same name.
_SELECTION_OPTIONS = ("--model", "--dtype", "--ops", "--seq", "--batch", "--quick",
                      "--no-quick")


def output_stem(doc: Dict[str, Any]) -> str:
    """``<device-slug>-<YYYY-MM-DD>`` for the default selection; a run narrowed or changed
    by a selection option gets its settings appended (model, dtype, cases, seq, batch)."""
    stem = f"{doc['device']['slug']}-{doc['date']}"
    settings = doc.get("settings", {})
    argv = [str(a).split("=", 1)[0] for a in settings.get("argv", [])]
    if not any(a in _SELECTION_OPTIONS for a in argv):
        return stem
    cases = settings.get("cases", [])
    parts = [str(settings.get("model")), str(settings.get("dtype")),
             "+".join(cases) if len(cases) <= 3 else f"{len(cases)}cases",
             "s" + "_".join(str(n) for n in settings.get("seq", [])),
             "b" + "_".join(str(n) for n in settings.get("batch", []))]
    if settings.get("quick"):
        parts.append("quick")
    return stem + "-" + "-".join(parts)


def write_outputs(doc: Dict[str, Any], out_dir: str, plots: bool = True) -> Dict[str, Optional[str]]:
    """Write ``<stem>.json``, ``<stem>.md`` and the PNG plots into ``out_dir``."""
    check_result(doc)  # before any file: an invalid run must not replace a valid one's plots
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, output_stem(doc))
    paths: Dict[str, Optional[str]] = {"json": stem + ".json", "md": stem + ".md",
                                       "speedup": None, "memory": None}
    if plots:
        paths["speedup"] = plot_speedup(doc, stem + "-speedup.png")
        paths["memory"] = plot_memory(doc, stem + "-memory.png")
    dump_result(doc, paths["json"])
    markdown = format_markdown(doc, paths).encode("utf-8")
    write_atomically(paths["md"], lambda handle: handle.write(markdown))
    return paths

