"""The query parameters of list routes (a cursor, a page size, label filters) and the next page's cursor."""
from __future__ import annotations

from typing import Annotated

from fastapi import Query

from app.core.ids import ID_PATTERN

CursorQuery = Annotated[str | None, Query(pattern=ID_PATTERN, description="`next_cursor` of the previous page.")]
LimitQuery = Annotated[int, Query(ge=1, le=200, description="Items per page.")]
LabelQuery = Annotated[list[str] | None, Query(
    max_length=20, description="Only resources with this label: `key:value`, or `key` (any value). Repeat to require "
                               "several (AND).")]


def next_cursor(rows: list, limit: int) -> str | None:
    return rows[-1].id if len(rows) == limit else None
