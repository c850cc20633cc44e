"""The CUDA path of a worker's job process, on a machine with an NVIDIA GPU.

    python bench/gpu_smoke.py [--out FILE]

Runs `python -m worker.runner` exactly as the supervisor does (spec on stdin, reports on a pipe, no database or
broker credentials) with device "cuda" on the example CNN, and checks that the job process picked the GPU, the
job succeeded, and that this parent process never imported torch (no CUDA before a fork). Prints a JSON summary.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_job_process(spec: dict) -> list[dict]:
    read_fd, write_fd = os.pipe()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILLERY_")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "worker.runner", str(write_fd)], stdin=subprocess.PIPE,
                            pass_fds=(write_fd,), cwd=spec["work_dir"], env=env)
    os.close(write_fd)
    proc.stdin.write(json.dumps(spec).encode())
    proc.stdin.close()
    with os.fdopen(read_fd) as f:
        reports = [json.loads(line) for line in f]
    proc.wait()
    return reports


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    subprocess.run([sys.executable, "-m", "worker.examples", "--out", str(tmp / "ex")], check=True, cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL)
    summary: dict = {"python": platform.python_version(), "torch_in_parent": "torch" in sys.modules}
    for method, dataset in (("static_int8", True), ("dynamic_int8", False)):
        work = tmp / method
        work.mkdir()
        spec = {"kind": "quantize", "model_path": str(tmp / "ex" / "digits_cnn.onnx"), "model_format": "onnx",
                "dataset_path": str(tmp / "ex" / "digits.npz") if dataset else None,
                "config": {"method": method, "benchmark": {"batch_sizes": [1, 64], "repeats": 50, "warmup": 5}},
                "device": "cuda", "work_dir": str(work)}
        t0 = time.perf_counter()
        reports = run_job_process(spec)
        final = reports[-1]
        device = next((r["device"] for r in reports if r["type"] == "device"), None)
        entry = {"seconds": round(time.perf_counter() - t0, 2), "device": device, "outcome": final["type"]}
        if final["type"] == "result":
            m = final["metrics"]
            entry.update(execution_provider=m.get("execution_provider"), ratios=m.get("ratios"),
                         accuracy=(m["baseline"].get("accuracy"), m["result"].get("accuracy")), notes=m.get("notes"))
        else:
            entry["error"] = final
        summary[method] = entry
    summary["torch_in_parent_after"] = "torch" in sys.modules
    ok = (not summary["torch_in_parent_after"]
          and all(summary[m]["outcome"] == "result" and str(summary[m]["device"]).startswith("cuda")
                  for m in ("static_int8", "dynamic_int8")))
    summary["ok"] = ok
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
