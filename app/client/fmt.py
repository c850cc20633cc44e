"""How the client writes numbers: one function per kind of figure, shared by the report table, the progress bar
and the CLI's listings, so that the CLI, the SDK's report and the dashboard print the same figure the same way.

    size(845_210)        '825.4 KiB'     binary units, one decimal (bytes as a whole number)
    ratio(0.0999)        '0.10x'         ratios and speedups: two decimals; below 0.005: '<0.01x'
    percent(0.9781)      '97.8%'         accuracy, fidelity, progress: a fraction shown with one decimal
    points(-0.0003)      '+0.0 pt'       a difference of fractions in percentage points, signed, never '-0.0'
    ms(12.345)           '12.3 ms'       latencies: three significant digits; from 1,000 ms whole, with separators
    count(206282)        '206,282'       counts: thousands separators

Every function writes None (a figure that was not measured) as '-'. Rounding is half away from zero on the exact
binary value of the float, as JavaScript's toFixed/toPrecision do, so that the dashboard can match it digit for digit
(Python's round() and format() would round exact halves such as 31.25 to even).
"""
from __future__ import annotations

import math
from decimal import ROUND_HALF_UP, Decimal

MISSING = "-"
_SIZE_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB")


def _bad(x: float | None) -> bool:
    return x is None or isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x)


def _round(x: float, digits: int) -> Decimal:
    """`x` rounded to `digits` decimals, half away from zero (JavaScript's toFixed); never -0."""
    value = Decimal(x).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP)
    return value.copy_abs() if value.is_zero() else value


def fixed(x: float, digits: int) -> str:
    """`x` with `digits` decimals, rounded half away from zero: fixed(31.25, 1) == '31.3' (as (31.25).toFixed(1))."""
    return f"{_round(x, digits):f}"


def size(n: float | None) -> str:
    """Bytes in binary units: '512 B', '807.0 KiB', '1.2 MiB', '3.4 GiB' (never kB/MB)."""
    if _bad(n):
        return MISSING
    assert n is not None
    if abs(_round(n, 0)) < 1024:
        return f"{fixed(n, 0)} B"
    value = float(n)
    for unit in _SIZE_UNITS:
        value /= 1024
        # 1023.96 KiB would round to '1024.0 KiB': the next unit says it better ('1.0 MiB')
        if abs(_round(value, 1)) < 1024 or unit == _SIZE_UNITS[-1]:
            return f"{fixed(value, 1)} {unit}"
    raise AssertionError("unreachable")


def ratio(x: float | None) -> str:
    """A ratio or speedup: '0.10x', '1.01x', '4.12x'; below 0.005: '<0.01x'."""
    if _bad(x):
        return MISSING
    assert x is not None
    if x < 0.005:
        return "<0.01x"
    return f"{fixed(x, 2)}x"


def percent(fraction: float | None) -> str:
    """A fraction (0.978) as a percentage with one decimal: '97.8%'."""
    if _bad(fraction):
        return MISSING
    assert fraction is not None
    return f"{fixed(fraction * 100, 1)}%"


def points(delta: float | None) -> str:
    """A difference of two fractions in percentage points, signed: '+0.3 pt', '-1.2 pt', '+0.0 pt' (never '-0.0')."""
    if _bad(delta):
        return MISSING
    assert delta is not None
    value = _round(delta * 100, 1)
    return f"{'-' if value < 0 else '+'}{value.copy_abs():f} pt"


def ms(x: float | None) -> str:
    """A latency in milliseconds with three significant digits: '0.123 ms', '1.23 ms', '12.3 ms', '123 ms';
    from 1,000 ms on, whole milliseconds with separators: '1,234 ms'."""
    if _bad(x):
        return MISSING
    assert x is not None
    if x == 0:
        return "0.00 ms"
    if abs(x) >= 999.5:
        return f"{_round(x, 0):,f} ms"
    # the decimals for three significant digits, after rounding (9.996 is '10.0', not '9.996')
    digits = 2 - math.floor(math.log10(abs(x)))
    if abs(_round(x, digits)) >= Decimal(10) ** (3 - digits):
        digits -= 1
    if digits <= 0 and abs(_round(x, 0)) >= 1000:
        return f"{_round(x, 0):,f} ms"
    return f"{fixed(x, max(0, digits))} ms"


def count(n: float | None) -> str:
    """A count with thousands separators: '206,282'."""
    if _bad(n):
        return MISSING
    assert n is not None
    return f"{_round(n, 0):,f}"


def speedup(x: float | None) -> str:
    """A speedup with its verdict: '2.00x faster', '0.80x SLOWER'."""
    if _bad(x):
        return MISSING
    assert x is not None
    return f"{ratio(x)} {'faster' if x >= 1 else 'SLOWER'}"


__all__ = ["size", "ratio", "percent", "points", "ms", "count", "speedup", "fixed", "MISSING"]
