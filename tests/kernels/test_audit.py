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


# The one fp16/bf16 spill left after the forward moved to 8 warps (triton 3.7.1): the
# dK/dV backward at head_dim 128 (64x64 tiles, 8 warps) spills 4-12 bytes on sm_90. Its
# own strict xfail below flips when a config fixes it; every other variant is gated.
def _known_spill(row, arch):
    return (row["kernel"] == "_attention_backward_dkdv_kernel"
            and row["constexprs"].get("BLOCK_D") == 128 and arch == "sm_90")


def test_audit_refuses_the_interpreter():
    env = dict(_audit_env(), TRITON_INTERPRET="1")
    proc = _run_audit("--subset", "--json", os.devnull, env=env)
    assert proc.returncode != 0
    assert "TRITON_INTERPRET" in proc.stderr


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
    spills = [f"{row['id']} on {arch}: {r['spill_store_bytes']} B spill stores, "
              f"{r['registers']} registers"
              for row in _low_precision_rows(subset) for arch, r in row["archs"].items()
              if arch in GATE_ARCHS and r["spills"] and not _known_spill(row, arch)]
    assert spills == []


@pytest.mark.xfail(strict=True, reason=(
    "measured with triton 3.7.1: _attention_backward_dkdv_kernel at head_dim 128 (64x64 "
    "tiles, 8 warps, 2 stages) uses 255 registers and spills 4-12 bytes on sm_90 in bf16 "
    "(64x32, 32x64 and 32x32 tiles spill elsewhere); the autotune set of issue 15 is to fix"))
def test_attention_dkdv_head_dim_128_does_not_spill_on_sm90(subset):
    rows = [row for row in _low_precision_rows(subset) if _known_spill(row, "sm_90")]
    assert rows, "the subset has no head_dim 128 dK/dV variant"
    assert [row["id"] for row in rows if row["archs"]["sm_90"]["spills"]] == []


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
    rows[1]["archs"]["sm_80"].update(spills=True, spill_store_bytes=8)
    rows[2]["archs"]["sm_90"] = dict(arch="sm_90", error="CompilationError: planted")
    failures = audit.gate_failures(doc)
    assert all(len(failures[gate]) >= 1
               for gate in ("compile", "spills", "shared", "tensor_cores")), failures
