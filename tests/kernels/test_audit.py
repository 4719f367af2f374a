"""The compile audit's gates (benchmarks/audit.py): the kernels compiled for real GPUs
(sm_80, sm_90) with the launchers' own configs, on a CPU-only machine.

The test process runs Triton in the interpreter (conftest.py sets TRITON_INTERPRET), which
cannot compile, so the audit runs once per module in a subprocess with TRITON_INTERPRET
removed from its environment, on the representative subset (``--subset``: ~40 s on 2 cores).
The full audit (every head dim, layout, dtype, width and autotune config, sm_100 too) is
``python -m benchmarks.audit``; its committed output is the regression baseline.
"""

import copy
import glob
import importlib
import json
import os
import subprocess
import sys

import pytest

from spanbert_fast.train import cli as spanbert_cli

# spanbert_fast.benchmarks.audit, or benchmarks.audit in a checkout
AUDIT_MODULE = spanbert_cli._load_benchmarks().__name__ + ".audit"
audit = importlib.import_module(AUDIT_MODULE)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GATE_ARCHS = ("sm_80", "sm_90")


def _audit_env():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run_audit(*args, env=None):
    return subprocess.run([sys.executable, "-m", AUDIT_MODULE, *args], cwd=REPO,
                          env=_audit_env() if env is None else env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def subset(tmp_path_factory):
    """The subset audit's document, compiled for sm_80 and sm_90."""
    path = tmp_path_factory.mktemp("audit") / "subset.json"
    proc = _run_audit("--subset", "--arch", ",".join(GATE_ARCHS), "--json", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _low_precision_rows(doc):
    rows = [row for row in doc["rows"] if audit._low_precision(row)]
    assert rows, "the subset has no fp16/bf16 variant"
    return rows


def test_audit_refuses_the_interpreter():
    env = dict(_audit_env(), TRITON_INTERPRET="1")
    proc = _run_audit("--subset", "--json", os.devnull, env=env)
    assert proc.returncode != 0
    assert "TRITON_INTERPRET" in proc.stderr


def test_audit_refuses_bad_options_before_compiling(tmp_path):
    doc = tmp_path / "audit.json"
    doc.write_text(json.dumps({"rows": [], "versions": {"triton": "0"}, "date": "d",
                               "archs": {}, "seconds": 0}))
    proc = _run_audit("--jobs", "0", "--input", str(doc))
    assert proc.returncode == 2 and "--jobs takes a positive integer" in proc.stderr
    missing = tmp_path / "no-such-folder" / "spills.json"
    proc = _run_audit("--input", str(doc), "--write-spill-table", str(missing))
    assert proc.returncode == 2 and "no folder" in proc.stderr, proc.stderr


def test_audit_refuses_to_replace_an_existing_file(tmp_path):
    existing = tmp_path / "audit.json"
    existing.write_text("mine")
    proc = _run_audit("--subset", "--json", str(existing))
    assert proc.returncode == 2 and "--overwrite" in proc.stderr, proc.stderr
    assert existing.read_text() == "mine"


def test_subset_covers_every_kernel_file(subset):
    ops = {row["op"] for row in subset["rows"]}
    assert ops == {"attention", "layer_norm", "bias_gelu", "linear_cross_entropy",
                   "span_boundary_head"}
    kernels = {row["kernel"] for row in subset["rows"]}
    assert {"_attention_forward_kernel", "_attention_backward_dkdv_kernel",
            "_attention_backward_dq_kernel", "_attention_backward_delta_kernel"} <= kernels
    assert set(subset["archs"]) == set(GATE_ARCHS)


def test_no_compile_failures(subset):
    assert audit.gate_failures(subset)["compile"] == []


def test_no_fp16_bf16_spills_on_sm80_sm90(subset):
    # Kernels with one launch config: none of their fp16/bf16 variants spills. Autotuned
    # attention: every group (dtype, head dim, layout, dropout) has a config that does not
    # spill on each arch, and the launcher's prune keeps only such configs there (below).
    assert audit.gate_failures(subset)["spills"] == []
    clean = [row["id"] for row in _low_precision_rows(subset) if not audit._arch_pruned(row)
             for arch in GATE_ARCHS if not row["archs"][arch]["spills"]]
    assert clean, "no single-config fp16/bf16 variant was gated"


def test_attention_autotune_sets_cover_head_dims_dtypes_and_both_passes(subset):
    tuned = [row for row in subset["rows"] if audit._arch_pruned(row)]
    kernels = {row["kernel"] for row in tuned}
    assert kernels == {"_attention_forward_kernel", "_attention_backward_dkdv_kernel",
                       "_attention_backward_dq_kernel"}
    groups = {}
    for row in tuned:
        groups.setdefault(audit.autotune_group(row), []).append(row)
    # Several tile configs compete in every group (the prune has something to choose from).
    assert all(len(rows) >= 3 for rows in groups.values()), {
        str(g): len(rows) for g, rows in groups.items() if len(rows) < 3}


def test_shared_memory_within_the_arch_limit(subset):
    assert audit.gate_failures(subset)["shared"] == []


def test_fp16_bf16_dots_on_tensor_cores(subset):
    assert audit.gate_failures(subset)["tensor_cores"] == []
    expected = {"sm_80": "mma.sync", "sm_90": "wgmma"}
    with_dots = [row for row in _low_precision_rows(subset)
                 if row["archs"]["sm_90"]["dots"] > 0]
    assert with_dots, "no fp16/bf16 variant has a tl.dot"
    for row in with_dots:
        for arch, instruction in expected.items():
            assert instruction in row["archs"][arch]["tensor_core_instructions"], (
                f"{row['id']} on {arch}: {row['archs'][arch]['tensor_core_instructions']}")


def _committed_audit():
    import triton
    paths = sorted(glob.glob(os.path.join(
        REPO, "benchmarks", "results", f"audit-triton{triton.__version__}-*.json")))
    if not paths:
        pytest.skip(f"no committed audit for triton {triton.__version__} in "
                    "benchmarks/results (run python -m benchmarks.audit)")
    with open(paths[-1], encoding="utf-8") as handle:
        return json.load(handle)


def test_no_regression_against_the_committed_audit(subset):
    baseline = _committed_audit()
    ids = {row["id"] for row in baseline["rows"]}
    missing = [row["id"] for row in subset["rows"] if row["id"] not in ids]
    assert missing == [], "subset variants absent from the committed audit (rerun it)"
    assert audit.compare(subset, baseline) == []


def test_compare_flags_register_growth_and_new_spills(subset):
    rows = [row for row in _low_precision_rows(subset)
            if not row["archs"]["sm_90"]["spills"] and row["archs"]["sm_90"]["registers"] > 40]
    grown, spilled = rows[0]["id"], rows[1]["id"]
    baseline = copy.deepcopy(subset)
    current = copy.deepcopy(subset)
    by_id = {row["id"]: row for row in current["rows"]}
    base_by_id = {row["id"]: row for row in baseline["rows"]}
    # +10% exactly is tolerated, +11% is not.
    regs = base_by_id[grown]["archs"]["sm_90"]["registers"]
    by_id[grown]["archs"]["sm_90"]["registers"] = int(regs * 1.10)
    assert audit.compare(current, baseline) == []
    by_id[grown]["archs"]["sm_90"]["registers"] = int(regs * 1.11) + 1
    by_id[spilled]["archs"]["sm_90"].update(spills=True, spill_store_bytes=16)
    problems = audit.compare(current, baseline)
    assert len(problems) == 2, problems
    assert grown in problems[0] + problems[1] and spilled in problems[0] + problems[1]


def test_compare_cli_exits_nonzero_on_a_planted_baseline(subset, tmp_path):
    """``--compare`` against a baseline planted with fewer registers (so the current
    audit grew > 10%) and no spill where the current audit spills: exit status 1."""
    current = copy.deepcopy(subset)
    target = next(row for row in current["rows"] if row["archs"]["sm_90"]["registers"] > 40
                  and not row["archs"]["sm_80"]["spills"])
    target["archs"]["sm_80"].update(spills=True, spill_store_bytes=24)
    planted = copy.deepcopy(subset)
    planted_row = next(row for row in planted["rows"] if row["id"] == target["id"])
    planted_row["archs"]["sm_90"]["registers"] = int(
        target["archs"]["sm_90"]["registers"] / 1.2)
    paths = {}
    for name, doc in (("current", current), ("planted", planted), ("same", subset)):
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(doc))
    proc = _run_audit("--input", str(paths["current"]), "--compare", str(paths["planted"]))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "2 regressions" in proc.stdout and "now spills" in proc.stdout
    assert "registers" in proc.stdout
    same = _run_audit("--input", str(paths["same"]), "--compare", str(paths["same"]))
    assert same.returncode == 0, same.stdout + same.stderr
    assert "no regression" in same.stdout


def test_gates_catch_planted_failures(subset):
    doc = copy.deepcopy(subset)
    rows = _low_precision_rows(doc)
    with_dots = next(row for row in rows if row["archs"]["sm_80"]["dots"])
    with_dots["archs"]["sm_80"].update(fma_dots=1)
    rows[0]["archs"]["sm_90"].update(shared_bytes=300 * 1024, shared_ok=False)
    single = next(row for row in rows if not audit._arch_pruned(row))
    single["archs"]["sm_80"].update(spills=True, spill_store_bytes=8)
    rows[2]["archs"]["sm_90"] = dict(arch="sm_90", error="CompilationError: planted")
    failures = audit.gate_failures(doc)
    assert all(len(failures[gate]) >= 1
               for gate in ("compile", "spills", "shared", "tensor_cores")), failures
    assert any(single["id"] in item for item in failures["spills"])


def test_spill_gate_fails_a_group_only_when_every_config_spills(subset):
    doc = copy.deepcopy(subset)
    tuned = [row for row in _low_precision_rows(doc) if audit._arch_pruned(row)]
    group = audit.autotune_group(tuned[0])
    members = [row for row in tuned if audit.autotune_group(row) == group]
    for row in members[:-1]:
        row["archs"]["sm_90"].update(spills=True, spill_store_bytes=8)
    assert audit.gate_failures(doc)["spills"] == []  # one clean config is enough
    members[-1]["archs"]["sm_90"].update(spills=True, spill_store_bytes=8)
    assert [item for item in audit.gate_failures(doc)["spills"]
            if "every autotune config spills" in item and "sm_90" in item]


def _committed_spill_table():
    from spanbert_fast.kernels import attention
    if not os.path.exists(attention._SPILLS_FILE):
        pytest.skip(f"no committed spill table {attention._SPILLS_FILE} for this triton")
    with open(attention._SPILLS_FILE, encoding="utf-8") as handle:
        return json.load(handle)


def test_committed_spill_table_is_the_committed_audits():
    """kernels/attention_spills-triton<version>.json (what the launcher prunes by on this
    triton) must be what the committed audit of that triton measured: rerun ``python -m
    benchmarks.audit --overwrite --write-spill-table
    kernels/attention_spills-triton<version>.json`` after a kernel change."""
    baseline = _committed_audit()
    table = _committed_spill_table()
    assert table == audit.spill_table_document(baseline)
    from spanbert_fast.kernels import attention
    assert len(attention.SPILLS) == len(table["spills"])  # loaded: the versions match


def test_launcher_prune_keeps_only_clean_configs_per_arch():
    """For every attention group and arch of the committed audit, the launcher's prune
    (the table above) keeps the configs that spill least: none that spills where a clean
    one exists."""
    import triton
    from spanbert_fast.kernels import attention

    baseline = _committed_audit()
    spills = {tuple(entry[:-1]): entry[-1] for entry in _committed_spill_table()["spills"]}
    names = audit.ATTENTION_KERNELS
    groups = {}
    for row in baseline["rows"]:
        if row["kernel"] in names and audit._arch_pruned(row):
            groups.setdefault(audit.autotune_group(row), []).append(row)
    assert groups
    checked = 0
    for rows in groups.values():
        c = rows[0]["constexprs"]
        flags = (c["BLOCK_D"], bool(c["VARLEN"]), bool(c["HAS_DROPOUT"]))
        configs = [triton.Config({"BLOCK_M": r["constexprs"]["BLOCK_M"],
                                  "BLOCK_N": r["constexprs"]["BLOCK_N"]},
                                 num_warps=r["num_warps"], num_stages=r["num_stages"])
                   for r in rows]
        for arch in baseline["archs"]:
            kept = attention.least_spilling(names[rows[0]["kernel"]],
                                            int(arch.removeprefix("sm_")),
                                            rows[0]["cases"][0]["dtype"], flags, configs,
                                            spills)
            measured = [r["archs"][arch]["spill_store_bytes"] for r in rows]
            kept_bytes = [measured[configs.index(k)] for k in kept]
            assert kept and max(kept_bytes) == min(measured), (rows[0]["id"], arch, measured)
            checked += 1
    assert checked >= 3 * len(groups)


def test_attention_config_sets_by_dtype_class():
    """fp32 (IEEE dots on FMA units) gets only small tiles: at 128x64 it spilled 1-27 KB."""
    from spanbert_fast.kernels import attention
    for kernel, sets in attention.CONFIGS.items():
        assert all(m * n <= 64 * 32 for m, n, _, _ in sets[True]), kernel
        assert len(sets[False]) >= 3 and len(sets[True]) >= 3, kernel
