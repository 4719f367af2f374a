"""The benchmark suite's plumbing: formulas, result schema, regression gate, command line.

Timing is mocked out (``benchmarks.timing.measure`` returns a constant) everywhere except
one real ``--quick`` CPU run of a single small op case. Runs in CI; well under a minute.
"""

import importlib
import json
import os

import pytest
import torch

from spanbert_fast.train import cli as spanbert_cli

bench = spanbert_cli._load_benchmarks()  # spanbert_fast.benchmarks, or benchmarks/ in a checkout


def _sub(name):
    return importlib.import_module(f"{bench.__name__}.{name}")


formulas = _sub("formulas")
timing = _sub("timing")
schema = _sub("schema")
compare = _sub("compare")
registry = _sub("registry")
bench_cli = _sub("cli")
runner = _sub("runner")
report = _sub("report")

# Tiny model, one short shape: every row builds in milliseconds.
TINY = ["--model", "tiny", "--seq", "16", "--batch", "2", "--no-progress", "--device", "cpu"]


@pytest.fixture
def no_interpreter(monkeypatch):
    # tests/conftest.py sets TRITON_INTERPRET=1 for the kernel tests; the suite refuses it.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.fixture
def fake_timer(monkeypatch, no_interpreter):
    """Every measurement takes 1 ms; ceilings come out as 2n^3/1ms and 2*bytes/1ms."""
    calls = []

    def measure(call, device, policy, *, first_call_s=None):
        calls.append(call)
        return 1e-3

    monkeypatch.setattr(timing, "measure", measure)
    # An idle machine, whatever else the CI machine is doing (the gate refuses busy runs).
    monkeypatch.setattr(runner, "busy_share_of_others", lambda window_s=0.5: 0.0)
    return calls


def _run_main(argv, capsys):
    code = bench_cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------------------
# FLOP / byte formulas against numbers worked out by hand
# --------------------------------------------------------------------------------------
def test_linear_flops():
    assert formulas.linear_flops(10, 20, 30) == 2 * 10 * 20 * 30 == 12_000
    assert formulas.linear_flops(10, 20, 30, backward=True) == 36_000


def test_attention_flops_forward_and_backward():
    # 4 * B * H * S^2 * D = 4 * 8 * 12 * 128 * 128 * 64
    assert formulas.attention_flops([128] * 8, 12, 64) == 402_653_184
    # backward is 2.5x forward: 3.5x in total
    assert formulas.attention_flops([128] * 8, 12, 64, backward=True) == 402_653_184 * 3.5
    # padded batch: charged per real length
    assert formulas.attention_flops([1, 2], heads=1, head_dim=1) == 4 * (1 + 4)


def test_encoder_flops_per_token_bert_base():
    # 12 * (8 * 768^2 + 4 * 768 * 3072 + 4 * 512 * 768) = 12 * 15_728_640
    assert formulas.encoder_flops_per_token(768, 3072, 12, 512) == 188_743_680
    full = formulas.encoder_flops([512] * 4, 768, 3072, 12)
    assert full == 4 * 512 * 188_743_680
    dense = 4 * 512 * 12 * (8 * 768 ** 2 + 4 * 768 * 3072)
    attention = 12 * 4 * 4 * 512 ** 2 * 768
    assert formulas.encoder_flops([512] * 4, 768, 3072, 12, backward=True) == dense * 3 + attention * 3.5


def test_memory_bound_bytes():
    # LayerNorm with residual, 4 rows x 8, fp32: (3 * 32 + 2 * 8) * 4 = 448 bytes forward
    assert formulas.layer_norm_bytes(4, 8, 4) == 448
    assert formulas.layer_norm_bytes(4, 8, 4, residual=False) == (2 * 32 + 16) * 4
    # backward: (3 * 32 + 4 * 8) * 4 + 8 bytes of statistics per row
    assert formulas.layer_norm_bytes(4, 8, 4, backward=True) == 448 + 512 + 32
    # bias-GELU, 4 x 8 in bf16: (2 * 32 + 8) * 2 forward, + (3 * 32 + 8) * 2 backward
    assert formulas.bias_gelu_bytes(4, 8, 2) == 144
    assert formulas.bias_gelu_bytes(4, 8, 2, backward=True) == 144 + 208


def test_head_flops():
    assert formulas.linear_cross_entropy_flops(10, 4, 100) == 8_000
    # (2H + E) -> H then H -> H for N = 2, H = 4, E = 3: 2*2*11*4 + 2*2*4*4
    assert formulas.span_boundary_head_flops(2, 4, 3) == 176 + 64
    assert formulas.span_boundary_head_flops(2, 4, 3, backward=True) == 3 * 240
    step = formulas.pretraining_step_flops([8, 8], 4, 16, 2, 100, masked=3, sbo_targets=2,
                                           position_width=3)
    expected = (formulas.encoder_flops([8, 8], 4, 16, 2, backward=True)
                + 3 * (2 * 3 * 4 * 4) + 3 * (2 * 3 * 4 * 100) + 3 * 240 + 3 * (2 * 2 * 4 * 100))
    assert step == expected


# --------------------------------------------------------------------------------------
# Result schema
# --------------------------------------------------------------------------------------
def _mocked_result(tmp_path, capsys, extra=()):
    code, out, err = _run_main(TINY + ["--ops", "layer_norm,bias_gelu", "--out", str(tmp_path),
                                       "--no-plots", *extra], capsys)
    assert code == 0, err
    files = [f for f in os.listdir(tmp_path) if f.endswith(".json")]
    assert len(files) == 1
    return os.path.join(tmp_path, files[0]), out


def test_produced_result_validates(tmp_path, capsys, fake_timer):
    path, out = _mocked_result(tmp_path, capsys)
    doc = json.load(open(path))
    assert schema.validate_result(doc) == []
    assert doc["schema_version"] == schema.SCHEMA_VERSION
    # A narrowed run (--model, --ops, ...) does not take the day's default file name.
    assert os.path.basename(path) == (f"{doc['device']['slug']}-{doc['date']}-tiny-fp32-"
                                      "layer_norm+bias_gelu-s16-b2-quick.json")
    ok = [r for r in doc["rows"] if r["status"] == "ok"]
    assert {r["case"] for r in ok} == {"layer_norm", "bias_gelu"}
    assert {r["mode"] for r in ok} == {"fwd", "fwd+bwd"}
    for row in ok:
        assert row["time_s"] == 1e-3
        assert row["ratio_to_reference"] == 1.0
        assert row["parity_error"] is not None and row["parity_error"] < 1e-5
        assert row["key"] == schema.row_key(row)
    # skipped Triton rows carry their reason
    triton = [r for r in doc["rows"] if r["variant"] == "ours-triton"]
    assert triton and all(r["status"] == "skipped" and "CUDA" in r["reason"] for r in triton)
    assert "layer_norm" in out and "ours-torch" in out


def test_schema_reports_missing_and_mistyped_keys(tmp_path, capsys, fake_timer):
    path, _ = _mocked_result(tmp_path, capsys)
    doc = json.load(open(path))
    del doc["ceilings"]
    assert any("ceilings" in p for p in schema.validate_result(doc))
    doc = json.load(open(path))
    doc["rows"][0]["time_s"] = "fast"
    doc["rows"][1].pop("variant")
    problems = schema.validate_result(doc)
    assert any("rows[0].time_s" in p for p in problems)
    assert any("rows[1]" in p and "variant" in p for p in problems)
    doc = json.load(open(path))
    doc["schema_version"] = 99
    assert any("schema_version" in p for p in schema.validate_result(doc))
    with pytest.raises(ValueError, match="schema"):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(doc))
        schema.load_result(str(bad))


# --------------------------------------------------------------------------------------
# Regression gate
# --------------------------------------------------------------------------------------
def _planted_baseline(path, tmp_path, ratio):
    doc = json.load(open(path))
    target = next(r for r in doc["rows"] if r["status"] == "ok" and r["variant"] == "ours-torch"
                  and r["case"] == "layer_norm" and r["mode"] == "fwd")
    target["ratio_to_reference"] = ratio
    out = tmp_path / "baseline.json"
    out.write_text(json.dumps(doc))
    return str(out), target


def test_compare_fails_on_a_planted_regression(tmp_path, capsys, fake_timer):
    path, _ = _mocked_result(tmp_path / "base", capsys)
    # The baseline says ours-torch took half the reference's time; now it takes as long.
    baseline, row = _planted_baseline(path, tmp_path, 0.5)
    code, out, _ = _run_main(TINY + ["--ops", "layer_norm", "--out", str(tmp_path / "new"),
                                     "--no-plots", "--compare", baseline,
                                     "--max-regression", "10%"], capsys)
    assert code == 1
    assert "REGRESSED" in out
    assert f"layer_norm fwd {row['shape_label']} ours-torch: 0.500 -> 1.000" in out
    assert "FAIL" in out


def test_compare_passes_and_reports_a_planted_improvement(tmp_path, capsys, fake_timer):
    path, _ = _mocked_result(tmp_path / "base", capsys)
    baseline, row = _planted_baseline(path, tmp_path, 2.0)
    code, out, _ = _run_main(TINY + ["--ops", "layer_norm", "--out", str(tmp_path / "new"),
                                     "--no-plots", "--compare", baseline,
                                     "--max-regression", "0.1"], capsys)
    assert code == 0
    assert f"IMPROVED  layer_norm fwd {row['shape_label']} ours-torch: 2.000 -> 1.000" in out
    assert "PASS" in out


def _gate_doc(ratios, slug="cpu-x", statuses=None, busy=None):
    """A minimal result document: one fwd row per key (case = key), b1-s8-full."""
    rows = []
    for key, ratio in ratios.items():
        variant = "transformers-eager" if key == "peer" else "ours-torch"
        status = (statuses or {}).get(key, "ok")
        rows.append({"key": key, "case": key, "mode": "fwd", "shape_label": "b1-s8-full",
                     "variant": variant, "speed_reference": "sdpa", "status": status,
                     "reason": None if status == "ok" else "CUDA needed",
                     "is_reference": False,
                     "ratio_to_reference": ratio if status == "ok" else None,
                     "ratio_round_spread": 0.03})
    return {"rows": rows, "device": {"slug": slug},
            "settings": {"model": "base", "dtype": "fp32"},
            "cpu_busy_by_others_at_start": busy, "cpu_busy_by_others_at_end": None}


def test_compare_logic_directly():
    # "peer" doubles its ratio but is not ours: only ours-* rows are gated; "gone"'s case
    # was not measured now (listed, not failed); "new" has no baseline (listed).
    result = compare.compare_results(
        _gate_doc({"a": 1.0, "b": 1.0, "c": 1.0, "gone": 1.0, "peer": 1.0}),
        _gate_doc({"a": 1.05, "b": 1.2, "c": 0.8, "new": 1.0, "peer": 2.0}), 0.1)
    assert [c.key for c in result.regressions] == ["b"]
    assert [c.key for c in result.improvements] == ["c"]
    assert [c.key for c in result.unchanged] == ["a"]
    assert result.only_in_baseline == ["gone"] and result.only_in_new == ["new"]
    assert not result.lost and not result.errors and not result.ok
    assert "+20.0%, round-to-round noise 3%" in result.format()


def test_compare_fails_when_a_gated_row_stops_being_measured():
    """A baseline row whose case and shape ran again but which is skipped now (a kernel
    that stopped registering, an out-of-memory) used to be listed and pass."""
    result = compare.compare_results(_gate_doc({"a": 1.0, "b": 0.5}),
                                     _gate_doc({"a": 1.0, "b": None}, statuses={"b": "skipped"}),
                                     0.1)
    assert not result.ok and result.lost and result.lost[0].startswith("b ")
    assert "skipped: CUDA needed" in result.lost[0] and "LOST" in result.format()


@pytest.mark.parametrize("change, text", [
    (dict(slug="cpu-other-4t"), "the baseline's device is cpu-x, this run's is cpu-other-4t"),
    (dict(busy=0.6), "this run was measured while other processes kept 60% of the CPUs busy"),
])
def test_compare_refuses_runs_that_are_not_comparable(change, text):
    """A baseline from another machine, or a run on a loaded machine (whose ratios flatten
    toward 1.0: a 4x slower op once showed as a 95% improvement), was gated anyway."""
    result = compare.compare_results(_gate_doc({"a": 1.0}), _gate_doc({"a": 4.0}, **change), 0.1)
    assert not result.ok and not result.regressions
    assert any(text in e for e in result.errors), result.errors
    other_model = _gate_doc({"a": 1.0})
    other_model["settings"]["model"] = "tiny"
    assert any("model is base, this run's is tiny" in e
               for e in compare.compare_results(_gate_doc({"a": 1.0}), other_model, 0.1).errors)


def test_compare_fails_when_nothing_was_compared():
    result = compare.compare_results(_gate_doc({"a": 1.0}), _gate_doc({"z": 1.0}), 0.1)
    assert not result.ok and "the gate would compare nothing" in result.format()


def test_schema_refuses_duplicate_keys_and_bad_reference_ratios(tmp_path, capsys, fake_timer):
    path, _ = _mocked_result(tmp_path, capsys)
    doc = json.load(open(path))
    doc["rows"].append(dict(doc["rows"][0]))
    assert any("repeats rows[0]" in p for p in schema.validate_result(doc))
    doc = json.load(open(path))
    reference = next(r for r in doc["rows"] if r["is_reference"] and r["status"] == "ok")
    reference["ratio_to_reference"] = 7.0
    assert any("a reference row's ratio is 1.0" in p for p in schema.validate_result(doc))
    doc = json.load(open(path))
    doc["ceilings"]["copy"]["bytes_per_s"] = -1
    assert any("ceilings.copy.bytes_per_s" in p for p in schema.validate_result(doc))


def test_an_invalid_result_leaves_the_previous_files_intact(tmp_path, capsys, fake_timer):
    path, _ = _mocked_result(tmp_path, capsys)
    before = open(path, "rb").read()
    doc = json.load(open(path))
    doc["rows"].append(dict(doc["rows"][0]))  # duplicate key: invalid
    with pytest.raises(ValueError, match="repeats"):
        report.write_outputs(doc, str(tmp_path), plots=False)
    assert open(path, "rb").read() == before
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_default_selection_keeps_the_plain_file_name():
    doc = {"device": {"slug": "cpu-x"}, "date": "2026-11-23",
           "settings": {"argv": ["--out", "o", "--compare", "b.json"], "model": "base",
                        "dtype": "fp32", "cases": ["encoder"], "seq": [128], "batch": [2]}}
    assert report.output_stem(doc) == "cpu-x-2026-11-23"
    doc["settings"]["argv"] = ["--seq", "128"]
    assert report.output_stem(doc) == "cpu-x-2026-11-23-base-fp32-encoder-s128-b2"


def test_max_regression_without_compare_is_refused(capsys, no_interpreter):
    with pytest.raises(SystemExit):
        bench_cli.main(["--max-regression", "10%", "--device", "cpu"])
    assert "only meaningful with --compare" in capsys.readouterr().err


@pytest.mark.parametrize("text, value", [("10%", 0.1), ("0.1", 0.1), (0.25, 0.25), ("2.5 %", 0.025)])
def test_parse_max_regression(text, value):
    assert compare.parse_max_regression(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["10", "-5%", "0", "abc", "%"])
def test_parse_max_regression_rejects(text):
    with pytest.raises(ValueError):
        compare.parse_max_regression(text)


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, option", [
    (["--seq", "0"], "--seq"),
    (["--seq", "abc"], "--seq"),
    (["--seq", "4096"], "--seq"),
    (["--batch", "-1"], "--batch"),
    (["--dtype", "fp64"], "--dtype"),
    (["--dtype", "fp16"], "--dtype"),
    (["--model", "huge"], "--model"),
    (["--max-regression", "ten"], "--max-regression"),
    (["--max-regression", "10"], "--max-regression"),
    (["--ops", "attention,warp_drive"], "--ops"),
    (["--device", "tpu"], "--device"),
    (["--compare", "no/such/baseline.json"], "--compare"),
    (["--bogus"], "--bogus"),
])
def test_bad_arguments_exit_2_naming_the_option(argv, option, capsys, fake_timer):
    with pytest.raises(SystemExit) as exc:
        bench_cli.main(["--device", "cpu", *argv])
    assert exc.value.code == 2
    assert option in capsys.readouterr().err
    assert not fake_timer  # nothing ran


def test_console_script_forwards_to_the_suite(capsys, fake_timer):
    with pytest.raises(SystemExit) as exc:
        spanbert_cli.main(["bench", "--seq", "0"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "spanbert-fast bench" in err and "--seq" in err
    with pytest.raises(SystemExit) as exc:
        spanbert_cli.main(["bench", "--help"])
    assert exc.value.code == 0
    assert "--max-regression" in capsys.readouterr().out
    assert spanbert_cli.main(["bench", "--list"]) == 0
    assert "span_boundary_head" in capsys.readouterr().out
    assert spanbert_cli.main([]) == 2  # no command: the help, listing bench
    assert "bench" in capsys.readouterr().out


def test_interpreter_is_refused(monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    code = bench_cli.main(["--device", "cpu", "--ops", "layer_norm"])
    assert code == 2
    assert "TRITON_INTERPRET" in capsys.readouterr().err


def test_defaults_on_cpu(no_interpreter):
    parser = bench_cli.build_parser()
    settings, baseline = bench_cli.settings_from_args(parser, parser.parse_args(["--device", "cpu"]))
    assert settings.quick is True  # quick is the CPU default
    assert settings.dtype == "fp32"
    assert settings.seqs == _sub("settings").DEFAULT_SHAPES[("cpu", True)]["seqs"]
    assert baseline is None
    assert list(settings.cases) == list(registry.CASES)
    settings, _ = bench_cli.settings_from_args(
        parser, parser.parse_args(["--device", "cpu", "--no-quick", "--ops", "ops",
                                   "--seq", "8,16", "32", "--batch", "1", "2"]))
    assert settings.quick is False and settings.seqs == (8, 16, 32) and settings.batches == (1, 2)
    assert set(settings.cases) == {n for n, c in registry.CASES.items() if c.group == "ops"}


def test_sampler_rows_appear_once_the_sampler_exists(tmp_path, capsys, fake_timer):
    try:
        from spanbert_fast import masking
    except Exception:  # noqa: BLE001
        masking = None
    code, out, _ = _run_main(TINY + ["--ops", "sampler", "--out", str(tmp_path), "--no-plots"],
                             capsys)
    assert code == 0
    doc = json.load(open(next(tmp_path.glob("*.json"))))
    if masking is None or not hasattr(masking, "SpanMasker"):
        assert [c["case"] for c in doc["skipped_cases"]] == ["span_masking"]
        assert "SpanMasker" in out
    else:
        ok = {r["variant"] for r in doc["rows"] if r["status"] == "ok"}
        assert "ours" in ok and doc["skipped_cases"] == []


def test_a_registered_case_adds_rows_without_plumbing_changes(tmp_path, capsys, fake_timer,
                                                              monkeypatch):
    def build(state, shape, mode, ctx):
        x = torch.randn(shape.batch, shape.seq)
        return registry.Instance(inputs=[x], variants={"ours": lambda t: t * 2,
                                                       "peer": lambda t: t + t},
                                 speed_reference="peer", oracle="peer", oracle_name="peer",
                                 tokens=shape.batch * shape.seq, bytes=2.0 * x.numel() * 4,
                                 bound="memory")

    case = registry.Case(name="doubling", group="ops", modes=("fwd",), build_instance=build,
                         shapes=lambda ctx: [registry.Shape(b, s) for s in ctx.settings.seqs
                                             for b in ctx.settings.batches],
                         description="x * 2 vs x + x")
    monkeypatch.setitem(registry.CASES, "doubling", case)
    code, out, _ = _run_main(TINY + ["--ops", "doubling", "--out", str(tmp_path), "--no-plots"],
                             capsys)
    assert code == 0
    doc = json.load(open(next(tmp_path.glob("*.json"))))
    assert [(r["variant"], r["parity_error"]) for r in doc["rows"]] == [("ours", 0.0), ("peer", 0.0)]
    assert "doubling" in out


# --------------------------------------------------------------------------------------
# One real run: a single small op case, --quick, on CPU, every output written
# --------------------------------------------------------------------------------------
def test_real_quick_cpu_run_writes_json_md_png(tmp_path, capsys, no_interpreter):
    code, out, err = _run_main(["--ops", "bias_gelu", "--model", "tiny", "--seq", "32", "64",
                                "--batch", "2", "--quick", "--device", "cpu", "--out",
                                str(tmp_path), "--no-progress"], capsys)
    assert code == 0, err
    stems = {p.name.split(".")[0] for p in tmp_path.iterdir()}
    assert len(stems) == 2  # <slug>-<date> and <slug>-<date>-speedup
    json_path = next(tmp_path.glob("*.json"))
    doc = schema.load_result(str(json_path))
    ok = [r for r in doc["rows"] if r["status"] == "ok"]
    assert len(ok) == 2 * 2 * 3  # 2 seqs x (fwd, fwd+bwd) x (ours-torch, reference, torch-gelu)
    assert all(r["time_s"] > 0 and r["bytes_per_s"] > 0 and r["utilisation"] > 0 for r in ok)
    assert all(r["parity_error"] < 1e-5 for r in ok)
    assert doc["ceilings"]["matmul"]["flops_per_s"] > 1e8
    md = json_path.with_suffix(".md").read_text()
    assert "| bias_gelu |" in md and "speedup.png" in md and "not measured" in md
    png = next(tmp_path.glob("*-speedup.png"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "bias_gelu" in out and "wrote" in out


def test_committed_baselines_and_results_are_valid_and_were_taken_idle():
    """What we ship must load under the current schema and pass the gate's own checks (an
    idle machine); a baseline against itself compares every gated row and passes."""
    root = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks")
    paths = [os.path.join(root, "baselines", f) for f in os.listdir(os.path.join(root, "baselines"))
             if f.endswith(".json")]
    # (audit-*.json are compile audits, with their own format: tests/kernels/test_audit.py.)
    paths += [os.path.join(root, "results", f) for f in os.listdir(os.path.join(root, "results"))
              if f.endswith(".json") and not f.startswith("audit-")]
    assert paths
    for path in paths:
        doc = schema.load_result(path)
        result = compare.compare_results(doc, doc, 0.1)
        assert result.ok and result.compared > 0 and not result.lost, (path, result.format())


def test_an_incomparable_baseline_is_refused_before_any_timing(capsys, fake_timer):
    baseline = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "baselines",
                            "cpu.json")  # model base
    code, _, err = _run_main(TINY + ["--ops", "layer_norm", "--compare", baseline], capsys)
    assert code == 2 and "model is base, this run's is tiny" in err
    assert fake_timer == [], "nothing may be timed for a run that cannot be gated"


# --------------------------------------------------------------------------------------
# Real-length cases: real English text, WordPiece, packed and padded layouts
# --------------------------------------------------------------------------------------
real_text = _sub("cases.real_text")


def test_real_text_has_the_documented_length_distribution():
    """The numbers real_text's docstring states, so a change of text or vocabulary that
    moves them fails here instead of silently changing what the rows measure."""
    assert real_text.unavailable_reason() is None
    assert len(real_text.paragraphs()) > 700 and len(real_text.sentences()) > 1500
    lengths = [len(ids) + 2 for ids in real_text.tokenizer().encode_batch(real_text.sentences())]
    assert 27 < sum(lengths) / len(lengths) < 31
    shares = {}
    for batch in (16, 64):
        gen = torch.Generator().manual_seed(0)
        draws = [real_text.sentence_batch(batch, gen)[1] for _ in range(20)]
        shares[batch] = sum(float(m.float().mean()) for m in draws) / len(draws)
        for mask in draws:  # right padding to the longest row, every row starts with a token
            assert mask.shape[0] == batch and bool(mask[:, 0].all())
            assert int(mask.sum(1).max()) == mask.shape[1]
            assert torch.equal(mask, mask.sort(dim=1, descending=True).values)
    assert 0.35 < shares[16] < 0.55 and 0.28 < shares[64] < 0.45


def test_qa_windows_are_question_then_context():
    tok = real_text.tokenizer()
    ids, mask, types = real_text.qa_windows(3, torch.Generator().manual_seed(1), 384)
    assert ids.shape == mask.shape == types.shape == (3, 384)
    for row in range(3):
        length = int(mask[row].sum())
        real = ids[row, :length].tolist()
        assert real[0] == tok.cls_id and real[-1] == tok.sep_id and real.count(tok.sep_id) == 2
        first_sep = real.index(tok.sep_id)
        assert types[row, :first_sep + 1].eq(0).all() and types[row, first_sep + 1:length].eq(1).all()
        assert ids[row, length:].eq(0).all() and types[row, length:].eq(0).all()
    again = real_text.qa_windows(3, torch.Generator().manual_seed(1), 384)
    assert torch.equal(again[0], ids)


def test_real_length_cases_give_packed_and_padded_rows_with_parity(tmp_path, capsys,
                                                                   fake_timer):
    code, out, err = _run_main(TINY + ["--ops", "encoder-sentences,encoder-qa-windows",
                                       "--batch", "16", "--out", str(tmp_path), "--no-plots"],
                               capsys)
    assert code == 0, err
    doc = json.load(open(os.path.join(tmp_path, [f for f in os.listdir(tmp_path)
                                                 if f.endswith(".json")][0])))
    ok = [r for r in doc["rows"] if r["status"] == "ok"]
    for case in ("encoder-sentences", "encoder-qa-windows"):
        rows = [r for r in ok if r["case"] == case]
        assert {r["variant"] for r in rows} == {"ours-packed", "ours-padded",
                                                 "transformers-eager", "transformers-sdpa"}
        assert {r["mode"] for r in rows} == {"fwd", "fwd+bwd"}
        for row in rows:
            assert row["parity_error"] is not None and row["parity_error"] < 1e-5, row
            assert 10 < row["shape"]["real_tokens_pct"] < 90
            assert row["shape"]["batch"] == 16  # an explicit --batch sets the rows' sizes
