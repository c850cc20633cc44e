"""Baseline for bench/upload.py: stream the raw request body to a file. No multipart parsing, no hashing, no checks.

Served like the API under test: `uvicorn bench.stream_app:app --workers 1 --log-level info`.
BENCH_STREAM_DIR names the folder the files go to (the same file system as the API's storage).
"""
import os
import tempfile

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

app = FastAPI()
OUT_DIR = os.environ.get("BENCH_STREAM_DIR") or tempfile.gettempdir()


@app.post("/upload")
async def upload(request: Request):
    fd, path = tempfile.mkstemp(dir=OUT_DIR, prefix="stream-")
    n = chunks = 0
    with os.fdopen(fd, "wb") as f:
        async for chunk in request.stream():
            f.write(chunk)
            n += len(chunk)
            chunks += 1
    return JSONResponse({"bytes": n, "chunks": chunks, "mean_chunk_bytes": n // max(1, chunks), "path": path},
                        status_code=201)
