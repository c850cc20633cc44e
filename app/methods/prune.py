"""The prune methods. They share one set of keys (as the API has always accepted); each reads the ones it needs."""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from .base import FineTuneConfig, MethodConfig


class PruneBase(MethodConfig):
    kind: ClassVar[str] = "prune"

    sparsity: float = Field(0.5, ge=0.0, le=0.99, description="Target sparsity (magnitude).")
    ratio: float = Field(0.5, gt=0.0, le=0.9, description="Fraction of channels removed (channels).")
    scope: Literal["global", "layer"] = Field("global", description="Rank weights across all layers or per layer "
                                              "(magnitude).")
    round_to: int = Field(8, ge=1, le=256, description="Kept channel counts are rounded to a multiple of this "
                          "(channels).")
    fine_tune: FineTuneConfig | None = Field(None, description="Train after pruning (needs a dataset).")


class MagnitudeConfig(PruneBase):
    """magnitude: unstructured, zeroes the smallest weights to `sparsity`."""

    method: Literal["magnitude"] = "magnitude"


class ChannelsConfig(PruneBase):
    """channels: structured, removes `ratio` of the channels/neurons across dependent layers."""

    method: Literal["channels"] = "channels"
