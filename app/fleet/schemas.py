from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field


class MethodCapability(BaseModel):
    kind: str
    method: str
    input_formats: list[str]
    output_formats: list[str]
    devices: list[str] = Field(description="Devices of live workers that run this method.")


class WorkerOut(BaseModel):
    name: str
    queues: list[str]
    device: str
    live: bool
    started_at: datetime
    last_seen_at: datetime
    builtin_datasets: dict[str, bool] = {}
    sandbox: dict[str, Any] | None = Field(None, description="The job sandbox on this worker: its mode (strict or "
                                           "permissive), which layers it has (namespaces, landlock, seccomp, "
                                           "rlimits, python_isolated), what its start-up self-test found, and "
                                           "whether it runs formats whose loading runs the uploader's code "
                                           "(TorchScript). See docs/security.md.")


class CapabilitiesOut(BaseModel):
    methods: list[MethodCapability] = Field(description="format x method x device combinations the live workers run.")
    builtin_datasets: dict[str, bool] = Field(description="Built-in datasets installed on at least one live worker.")
    workers: list[WorkerOut]
