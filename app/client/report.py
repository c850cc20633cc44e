"""The before/after table of a job's metrics (the report the worker measured: docs/api.md, "The report").
Every figure is written by app.client.fmt, so that the CLI, the SDK and the dashboard agree."""
from __future__ import annotations

import math
from typing import Any

from app.client import fmt


def _float(x: float | None, digits: int = 4) -> str:
    return fmt.MISSING if _num(x) is None else fmt.fixed(x, digits)


def _num(x: Any) -> float | None:
    """A finite number, or None (absent, NaN, or not a number at all)."""
    return x if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def report_rows(metrics: dict[str, Any] | None) -> list[tuple[str, str, str, str]]:
    """(metric, baseline, result, change) rows: size, params, MACs, p50 latency per batch size with the speedup,
    accuracy, F1, agreement, cosine, SQNR, peak memory. Rows whose figures are absent on both sides are left out."""
    if not metrics:
        return []
    base: dict[str, Any] = metrics.get("baseline") or {}
    res: dict[str, Any] = metrics.get("result") or {}
    ratios: dict[str, Any] = metrics.get("ratios") or {}
    rows: list[tuple[str, str, str, str]] = []

    def add(name: str, key: str, show, change: str) -> None:
        if base.get(key) is not None or res.get(key) is not None:
            rows.append((name, show(base.get(key)), show(res.get(key)), change))

    def change(key: str) -> str:
        return "" if ratios.get(key) is None else fmt.ratio(ratios.get(key))

    add("size", "size_bytes", fmt.size, change("size"))
    add("params", "params", fmt.count, change("params"))
    add("MACs", "macs", fmt.count, change("macs"))
    speedup = ratios.get("speedup") or {}
    base_lat = base.get("latency_ms") or {}
    res_lat = res.get("latency_ms") or {}
    for size in sorted(set(base_lat) | set(res_lat), key=lambda s: int(s) if str(s).isdigit() else 0):
        rows.append((f"latency p50 @ batch {size}", fmt.ms((base_lat.get(size) or {}).get("p50")),
                     fmt.ms((res_lat.get(size) or {}).get("p50")), fmt.speedup(speedup.get(size))))
    if base.get("accuracy") is not None or res.get("accuracy") is not None:
        drop = _num(metrics.get("accuracy_drop"))
        if drop is None and _num(base.get("accuracy")) is not None and _num(res.get("accuracy")) is not None:
            drop = base["accuracy"] - res["accuracy"]
        rows.append(("accuracy", fmt.percent(base.get("accuracy")), fmt.percent(res.get("accuracy")),
                     "" if drop is None else fmt.points(-drop)))
    add("F1 (macro)", "f1_macro", lambda v: _float(v, 3), "")
    add("agreement (top-1)", "agreement", fmt.percent, "")
    add("cosine", "cosine", _float, "")
    add("SQNR", "sqnr_db", lambda v: fmt.MISSING if _num(v) is None else f"{fmt.fixed(v, 1)} dB", "")
    add("peak memory", "peak_memory_bytes", fmt.size, change("peak_memory"))
    return rows


def params_line(metrics: dict[str, Any] | None) -> str | None:
    """'Parameters 206,282 -> 206,282 (1.00x), plus 1,074 scales and zero points' for a quantized result that
    reports `quant_params` (the scales and zero points quantization added beside the weights); else None."""
    if not metrics:
        return None
    res = metrics.get("result") or {}
    extra = _num(res.get("quant_params"))
    if not extra:
        return None
    base_n, res_n = _num((metrics.get("baseline") or {}).get("params")), _num(res.get("params"))
    r = _num((metrics.get("ratios") or {}).get("params"))
    if r is None and base_n and res_n is not None:
        r = res_n / base_n
    ratio = f" ({fmt.ratio(r)})" if r is not None else ""
    return (f"Parameters {fmt.count(base_n)} -> {fmt.count(res_n)}{ratio}, "
            f"plus {fmt.count(extra)} scales and zero points")


_STUDENT = {"kd": "the distilled student", "labels_only": "the labels-only student"}


def comparison_lines(metrics: dict[str, Any] | None) -> list[str]:
    """A distill job's `method.comparison` (compare_baseline): both students' accuracy, the difference, and which
    one was kept as the artifact and why. Tolerates the older shape without `kept`."""
    comparison = ((metrics or {}).get("method") or {}).get("comparison") or {}
    kd, lo = _num(comparison.get("kd")), _num(comparison.get("labels_only"))
    if kd is None or lo is None:
        return []
    delta = _num(comparison.get("delta"))
    delta = kd - lo if delta is None else delta
    lines = [f"distilled student {fmt.percent(kd)} vs the same student trained on labels alone {fmt.percent(lo)} "
             f"({comparison.get('split') or 'test'} accuracy, {fmt.points(delta)})"]
    kept = comparison.get("kept")
    if kept:
        chosen_on = comparison.get("chosen_on")
        line = f"kept {_STUDENT.get(kept, kept)} as the artifact" + (f" (chosen on {chosen_on})" if chosen_on else "")
        reason = comparison.get("kept_reason")
        lines.append(line + (f": {reason}" if reason else ""))
    return lines


def format_report(metrics: dict[str, Any] | None) -> str:
    """The table as text, with the report's warnings (slower than the baseline, over the accuracy budget), the
    scales and zero points a quantization added, and a distillation's comparison with labels alone."""
    rows = report_rows(metrics)
    if not rows:
        return "(no metrics)"
    assert metrics is not None
    header = ("metric", "baseline", "result", "change")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
             for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    extra = params_line(metrics)
    if extra:
        lines.append(extra)
    if metrics.get("slower_than_baseline"):
        lines.append("note: the result is SLOWER than the baseline at some batch size (see 'change')")
    if metrics.get("within_accuracy_budget") is False:
        budget = _num(metrics.get("max_accuracy_drop"))
        lines.append("note: the accuracy drop exceeds the budget"
                     + (f" of {fmt.points(budget).lstrip('+')}" if budget is not None else ""))
    lines += comparison_lines(metrics)
    if metrics.get("baseline_same_runtime"):
        runtime = metrics["baseline_same_runtime"].get("format", "the result's runtime")
        lines.append(f"note: speedups compare with the upload converted to {runtime} (like with like)")
    return "\n".join(lines)


__all__ = ["report_rows", "format_report", "params_line", "comparison_lines"]
