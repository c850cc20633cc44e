from __future__ import annotations

from pydantic import BaseModel, Field


class LabelsPatch(BaseModel):
    labels: dict[str, str | None] = Field(description="JSON merge patch of the labels: a string sets a key, null "
                                                      "removes it; keys not named are kept.")
