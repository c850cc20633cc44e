"""Where the time goes in the MNIST CNN, fp32 vs static int8 (ONNX Runtime's own profiler, per node).

The CNN and the static QDQ int8 quantization are those of bench/quality_quantize.py (the direct library call);
the CNN is trained briefly (1 epoch on 5,000 images: the op times do not depend on the weights). Prints each
model's share of kernel time per node at batch 64, 2 threads.

    .venv/bin/python bench/profile_int8_cnn.py [--runs 50]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality_quantize import direct_static, export_onnx, mnist_arrays, train_mnist_cnn  # noqa: E402


def node_shares(path: Path, x: np.ndarray, runs: int) -> tuple[dict[str, float], float]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.enable_profiling = True
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        sess.run(None, {"input": x})
    trace = Path(sess.end_profiling())
    per_node: collections.Counter = collections.Counter()
    for event in json.loads(trace.read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_node[f'{event["args"]["op_name"]} {event["name"].removesuffix("_kernel_time")}'] += event["dur"]
    trace.unlink()
    total = sum(per_node.values())
    return {k: v / total for k, v in per_node.most_common()}, total / runs / 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=50)
    args = ap.parse_args()
    x, y, xt, _ = mnist_arrays()
    with tempfile.TemporaryDirectory(prefix="profile-int8-") as tmp:
        work = Path(tmp)
        os.chdir(work)  # onnxruntime's shape inference may leave a temp file in the working folder
        model = train_mnist_cnn(x[:5000], y[:5000], epochs=1)
        fp32 = export_onnx(model, {"input": x[:2]}, work / "cnn.onnx", {"input": {0: "batch"}, "logits": {0: "batch"}},
                           ["logits"])
        int8 = direct_static(fp32, x[:512], work / "cnn.int8.onnx", "input")
        for name, path in (("fp32", fp32), ("static int8 (QDQ)", int8)):
            shares, ms = node_shares(path, xt[:64], args.runs)
            print(f"{name}: {ms:.2f} ms of kernel time per batch of 64")
            for node, share in list(shares.items())[:8]:
                print(f"  {share:6.1%}  {node}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
