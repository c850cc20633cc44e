"""docs/operations.md's Metrics section names every metric /metrics exposes, with its type and labels."""
from __future__ import annotations

import re
from pathlib import Path

from tests.app.test_api_uploads import upload_dataset, upload_model
from tests.helpers import digits_npz_bytes, mlp_onnx_bytes

ROOT = Path(__file__).resolve().parents[2]
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count", "_created")


def documented_metrics() -> dict[str, tuple[str, set[str]]]:
    text = (ROOT / "docs" / "operations.md").read_text()
    section = re.search(r"^## Metrics\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    assert section, "docs/operations.md has no '## Metrics' section"
    out = {}
    for name, mtype, labels in re.findall(r"^\| `(\w+)` \| (\w+) \| (.*?) \|", section.group(1), flags=re.M):
        out[name] = (mtype, set(re.findall(r"`(\w+)`", re.sub(r"\([^)]*\)", "", labels))))
    return out


def exposed_metrics(body: str) -> dict[str, tuple[str, set[str]]]:
    types = dict(re.findall(r"^# TYPE (\w+) (\w+)$", body, flags=re.M))
    labels: dict[str, set[str]] = {name: set() for name in types}
    for sample, label_text in re.findall(r"^(\w+)\{([^}]*)\}", body, flags=re.M):
        base = sample if sample in types else next(
            sample[: -len(s)] for s in HISTOGRAM_SUFFIXES if sample.endswith(s) and sample[: -len(s)] in types)
        labels[base] |= set(re.findall(r"(\w+)=\"", label_text)) - {"le"}
    return {name: (types[name], labels[name]) for name in types}


def test_every_exposed_metric_is_documented_with_its_type_and_labels(client):
    model = upload_model(client, mlp_onnx_bytes()).json()
    dataset = upload_dataset(client, digits_npz_bytes()).json()
    job = client.post("/v1/jobs", json={"kind": "quantize", "model_id": model["id"], "dataset_id": dataset["id"],
                                        "config": {"method": "static_int8"}})
    assert job.status_code == 202, job.text
    assert client.post(f"/v1/jobs/{job.json()['id']}/cancel").status_code == 200

    resp = client.get("/metrics")
    assert resp.status_code == 200
    exposed = exposed_metrics(resp.text)
    assert {"distillery_jobs", "distillery_upload_bytes"} <= set(exposed)
    assert exposed["distillery_jobs"][1] == {"kind", "status"}  # samples were there to read the labels from
    documented = documented_metrics()
    for name, (mtype, labels) in exposed.items():
        assert name in documented, f"/metrics exposes {name}, which docs/operations.md's Metrics section does not list"
        assert documented[name][0] == mtype, f"{name} is a {mtype}, documented as a {documented[name][0]}"
        assert labels <= documented[name][1], f"{name} has labels {labels - documented[name][1]} not documented"
    # and the section lists nothing that does not exist
    assert set(documented) <= set(exposed), set(documented) - set(exposed)
