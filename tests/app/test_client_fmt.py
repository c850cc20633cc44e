"""How the client writes numbers (app.client.fmt) and where it uses it: the report table, the progress bar, the CLI's
text output. The shared spec: binary sizes, two-decimal ratios, one-decimal percentages and signed points (never
-0.0), three-significant-digit latencies, counts with separators."""
from __future__ import annotations

import io
import math
from types import SimpleNamespace

import pytest

from app.client import fmt
from app.client.progress import ProgressBar
from app.client.report import comparison_lines, format_report, params_line, report_rows


@pytest.mark.parametrize("n, text", [
    (0, "0 B"), (1, "1 B"), (512, "512 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (826_368, "807.0 KiB"),
    (845_210, "825.4 KiB"), (1024 * 1024 - 20, "1.0 MiB"),  # 1023.98 KiB is better said in the next unit
    (int(1.2 * 1024 ** 2), "1.2 MiB"), (int(3.4 * 1024 ** 3), "3.4 GiB"), (5 * 1024 ** 4, "5.0 TiB"),
    (None, "-"),
])
def test_sizes_are_binary_with_one_decimal(n, text):
    assert fmt.size(n) == text
    assert "kB" not in fmt.size(n) and "MB" not in fmt.size(n)


@pytest.mark.parametrize("x, text", [
    (0.1, "0.10x"), (0.0999, "0.10x"), (0.099, "0.10x"), (0.10000001, "0.10x"), (1.01, "1.01x"), (4.1234, "4.12x"),
    (0.26, "0.26x"), (0.005, "0.01x"), (0.0049, "<0.01x"), (0.0, "<0.01x"), (12.0, "12.00x"), (None, "-"),
])
def test_ratios_have_two_decimals(x, text):
    assert fmt.ratio(x) == text


@pytest.mark.parametrize("x, text", [
    (0.978, "97.8%"), (0.97849, "97.8%"), (1.0, "100.0%"), (0.0, "0.0%"), (-0.0001, "0.0%"), (0.5, "50.0%"),
    (None, "-"), (math.nan, "-"),
])
def test_percentages_have_one_decimal(x, text):
    assert fmt.percent(x) == text


@pytest.mark.parametrize("delta, text", [
    (0.003, "+0.3 pt"), (-0.012, "-1.2 pt"), (0.0, "+0.0 pt"), (-0.0, "+0.0 pt"), (-0.0003, "+0.0 pt"),
    (0.0004, "+0.0 pt"), (-0.00049, "+0.0 pt"), (0.1, "+10.0 pt"), (None, "-"),
])
def test_points_are_signed_and_never_minus_zero(delta, text):
    assert fmt.points(delta) == text


@pytest.mark.parametrize("x, text", [
    (0.123, "0.123 ms"), (0.12345, "0.123 ms"), (1.234, "1.23 ms"), (1.0, "1.00 ms"), (12.34, "12.3 ms"),
    (123.4, "123 ms"), (100.0, "100 ms"), (999.4, "999 ms"), (999.6, "1,000 ms"), (1234.4, "1,234 ms"),
    (98765.4, "98,765 ms"), (9.996, "10.0 ms"), (0.9996, "1.00 ms"), (99.96, "100 ms"), (0.0123, "0.0123 ms"),
    (None, "-"),
])
def test_latencies_have_three_significant_digits(x, text):
    assert fmt.ms(x) == text


@pytest.mark.parametrize("n, text", [(206_282, "206,282"), (0, "0"), (999, "999"), (1_234_567, "1,234,567"),
                                     (None, "-")])
def test_counts_have_thousands_separators(n, text):
    assert fmt.count(n) == text


def test_speedups_say_which_way():
    assert fmt.speedup(2.0) == "2.00x faster" and fmt.speedup(0.8) == "0.80x SLOWER"
    assert fmt.speedup(0.001) == "<0.01x SLOWER" and fmt.speedup(None) == "-"


# -- the report ----------------------------------------------------------------------------------------------------

METRICS = {
    "baseline": {"size_bytes": 845_210, "params": 206_282, "macs": 2_000_000, "accuracy": 0.978,
                 "latency_ms": {"1": {"p50": 0.1234}, "64": {"p50": 12.34}}, "peak_memory_bytes": 3 * 1024 ** 2},
    "result": {"size_bytes": 84_521, "params": 206_282, "quant_params": 1_074, "macs": None, "accuracy": 0.9779,
               "agreement": 0.9951, "cosine": 0.99912, "sqnr_db": 31.25,
               "latency_ms": {"1": {"p50": 0.0617}, "64": {"p50": 1234.4}}, "peak_memory_bytes": 1024 ** 2},
    "ratios": {"size": 0.0999, "params": 1.0, "speedup": {"1": 2.0, "64": 0.00999}, "peak_memory": 0.333},
    "accuracy_drop": 0.0001, "slower_than_baseline": True,
}


def test_report_rows_use_the_shared_formats():
    rows = {r[0]: r[1:] for r in report_rows(METRICS)}
    assert rows["size"] == ("825.4 KiB", "82.5 KiB", "0.10x")
    assert rows["params"] == ("206,282", "206,282", "1.00x")
    assert rows["MACs"] == ("2,000,000", "-", "")
    assert rows["latency p50 @ batch 1"] == ("0.123 ms", "0.0617 ms", "2.00x faster")
    assert rows["latency p50 @ batch 64"] == ("12.3 ms", "1,234 ms", "0.01x SLOWER")
    assert rows["accuracy"] == ("97.8%", "97.8%", "+0.0 pt")  # a drop of 0.01 pt: never "-0.0 pt"
    assert rows["agreement (top-1)"] == ("-", "99.5%", "")
    assert rows["peak memory"] == ("3.0 MiB", "1.0 MiB", "0.33x")
    assert rows["SQNR"] == ("-", "31.3 dB", "") and rows["cosine"] == ("-", "0.9991", "")


def test_report_text_has_the_scales_and_zero_points_line():
    text = format_report(METRICS)
    assert "Parameters 206,282 -> 206,282 (1.00x), plus 1,074 scales and zero points" in text.splitlines()
    assert "SLOWER than the baseline" in text
    for wrong in ("kB", " MB", "-0.0", "0.1x", "0.099x"):
        assert wrong not in text, wrong


def test_params_line_only_with_quant_params():
    assert params_line({"baseline": {"params": 10}, "result": {"params": 10}}) is None
    assert params_line({"baseline": {"params": 10}, "result": {"params": 10, "quant_params": 0}}) is None
    assert params_line(None) is None
    # no ratio in the report: computed from the counts
    assert params_line({"baseline": {"params": 2_000}, "result": {"params": 1_000, "quant_params": 12}}) == \
        "Parameters 2,000 -> 1,000 (0.50x), plus 12 scales and zero points"


def test_accuracy_change_is_computed_when_the_drop_is_absent():
    rows = {r[0]: r[1:] for r in report_rows({"baseline": {"accuracy": 0.9}, "result": {"accuracy": 0.912}})}
    assert rows["accuracy"] == ("90.0%", "91.2%", "+1.2 pt")
    rows = {r[0]: r[1:] for r in report_rows({"baseline": {"accuracy": 0.9}, "result": {"accuracy": 0.8875},
                                              "accuracy_drop": 0.0125})}
    assert rows["accuracy"][2] == "-1.3 pt"  # -1.25 exactly: half away from zero


def test_exact_halves_round_away_from_zero_like_javascript():
    # Python's round() and format() round exact binary halves to even; (31.25).toFixed(1) is "31.3" in the
    # dashboard, so the client writes the same
    assert fmt.fixed(31.25, 1) == "31.3" and fmt.fixed(0.125, 2) == "0.13" and fmt.fixed(-1.25, 1) == "-1.3"
    assert fmt.size(1.25 * 1024 ** 2) == "1.3 MiB" and fmt.ratio(0.125) == "0.13x"
    assert fmt.points(-0.0125) == "-1.3 pt" and fmt.points(0.0125) == "+1.3 pt"
    assert fmt.ms(2.125) == "2.13 ms" and fmt.count(2.5) == "3"


def test_budget_note_is_in_points():
    text = format_report({"baseline": {"accuracy": 0.9}, "result": {"accuracy": 0.8}, "accuracy_drop": 0.1,
                          "within_accuracy_budget": False, "max_accuracy_drop": 0.01})
    assert "the accuracy drop exceeds the budget of 1.0 pt" in text


def test_distill_comparison_names_the_kept_student_and_why():
    metrics = {"baseline": {"accuracy": 0.97}, "result": {"accuracy": 0.955},
               "method": {"comparison": {"kd": 0.955, "labels_only": 0.9612, "delta": -0.0062, "split": "test",
                                         "kept": "labels_only", "chosen_on": "validation",
                                         "kept_reason": "it scored higher on the validation split."}}}
    lines = comparison_lines(metrics)
    assert lines == ["distilled student 95.5% vs the same student trained on labels alone 96.1% "
                     "(test accuracy, -0.6 pt)",
                     "kept the labels-only student as the artifact (chosen on validation): "
                     "it scored higher on the validation split."]
    assert all(line in format_report(metrics).splitlines() for line in lines)
    metrics["method"]["comparison"].update(kept="kd", kd=0.97, labels_only=0.97, delta=0.0)
    assert comparison_lines(metrics)[0].endswith("(test accuracy, +0.0 pt)")
    assert comparison_lines(metrics)[1].startswith("kept the distilled student as the artifact")


def test_distill_comparison_tolerates_the_older_shape():
    metrics = {"method": {"comparison": {"kd": 0.9, "labels_only": 0.85, "split": "test"}}}
    assert comparison_lines(metrics) == ["distilled student 90.0% vs the same student trained on labels alone "
                                         "85.0% (test accuracy, +5.0 pt)"]
    assert comparison_lines({"method": {}}) == [] and comparison_lines(None) == []


# -- the progress bar and the CLI's text ---------------------------------------------------------------------------


def test_progress_bar_uses_binary_sizes_and_one_decimal():
    stream = io.StringIO()
    bar = ProgressBar(stream, enabled=True, min_interval_s=0)
    callback = bar.upload("uploading m.onnx")
    callback(0, 845_210)
    callback(422_605, 845_210)
    callback(845_210, 845_210)
    drawn = stream.getvalue().split("\r")
    assert "50.0%" in drawn[2] and "412.7 KiB / 825.4 KiB" in drawn[2]
    assert "100.0%" in drawn[3] and "825.4 KiB / 825.4 KiB" in drawn[3]
    assert "kB" not in stream.getvalue()


def test_cli_text_uses_the_shared_formats():
    from datetime import datetime, timezone

    from app.client.commands import _dataset_text, _job_text, _model_text, _table

    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    spec = SimpleNamespace(name="x", dtype="float32", shape=["N", 64])
    model = SimpleNamespace(id="b" * 32, name="m", format="onnx", size_bytes=845_210, sha256="0" * 64, owner="o",
                            created_at=now, labels={}, inspection=SimpleNamespace(inputs=[spec], outputs=[],
                                                                                  params=206_282))
    text = _model_text(model)
    assert "size      825.4 KiB (845,210 bytes)" in text and "params    206,282" in text
    data = SimpleNamespace(id="c" * 32, name="d", size_bytes=2_000_000, sha256="1" * 64, n_samples=1_437,
                           n_test=360, split="given", inputs=["x"], has_labels=True, num_classes=10, created_at=now,
                           arrays={})
    text = _dataset_text(data)
    assert "size      1.9 MiB" in text and "samples   1,437 (+360 test" in text
    job = SimpleNamespace(id="a" * 32, kind="quantize", status="running", progress=0.4567, stage="timing",
                          model_id="b" * 32, dataset_id=None, config={}, device=None, device_requested="auto",
                          attempts=1, max_attempts=3, created_at=now, finished_at=None, labels={}, error=None,
                          artifact_id=None, metrics=None)
    assert "progress  45.7%  timing" in _job_text(job)
    assert _table([["a", fmt.size(826_368)]], ["ID", "SIZE"]).splitlines()[1].endswith("807.0 KiB")
