"""The README's configuration table and the docs stay true to the code."""
from __future__ import annotations

import re
from pathlib import Path

from app.core.config import Settings

ROOT = Path(__file__).resolve().parents[1]


def test_readme_configuration_table_lists_every_setting():
    readme = (ROOT / "README.md").read_text()
    documented = set(re.findall(r"^\| `DISTILLERY_([A-Z0-9_]+)` \|", readme, flags=re.M))
    assert documented == {name.upper() for name in Settings.model_fields}


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    test_cmd = next(b for b in blocks if "pytest" in b)
    assert test_cmd.strip() in ci


def test_api_guide_documents_every_config_key():
    import app.methods as m

    guide = (ROOT / "docs" / "api.md").read_text()
    models = (*m.registered_configs().values(), m.CalibrationConfig, m.BenchmarkConfig, m.FineTuneConfig,
              m.MlpStudent, m.CnnStudent, m.ShrinkStudent, m.ModelStudent, m.EarlyStopping, m.FeatureLoss)
    for (kind, method) in m.registered_configs():
        assert f"`{method}`" in guide, f"docs/api.md does not document {kind} method {method!r}"
    for model in models:
        for key in model.model_fields:
            assert f"`{key}`" in guide, f"docs/api.md does not document config key {key!r}"
