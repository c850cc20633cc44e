"""Labels on models and jobs: validation, merge patches and `?label=` filters (their SQL: app/labels/repository.py).

A label set is a JSON object of at most MAX_LABELS string keys and values; the models and jobs services keep them
in their own tables (`replace`) and render them back (`as_dict`).
"""
from __future__ import annotations

import re
from typing import Any

import orjson

from app.core.errors import Unprocessable

MAX_LABELS = 20
MAX_VALUE_CHARS = 255
MAX_FILTERS = 20
KEY_RE = re.compile(r"[a-z0-9_.-]{1,63}")
KEY_RULE = "[a-z0-9_.-]{1,63}"


def _bad(label: str, reason: str, code: str = "invalid_label") -> Unprocessable:
    return Unprocessable(f"label {label!r}: {reason}", code=code, detail={"field": "labels", "label": label,
                                                                        "reason": reason})


def _check_pair(key: Any, value: Any) -> None:
    if not isinstance(key, str) or not KEY_RE.fullmatch(key):
        raise _bad(str(key)[:100], f"keys must match {KEY_RULE}")
    if not isinstance(value, str):
        raise _bad(key, "values must be strings")
    if len(value) > MAX_VALUE_CHARS:
        raise _bad(key, f"values are at most {MAX_VALUE_CHARS} characters")
    if "\x00" in value:
        raise _bad(key, "values must not contain NUL characters")


def _check_count(labels: dict) -> None:
    if len(labels) > MAX_LABELS:
        raise Unprocessable(f"at most {MAX_LABELS} labels per resource (got {len(labels)})", code="invalid_label",
                            detail={"field": "labels", "limit": MAX_LABELS, "count": len(labels)})


def validate(raw: Any) -> dict[str, str]:
    """A label set as given by a client: a JSON object of string keys and values, within bounds."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise Unprocessable('labels must be a JSON object, e.g. {"team": "search"}', code="invalid_label",
                            detail={"field": "labels"})
    for key, value in raw.items():
        _check_pair(key, value)
    _check_count(raw)
    return dict(sorted(raw.items()))


def parse_form_field(text: str | None) -> dict[str, str]:
    """The `labels` form field of an upload: a JSON object."""
    if text is None or not text.strip():
        return {}
    try:
        raw = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise Unprocessable('the labels form field is not valid JSON; send an object, e.g. {"team": "search"}',
                            code="invalid_label", detail={"field": "labels"}) from None
    return validate(raw)


def merge(current: dict[str, str], patch: Any) -> dict[str, str]:
    """JSON merge patch of a label set: a string sets a key, null removes it."""
    if not isinstance(patch, dict):
        raise Unprocessable("labels must be a JSON object", code="invalid_label", detail={"field": "labels"})
    out = dict(current)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
            continue
        _check_pair(key, value)
        out[key] = value
    _check_count(out)
    return dict(sorted(out.items()))


def parse_filters(raw: list[str] | None) -> list[tuple[str, str | None]]:
    """`?label=team:search` (key equals value) or `?label=team` (key present); repeated means AND."""
    if not raw:
        return []
    if len(raw) > MAX_FILTERS:
        raise Unprocessable(f"at most {MAX_FILTERS} label filters", code="invalid_label_filter",
                            detail={"field": "label", "limit": MAX_FILTERS})
    out: list[tuple[str, str | None]] = []
    for item in raw:
        key, sep, value = item.partition(":")
        if not KEY_RE.fullmatch(key) or len(value) > MAX_VALUE_CHARS or "\x00" in value:
            raise _bad(item[:100], f"a filter is key:value or key, the key matching {KEY_RULE}",
                       code="invalid_label_filter")
        out.append((key, value if sep else None))
    return out


def as_dict(label_rows) -> dict[str, str]:
    return {r.key: r.value for r in sorted(label_rows, key=lambda r: r.key)}


def replace(row, label_cls, labels: dict[str, str]) -> None:
    """Make a model's or job's label rows equal `labels` (the relationship's delete-orphan drops removed keys)."""
    existing = {r.key: r for r in row.label_rows}
    keep = []
    for key, value in labels.items():
        r = existing.get(key)
        if r is None:
            r = label_cls(key=key, value=value)
        else:
            r.value = value
        keep.append(r)
    row.label_rows = keep
