from __future__ import annotations

from typing import Annotated

from fastapi import Query
from pydantic import BaseModel, Field

LabelQuery = Annotated[list[str] | None, Query(
    max_length=20, description="Only resources with this label: `key:value`, or `key` (any value). Repeat to require "
                               "several (AND).")]


class LabelsPatch(BaseModel):
    labels: dict[str, str | None] = Field(description="JSON merge patch of the labels: a string sets a key, null "
                                                      "removes it; keys not named are kept.")
