"""The before/after table of a job's metrics (the report the worker measured: docs/api.md, "The report")."""
from __future__ import annotations

from typing import Any

from app.client.progress import human_bytes


def _num(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.1f}%"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f} ms"


def _ratio(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.2f}x" if x >= 0.1 else f"{x:.2g}x"


def _float(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def report_rows(metrics: dict[str, Any] | None) -> list[tuple[str, str, str, str]]:
    """(metric, baseline, result, change) rows: size, params, MACs, p50 latency per batch size with the speedup,
    accuracy, F1, agreement, cosine, SQNR, peak memory. Rows whose figures are absent on both sides are left out."""
    if not metrics:
        return []
    base: dict[str, Any] = metrics.get("baseline") or {}
    res: dict[str, Any] = metrics.get("result") or {}
    ratios: dict[str, Any] = metrics.get("ratios") or {}
    rows: list[tuple[str, str, str, str]] = []

    def add(name: str, key: str, fmt, change: str) -> None:
        if base.get(key) is not None or res.get(key) is not None:
            rows.append((name, fmt(base.get(key)), fmt(res.get(key)), change))

    add("size", "size_bytes", human_bytes, _ratio(ratios.get("size")))
    add("params", "params", _num, _ratio(ratios.get("params")))
    add("MACs", "macs", _num, _ratio(ratios.get("macs")))
    speedup = ratios.get("speedup") or {}
    base_lat = base.get("latency_ms") or {}
    res_lat = res.get("latency_ms") or {}
    for size in sorted(set(base_lat) | set(res_lat), key=lambda s: int(s) if str(s).isdigit() else 0):
        s = speedup.get(size)
        change = "-" if s is None else f"{s:.2f}x {'faster' if s >= 1 else 'SLOWER'}"
        rows.append((f"latency p50 @ batch {size}", _ms((base_lat.get(size) or {}).get("p50")),
                     _ms((res_lat.get(size) or {}).get("p50")), change))
    if base.get("accuracy") is not None or res.get("accuracy") is not None:
        drop = metrics.get("accuracy_drop")
        change = "-" if drop is None else f"{-drop * 100:+.1f} pt"
        rows.append(("accuracy", _pct(base.get("accuracy")), _pct(res.get("accuracy")), change))
    add("F1 (macro)", "f1_macro", lambda v: _float(v, 3), "")
    add("agreement (top-1)", "agreement", _pct, "")
    add("cosine", "cosine", _float, "")
    add("SQNR", "sqnr_db", lambda v: "-" if v is None else f"{v:.1f} dB", "")
    add("peak memory", "peak_memory_bytes", human_bytes, _ratio(ratios.get("peak_memory")))
    return rows


def format_report(metrics: dict[str, Any] | None) -> str:
    """The table as text, with the report's warnings (slower than the baseline, over the accuracy budget)."""
    rows = report_rows(metrics)
    if not rows:
        return "(no metrics)"
    header = ("metric", "baseline", "result", "change")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
             for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    assert metrics is not None
    if metrics.get("slower_than_baseline"):
        lines.append("note: the result is SLOWER than the baseline at some batch size (see 'change')")
    if metrics.get("within_accuracy_budget") is False:
        lines.append(f"note: the accuracy drop exceeds the budget ({metrics.get('max_accuracy_drop')})")
    comparison = (metrics.get("method") or {}).get("comparison") or {}
    if comparison.get("kd") is not None and comparison.get("labels_only") is not None:
        lines.append(f"distilled student {_pct(comparison['kd'])} vs the same student trained on labels alone "
                     f"{_pct(comparison['labels_only'])} ({comparison.get('split', 'test')} accuracy)")
    if metrics.get("baseline_same_runtime"):
        fmt = metrics["baseline_same_runtime"].get("format", "the result's runtime")
        lines.append(f"note: speedups compare with the upload converted to {fmt} (like with like)")
    return "\n".join(lines)
