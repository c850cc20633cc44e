"""docs/engine.md's example runs as written: the engine used as a library, without the service."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_the_engine_guide_example_runs(tmp_path):
    guide = (ROOT / "docs" / "engine.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)\n```", guide, flags=re.S)
    # the example's own figures, printed as a last line the test can check
    check = ('\nimport json\nprint(json.dumps({"size": report["ratios"]["size"], "drop": report["accuracy_drop"], '
             '"saved": Path("digits_cnn.int8.onnx").stat().st_size, "kept": smaller.facts["params_after"],'
             ' "before": smaller.facts["params_before"]}))\n')
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code + check], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert 0 < out["size"] < 0.5  # int8 weights: under half the float file
    assert out["drop"] < 0.05
    assert out["saved"] > 0 and (tmp_path / "out" / "int8").is_dir()
    assert out["kept"] < out["before"]
