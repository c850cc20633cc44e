"""Distillation through the engine against the same knowledge distillation written by hand in plain torch.

    .venv/bin/python bench/distill_direct.py [--seeds 0] [--datasets mnist fashion-mnist]   # ~10 min, 2 cores

For each dataset: the teacher of bench/distill_quality.py (same seed, same training), then with the same settings
as that benchmark (the 83.1k-param CNN student, 20,000-row seeded transfer subset, 10 epochs, batch 128, Adam
lr 0.003 with a cosine schedule, T = 4, alpha = 0.9):
- the service's way: a distill job through the engine's `run_job` (what a worker runs);
- by hand: the teacher's logits from onnxruntime, the student written out in torch, Hinton et al.'s loss
  alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE, a plain training loop.
Check: the service's student is no worse than the hand-written one (test accuracy >= by hand - 0.3 points).
Results: bench/results/distill_direct.json.
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._common import mark_start, write_results  # noqa: E402
from bench.distill_quality import DATASETS, DISTILL, TEACHER, TEACHER_SEED, train_teacher  # noqa: E402
from worker.engine import JobSpec, RunContext, run_job  # noqa: E402
from worker.engine.builtin import builtin_available, load_builtin_arrays  # noqa: E402

TOLERANCE_POINTS = 0.3


def by_hand(name: str, teacher_path: Path, seed: int) -> dict:
    """Knowledge distillation as one would write it directly: no engine code."""
    import onnxruntime as ort
    import torch
    from torch import nn
    from torch.nn import functional as F

    cfg = DISTILL
    data = load_builtin_arrays(name)
    index = np.sort(np.random.default_rng(seed).choice(len(data.x_train), cfg["train_samples"], replace=False))
    x_np, y_np = data.x_train[index], data.y_train[index]
    session = ort.InferenceSession(str(teacher_path), providers=["CPUExecutionProvider"])
    feed = session.get_inputs()[0].name
    t_logits = torch.from_numpy(np.concatenate([session.run(None, {feed: x_np[i:i + 512]})[0]
                                                for i in range(0, len(x_np), 512)]))
    torch.manual_seed(seed)
    layers, c_in, side = [], 1, 28
    for c in cfg["student"]["channels"]:  # conv3x3-BN-ReLU-maxpool per block, then a linear head
        layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2)]
        c_in, side = c, side // 2
    student = nn.Sequential(*layers, nn.Flatten(), nn.Linear(c_in * side * side, 10))
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)
    batch, epochs, t, alpha = cfg["batch_size"], cfg["epochs"], cfg["temperature"], cfg["alpha"]
    steps = math.ceil(len(x) / batch)
    optimizer = torch.optim.Adam(student.parameters(), lr=cfg["lr"])
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps * epochs)
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    student.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), batch):
            idx = order[start:start + batch]
            logits = student(x[idx])
            soft = F.kl_div(F.log_softmax(logits / t, 1), F.log_softmax(t_logits[idx] / t, 1), reduction="batchmean",
                            log_target=True) * t * t
            loss = alpha * soft + (1 - alpha) * F.cross_entropy(logits, y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    seconds = time.perf_counter() - started
    student.eval()
    with torch.no_grad():
        pred = torch.cat([student(torch.from_numpy(data.x_test[i:i + 1000])).argmax(1)
                          for i in range(0, len(data.x_test), 1000)])
    return {"accuracy": float((pred.numpy() == data.y_test).mean()),
            "params": int(sum(p.numel() for p in student.parameters())), "train_seconds": round(seconds, 1)}


def service(name: str, teacher_path: Path, seed: int, work: Path) -> dict:
    work.mkdir(parents=True)
    config = {**DISTILL, "seed": seed, "compare_baseline": False}
    spec = JobSpec("distill", teacher_path, "onnx", None, config, builtin_dataset=name)
    result = run_job(spec, RunContext("cpu", work))
    method = result.metrics["method"]
    return {"accuracy": result.metrics["result"]["accuracy"], "params": method["params"]["student"],
            "train_seconds": method["train_seconds"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    args = parser.parse_args(argv)
    mark_start()
    missing = [d for d in args.datasets if not builtin_available()[d]]
    if missing:
        print(f"built-in datasets not installed: {', '.join(missing)}", file=sys.stderr)
        return 2
    runs = []
    with tempfile.TemporaryDirectory(prefix="distill-direct-") as tmp:
        for name in args.datasets:
            teacher = train_teacher(name, TEACHER["epochs"], Path(tmp))
            print(f"== {name}: teacher {teacher['test_accuracy']:.4f}", flush=True)
            for seed in args.seeds:
                svc = service(name, teacher["path"], seed, Path(tmp) / f"{name}-{seed}")
                hand = by_hand(name, teacher["path"], seed)
                delta = round(100 * (svc["accuracy"] - hand["accuracy"]), 2)
                runs.append({"dataset": name, "seed": seed, "teacher_accuracy": teacher["test_accuracy"],
                             "service": svc, "by_hand": hand, "service_minus_by_hand_points": delta,
                             "pass": delta >= -TOLERANCE_POINTS})
                print(f"   seed {seed}: service {svc['accuracy']:.4f}  by hand {hand['accuracy']:.4f}  "
                      f"({delta:+.2f} pt; params {svc['params']} / {hand['params']})", flush=True)
    out = write_results("distill_direct", {
        "setup": {"teacher": {**TEACHER, "seed": TEACHER_SEED}, "distill_config": DISTILL, "seeds": args.seeds,
                  "check": f"service accuracy >= by hand - {TOLERANCE_POINTS} points"},
        "runs": runs, "all_pass": all(r["pass"] for r in runs)})
    print(f"wrote {out.relative_to(ROOT)}")
    return 0 if all(r["pass"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
