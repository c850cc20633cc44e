"""Baseline for bench/polling.py: a FastAPI app whose one route returns a constant dict (no I/O, no DB).

Served exactly like the API: `uvicorn bench.const_app:app --workers 2 --log-level info`.
The constant has the shape and about the size of a queued job's JSON, so both send similar bytes.
"""
from fastapi import FastAPI

app = FastAPI()

CONST = {
    "id": "01JBENCHCONST000000000000000", "kind": "quantize", "status": "queued",
    "model_id": "01JBENCHMODEL000000000000000", "dataset_id": None,
    "config": {"method": "dynamic_int8", "calibration": {"samples": 512, "method": "minmax"}, "per_channel": True,
               "max_accuracy_drop": 0.01, "output_format": "onnx",
               "benchmark": {"batch_sizes": [1], "repeats": 1, "warmup": 0}},
    "device_requested": "auto", "progress": 0.0, "stage": "queued", "attempts": 0, "max_attempts": 3,
    "error": None, "metrics": None, "artifact_id": None, "worker": None, "device": None, "owner": "default",
    "created_at": "2026-01-01T00:00:00.000000Z", "started_at": None, "finished_at": None,
    "updated_at": "2026-01-01T00:00:00.000000Z",
}


@app.get("/const")
async def const():
    return CONST
