"""The import layering of app/ and worker/ holds: `lint-imports` (import-linter, installed with the `test` extra) checks
the contracts of pyproject.toml's [tool.importlinter]: the API never imports the worker or torch, the engine imports
no API, web framework, database, broker or Redis, the app's domains import each other without cycles, and the API
schemas stay plain pydantic."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_are_kept():
    lint_imports = Path(sys.executable).parent / "lint-imports"
    assert lint_imports.exists(), f"{lint_imports} is missing: install the test extra (pip install -e '.[test]')"
    out = subprocess.run([str(lint_imports), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    report = out.stdout + out.stderr
    assert out.returncode == 0, report
    analyzed = re.search(r"Analyzed (\d+) files", report)
    assert analyzed and int(analyzed.group(1)) > 100, report  # it read the packages, not an empty graph
    assert re.search(r"Contracts: \d+ kept, 0 broken", report), report
