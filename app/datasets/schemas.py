from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field


class ArrayInfo(BaseModel):
    shape: list[int]
    dtype: str


class DatasetOut(BaseModel):
    id: str
    name: str
    size_bytes: int
    sha256: str
    owner: str
    created_at: datetime
    arrays: dict[str, ArrayInfo]
    inputs: list[str] = Field(description="Arrays that feed the model (`x`, or one per model input).")
    n_samples: int
    n_test: int = Field(description="Held-out samples given in the file (0: the worker makes a seeded 80/20 split).")
    split: str
    has_labels: bool
    num_classes: int | None
