"""Upload of a 1 GiB ONNX model through POST /v1/models vs streaming the same body straight to disk.

Subject: `distillery api --workers 1` (PostgreSQL + Redis): multipart parsing, sha256, size limit, temp file,
then the streaming ONNX inspector, the content-addressed rename and the row insert; timed until the 201.
Baseline: bench/stream_app.py under `uvicorn --workers 1`: `request.stream()` written to a file, nothing else.
Same client for both: curl -F file=@model.onnx (streams the file from the page cache), alternating
baseline, subject / subject, baseline for --rounds rounds, with `sync` before each upload so one round's write-back does not land in
the next. The model is real: MatMul(x[N,K], W[K,M]) whose W (K*M float32, 1 GiB) is one raw_data initializer,
written as protobuf bytes in 1 MiB pieces (the benchmark never holds it in memory).

RSS: the server process (and any children) polled with psutil every 10 ms in a thread; growth = peak during the
upload - RSS just before it (after one small warm-up upload). VmHWM from /proc is recorded too.

Targets: subject MB/s >= 0.7x baseline MB/s (median of rounds); RSS growth < 64 MiB (every round).

    .venv/bin/python bench/upload.py [--rounds 7] [--size-mib 1024]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import _common as c  # noqa: E402

RATIO_TARGET = 0.7
RSS_TARGET_MIB = 64.0
MIB = 1024 * 1024


# ----------------------------------------------------------------------------- the model file

def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def write_matmul_onnx(path: Path, k: int, m: int, block: bytes | None = None) -> int:
    """Write MatMul(x[N,k], W[k,m]) -> y[N,m] with W as one raw_data initializer; returns the file size.

    The protobuf is assembled by hand so that W's bytes are streamed: ModelProto without its graph, then field 7
    (graph) = GraphProto without initializers + field 5 (initializer) = TensorProto header + field 9 (raw_data).
    Protobuf merges repeated occurrences, so this parses exactly like onnx.save() output.
    """
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "bench_big_matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", m])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="distillery-bench")
    model.ir_version = 8
    model.ClearField("graph")
    head = model.SerializeToString()
    graph_bytes = graph.SerializeToString()
    tensor = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[k, m])
    tensor_head = tensor.SerializeToString()
    raw_len = k * m * 4
    tensor_len = len(tensor_head) + 1 + len(_varint(raw_len)) + raw_len
    graph_len = len(graph_bytes) + 1 + len(_varint(tensor_len)) + tensor_len
    block = block or os.urandom(MIB)
    with open(path, "wb") as f:
        f.write(head)
        f.write(bytes([7 << 3 | 2]) + _varint(graph_len) + graph_bytes)
        f.write(bytes([5 << 3 | 2]) + _varint(tensor_len) + tensor_head)
        f.write(bytes([9 << 3 | 2]) + _varint(raw_len))
        left = raw_len
        while left:
            piece = block[:min(len(block), left)]
            f.write(piece)
            left -= len(piece)
    return path.stat().st_size


def check_writer(tmp: Path) -> None:
    """The same writer, on a 4x3 W, must produce a model onnx loads and checks, with W intact."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    small = tmp / "small.onnx"
    block = np.arange(12, dtype=np.float32).tobytes()
    write_matmul_onnx(small, 4, 3, block)
    model = onnx.load(str(small))
    onnx.checker.check_model(model, full_check=True)
    w = numpy_helper.to_array(model.graph.initializer[0])
    assert w.shape == (4, 3) and (w.ravel() == np.arange(12)).all(), w
    small.unlink()


# ----------------------------------------------------------------------------- measuring

def _rss(pid: int) -> int:
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def _cpu_s(pid: int) -> float:
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def _vm_hwm(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class RssPoller(threading.Thread):
    def __init__(self, pid: int, interval: float = 0.01):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak, self.samples = 0, 0
        self._halt = threading.Event()

    def run(self):
        while not self._halt.is_set():
            self.peak = max(self.peak, _rss(self.pid))
            self.samples += 1
            self._halt.wait(self.interval)

    def stop(self):
        self._halt.set()
        self.join()


def curl_upload(url: str, path: Path, out: Path, name: str | None = None, headers: dict | None = None) -> dict:
    cmd = ["curl", "-sS", "-o", str(out), "-w", "%{http_code} %{time_total} %{size_upload} %{time_pretransfer}",
           "-H", "Expect:", "--max-time", "600", "-F", f"file=@{path};type=application/octet-stream"]
    for k, v in (headers or {}).items():
        cmd += ["-H", f"{k}: {v}"]
    if name:
        cmd += ["-F", f"name={name}"]
    cmd.append(url)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=660)
    if proc.returncode != 0:
        raise RuntimeError(f"curl failed ({proc.returncode}): {proc.stderr}")
    code, total, size, pre = proc.stdout.split()
    return {"http_code": int(code), "time_s": float(total), "bytes_sent": int(float(size)),
            "time_pretransfer_s": float(pre), "curl": re.sub(r"Bearer \S+", "Bearer <key>", " ".join(cmd))}


def measure(label: str, url: str, server_pid: int, path: Path, out: Path, headers: dict | None = None) -> dict:
    os.sync()  # write-back of the previous round lands before this one starts
    time.sleep(0.5)
    before = _rss(server_pid)
    hwm_before = _vm_hwm(server_pid)
    load = round(os.getloadavg()[0], 2)
    cpu0 = _cpu_s(server_pid)
    poller = RssPoller(server_pid)
    poller.start()
    try:
        res = curl_upload(url, path, out, name=f"bench-{label}", headers=headers)
    finally:
        poller.stop()
    cpu = _cpu_s(server_pid) - cpu0
    res.update({
        "server_cpu_s": round(cpu, 3), "server_cpu_s_per_gib": round(cpu / (res["bytes_sent"] / 1024**3), 3),
        "load_avg_1m_before": load,
        "mb_per_s": round(res["bytes_sent"] / res["time_s"] / 1e6, 1),
        "rss_before_mib": round(before / MIB, 1), "rss_peak_mib": round(poller.peak / MIB, 1),
        "rss_growth_mib": round((poller.peak - before) / MIB, 1), "rss_samples": poller.samples,
        "vm_hwm_before_mib": round(hwm_before / MIB, 1) if hwm_before else None,
        "vm_hwm_after_mib": round((_vm_hwm(server_pid) or 0) / MIB, 1) or None,
    })
    try:
        res["response"] = json.loads(out.read_text())
    except (OSError, ValueError):
        res["response"] = out.read_text(errors="replace")[:500] if out.exists() else None
    return res


def cpu_breakdown(path: Path, tmp: Path, chunk: int, mib: int = 256, repeats: int = 3) -> dict:
    """In this process, CPU seconds per GiB of the per-byte stages of an upload, on the file's first `mib` MiB fed
    in `chunk`-byte pieces (best of `repeats`): reading the pieces (page cache); + writing them to a file (what the
    baseline does); + sha256; python-multipart parsing alone (no-op data callback); and the API's own receiver
    (app.core.uploads._Receiver: parse + size check + sha256 + write). Plus the inspector's wall time on the file."""
    import hashlib

    from python_multipart.multipart import MultipartParser

    from app.core.storage import LocalStorage
    from app.core.uploads import _Receiver
    from app.models.inspect import inspect_model

    limit = min(path.stat().st_size, mib * MIB)
    gib = limit / 1024**3

    def pieces():
        left = limit
        with open(path, "rb") as f:
            while left and (b := f.read(min(chunk, left))):
                left -= len(b)
                yield b

    def timed(fn) -> float:
        best = float("inf")
        for _ in range(repeats):
            os.sync()
            t = time.process_time()
            fn()
            best = min(best, time.process_time() - t)
        return round(best / gib, 3)

    def read_only():
        for _ in pieces():
            pass

    def read_write():
        with open(tmp / "bd.bin", "wb") as f:
            for b in pieces():
                f.write(b)

    def read_sha():
        h = hashlib.sha256()
        for b in pieces():
            h.update(b)

    boundary = b"benchboundary0123456789"
    head = (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="file"; filename="big.onnx"\r\n'
            b"Content-Type: application/octet-stream\r\n\r\n")
    tail = b"\r\n--" + boundary + b"--\r\n"
    storage = LocalStorage(tmp / "bd-storage")
    names = ("on_part_begin", "on_part_data", "on_part_end", "on_header_field", "on_header_value", "on_header_end",
             "on_headers_finished")

    def parse(noop: bool):
        rx = _Receiver(storage, "file", 4 * 1024**3)
        callbacks = {n: getattr(rx, n) for n in names}
        if noop:
            callbacks["on_part_data"] = lambda data, start, end: None
        parser = MultipartParser(boundary, callbacks)
        parser.write(head)
        for b in pieces():
            parser.write(b)
        parser.write(tail)
        parser.finalize()
        if hasattr(rx, "finish"):  # the receiver's API has changed over time: finish() or close()
            rx.finish()
        else:
            rx.close()
        assert noop or rx.size == limit, (rx.size, limit)
        rx.discard()

    out = {"chunk_bytes": chunk, "measured_on_mib": round(limit / MIB), "read": timed(read_only),
           "read_write_file": timed(read_write), "read_sha256": timed(read_sha),
           "read_multipart_parse_only": timed(lambda: parse(True)),
           "read_api_receiver_parse_hash_write": timed(lambda: parse(False))}
    best = float("inf")
    for _ in range(repeats):
        os.sync()
        t = time.perf_counter()
        parse(False)
        best = min(best, time.perf_counter() - t)
    out["read_api_receiver_WALL_s_per_gib"] = round(best / gib, 3)
    (tmp / "bd.bin").unlink(missing_ok=True)
    t = time.perf_counter()
    inspect_model(path)
    out["inspect_model_wall_s_whole_file"] = round(time.perf_counter() - t, 4)
    out["unit"] = ("CPU seconds (all threads of this process) per GiB, best of %d; *_WALL_*: wall seconds per GiB; "
                   "inspect: wall seconds on the whole file" % repeats)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--warmup-rounds", type=int, default=1, help="unmeasured full-size uploads to each server first")
    ap.add_argument("--size-mib", type=int, default=1024, help="size of W (the file is a few hundred bytes more)")
    args = ap.parse_args()
    c.mark_start()
    if not shutil.which("curl"):
        print("curl is not installed", file=sys.stderr)
        return 2

    tmp = c.temp_dir("upload")
    env = c.prod_env(tmp / "data")
    stream_dir = tmp / "stream"
    stream_dir.mkdir()
    procs: list[c.Proc] = []
    try:
        check_writer(tmp)
        model_path = tmp / "big.onnx"
        m = 16384
        k = args.size_mib * MIB // (4 * m)
        t0 = time.monotonic()
        size = write_matmul_onnx(model_path, k, m)
        file_sha256 = c.sha256_file(model_path)
        print(f"wrote {model_path.name}: {size} bytes (W {k}x{m} float32) in {time.monotonic() - t0:.1f}s", flush=True)

        c.recreate_pg_db()
        c.flush_redis()
        c.migrate(env)
        auth = c.auth_headers(c.create_key(env))
        api_port, base_port = c.free_port(), c.free_port()
        api = c.Proc("api", [c.DISTILLERY, "api", "--host", "127.0.0.1", "--port", str(api_port), "--workers", "1"],
                     env, tmp)
        procs.append(api)
        baseline = c.Proc("baseline", [str(c.VENV_BIN / "uvicorn"), "bench.stream_app:app", "--host", "127.0.0.1",
                                       "--port", str(base_port), "--workers", "1", "--log-level", "info",
                                       "--proxy-headers"], c.clean_env(BENCH_STREAM_DIR=str(stream_dir)), tmp)
        procs.append(baseline)
        api_base, base_url = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{base_port}/upload"
        api.wait_http(f"{api_base}/readyz")
        baseline.wait_http(f"http://127.0.0.1:{base_port}/docs")

        # warm-up: one small upload to each (lazy imports, first DB connection)
        small = tmp / "warm.onnx"
        small.write_bytes(c.tiny_onnx_bytes())
        for url, hdrs in ((base_url, {}), (f"{api_base}/v1/models", auth)):
            w = curl_upload(url, small, tmp / "warm.json", headers=hdrs)
            assert w["http_code"] == 201, (url, w, (tmp / "warm.json").read_text())
        for f in stream_dir.iterdir():
            f.unlink()
        # unmeasured full-size uploads: on this VM the first GiBs written after boot/allocation cost far more CPU
        # (fresh guest pages), which would land on whichever server goes first
        warm_full = []
        for _ in range(args.warmup_rounds):
            warm_full.append(measure("baseline", base_url, baseline.pid, model_path, tmp / "resp.json")["mb_per_s"])
            for f in stream_dir.iterdir():
                f.unlink()
            x = measure("subject", f"{api_base}/v1/models", api.pid, model_path, tmp / "resp.json", headers=auth)
            warm_full.append(x["mb_per_s"])
            if x["http_code"] == 201:
                httpx.delete(f"{api_base}/v1/models/{x['response']['id']}", timeout=60, headers=auth)

        quiet = c.wait_quiet()
        rounds = []
        for i in range(args.rounds):
            rnd = {"order": ["baseline", "subject"] if i % 2 == 0 else ["subject", "baseline"]}
            for which in rnd["order"]:
                if which == "baseline":
                    rnd["baseline"] = measure("baseline", base_url, baseline.pid, model_path, tmp / "resp.json")
                    for f in stream_dir.iterdir():
                        f.unlink()
                    continue
                rnd["subject"] = measure("subject", f"{api_base}/v1/models", api.pid, model_path, tmp / "resp.json",
                                         headers=auth)
                if rnd["subject"]["http_code"] == 201:
                    mid = rnd["subject"]["response"]["id"]
                    d = httpx.delete(f"{api_base}/v1/models/{mid}", timeout=60, headers=auth)
                    assert d.status_code == 204, d.text
                    resp = rnd["subject"]["response"]
                    rnd["subject"]["response"] = {k2: resp.get(k2) for k2 in ("id", "format", "size_bytes", "sha256")}
                    rnd["subject"]["response"]["params"] = resp.get("inspection", {}).get("params")
                    rnd["subject"]["sha256_matches_file"] = resp.get("sha256") == file_sha256
                    rnd["subject"]["size_matches_file"] = resp.get("size_bytes") == size
            rnd["ratio"] = round(rnd["subject"]["mb_per_s"] / rnd["baseline"]["mb_per_s"], 4)
            rounds.append(rnd)
            for n in rnd["order"]:
                x = rnd[n]
                print(f"round {i + 1} {n}: HTTP {x['http_code']}, {x['mb_per_s']} MB/s, {x['time_s']:.2f}s, "
                      f"RSS +{x['rss_growth_mib']} MiB", flush=True)

        mean_chunk = rounds[0]["baseline"]["response"].get("mean_chunk_bytes") or 65536
        breakdown = cpu_breakdown(model_path, tmp, int(mean_chunk))
        med_base = statistics.median(r["baseline"]["mb_per_s"] for r in rounds)
        med_subj = statistics.median(r["subject"]["mb_per_s"] for r in rounds)
        ratio = med_subj / med_base
        worst_rss = max(r["subject"]["rss_growth_mib"] for r in rounds)
        all_201 = all(r["subject"]["http_code"] == 201 and r["baseline"]["http_code"] == 201
                      and r["subject"].get("sha256_matches_file") for r in rounds)
        verdict = {"accepted_201_and_sha256_right_every_round": all_201,
                   "baseline_mb_per_s_median": med_base, "subject_mb_per_s_median": med_subj,
                   "ratio_median": round(ratio, 4), "ratio_target": RATIO_TARGET,
                   "ratio_pass": all_201 and ratio >= RATIO_TARGET,
                   "ratio_per_round": [r["ratio"] for r in rounds],
                   "informational_cpu_ratio_median": round(
                       statistics.median(r["baseline"]["server_cpu_s_per_gib"] for r in rounds)
                       / statistics.median(r["subject"]["server_cpu_s_per_gib"] for r in rounds), 4),
                   "rss_growth_worst_mib": worst_rss, "rss_target_mib": RSS_TARGET_MIB,
                   "rss_pass": all_201 and worst_rss < RSS_TARGET_MIB}
        rows = []
        for i, r in enumerate(rounds, 1):
            for n in r["order"]:
                x = r[n]
                rows.append([i, n, x["http_code"], f"{x['time_s']:.2f}", x["mb_per_s"], x["rss_before_mib"],
                             x["rss_peak_mib"], x["rss_growth_mib"], x["server_cpu_s_per_gib"], r["ratio"] if n == "subject" else ""])
        print()
        print(c.table(rows, ["round", "server", "HTTP", "seconds", "MB/s", "RSS before MiB", "RSS peak MiB",
                             "RSS growth MiB", "server CPU s/GiB", "subject/baseline"]))
        print()
        print(f"subject/baseline MB/s (medians {med_subj:.0f}/{med_base:.0f}): {ratio:.3f}  target >= {RATIO_TARGET}: "
              f"{'PASS' if verdict['ratio_pass'] else 'FAIL'}")
        print(f"RSS growth (worst round): {worst_rss} MiB  target < {RSS_TARGET_MIB:.0f} MiB: "
              f"{'PASS' if verdict['rss_pass'] else 'FAIL'}")
        out = c.write_results("upload", {
            "setup": {"api": " ".join(api.cmd), "baseline": " ".join(baseline.cmd), "file_bytes": size, "file_sha256": file_sha256,
                      "model": f"MatMul x[N,{k}] @ W[{k},{m}] float32, W as one raw_data initializer",
                      "client": "curl -F file=@... (same for both)", "order": "baseline first in odd rounds, subject first in even rounds",
                      "mb": "10^6 bytes; RSS in MiB (2^20)", "storage_fs": str(tmp), "warmup_full_uploads_mb_per_s": warm_full},
            "machine_quiet_check": quiet, "rounds": rounds, "cpu_breakdown_in_process": breakdown, "verdict": verdict,
        })
        print("per-byte CPU, in this process, s/GiB: " + ", ".join(f"{k}={v}" for k, v in breakdown.items()
                                                                   if k not in ("unit",)))
        print(f"wrote {out.relative_to(c.ROOT)}")
        return 0
    finally:
        for p in reversed(procs):
            p.stop()
        c.drop_pg_db()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
