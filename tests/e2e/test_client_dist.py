"""The client distribution (app/client/pyproject.toml: `pip install ./app/client`), installed into a fresh virtual
environment as a data scientist would: only the SDK, the `distillery` client commands, httpx and pydantic, none of
the server's dependencies; then that environment drives a real `distillery serve` (run from the server's
environment, API keys required) through its own `distillery` command and its own `app.client`."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from tests.app.test_client import start_server
from tests.helpers import digits_npz_bytes, write_mlp_onnx

# building the wheel and installing httpx and pydantic from the package index take a while
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
ROOT = Path(__file__).resolve().parents[2]
SERVER_ONLY = ("fastapi", "starlette", "uvicorn", "sqlalchemy", "alembic", "celery", "kombu", "redis", "psycopg",
               "boto3", "botocore", "torch", "onnx", "onnxruntime", "numpy")
QUICK = ["--batch-sizes", "1,8", "--repeats", "3", "--warmup", "1"]


class Venv:
    def __init__(self, path: Path):
        self.path = path
        self.python = path / "bin" / "python"
        self.distillery = path / "bin" / "distillery"

    def run(self, *cmd, cwd: Path, env: dict[str, str] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
        """A command of this environment, away from the checkout (so that `app` is the installed one), with none
        of the test process's Python or Distillery settings."""
        base = {k: v for k, v in os.environ.items()
                if not k.startswith(("DISTILLERY_", "PYTHON", "VIRTUAL_ENV"))}
        return subprocess.run([str(c) for c in cmd], cwd=cwd, env={**base, **(env or {})}, capture_output=True,
                              text=True, timeout=timeout)

    def python_json(self, code: str, *, cwd: Path, env: dict[str, str] | None = None) -> dict:
        proc = self.run(self.python, "-c", textwrap.dedent(code), cwd=cwd, env=env)
        assert proc.returncode == 0, proc.stderr[-4000:]
        return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory) -> Venv:
    """`python -m venv`, then the README's one command, `pip install ./app/client`, run in the checkout."""
    path = tmp_path_factory.mktemp("client-venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, capture_output=True, timeout=300)
    venv = Venv(path)
    proc = venv.run(venv.python, "-m", "pip", "install", "./app/client", cwd=ROOT, timeout=800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return venv


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from start_server(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("files")
    (root / "digits.npz").write_bytes(digits_npz_bytes())
    return {"model": write_mlp_onnx(root / "mlp.onnx"), "data": root / "digits.npz"}


def test_installs_the_client_alone(client_venv, tmp_path):
    out = client_venv.python_json("""
        import importlib, importlib.metadata as md, importlib.util, json, sys
        import app, app.client, app.client.commands
        files = sorted(str(f) for f in md.files("distillery-client") if f.parts[0] == "app" and f.suffix == ".py")
        for f in files:  # every module shipped imports without the server (the lazily imported ones too)
            importlib.import_module(f.removesuffix(".py").removesuffix("/__init__").replace("/", "."))
        dists = sorted(d.metadata["Name"].lower().replace("_", "-") for d in md.distributions())
        print(json.dumps({
            "dists": dists, "version": md.version("distillery-client"),
            "scripts": [e.value for e in md.entry_points(group="console_scripts") if e.name == "distillery"],
            "files": files, "app_paths": list(app.__path__), "app_file": getattr(app, "__file__", None),
            "client": app.client.__file__, "prefix": sys.prefix,
            "server_main": importlib.util.find_spec("app.main") is not None,
            "heavy": sorted({m.split(".")[0] for m in sys.modules} & set(%r)),
        }))
        """ % (SERVER_ONLY,), cwd=tmp_path)
    installed = set(out["dists"])
    assert "distillery-client" in installed and "distillery" not in installed, installed
    assert {"httpx", "pydantic"} <= installed
    server_deps = {"fastapi", "starlette", "uvicorn", "sqlalchemy", "alembic", "celery", "kombu", "redis", "psycopg",
                   "psycopg-binary", "psycopg-pool", "boto3", "botocore", "torch", "numpy", "onnx", "onnxruntime",
                   "prometheus-client", "pydantic-settings", "python-multipart"}
    assert not installed & server_deps, sorted(installed & server_deps)
    assert out["heavy"] == [], out["heavy"]

    server_version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert out["version"] == server_version  # one version for both distributions
    assert out["scripts"] == ["app.client.commands:main"]

    # the installed copy, not the checkout; `app` a namespace package holding the client and the schema modules it
    # imports, and nothing of the server
    assert out["client"].startswith(out["prefix"]) and out["app_file"] is None
    assert all(p.startswith(out["prefix"]) for p in out["app_paths"]), out["app_paths"]
    assert not out["server_main"]
    shipped = set(out["files"])
    client_modules = {f"app/client/{p.name}" for p in (ROOT / "app" / "client").glob("*.py")}
    assert {f for f in shipped if f.startswith("app/client/")} == client_modules  # the build hook is not shipped
    assert {"app/jobs/schemas.py", "app/core/ids.py", "app/methods/base.py"} <= shipped
    assert "app/__init__.py" not in shipped
    others = {f for f in shipped if not f.startswith(("app/client/", "app/methods/"))}  # the method configs: all
    assert all(f.endswith(("/schemas.py", "/__init__.py", "/ids.py")) for f in others), sorted(others)


def test_its_distillery_has_the_client_commands_only(client_venv, tmp_path):
    proc = client_venv.run(client_venv.distillery, "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for command in ("models", "datasets", "jobs", "artifacts", "capabilities", "quantize", "prune", "distill"):
        assert command in proc.stdout
    proc = client_venv.run(client_venv.distillery, "serve", "--json", cwd=tmp_path)
    assert proc.returncode == 2
    assert json.loads(proc.stdout)["error"]["code"] == "usage_error"
    assert "invalid choice: 'serve'" in proc.stderr


def test_quantizes_through_a_running_service(client_venv, server, files, tmp_path):
    env = {"DISTILLERY_URL": server.url, "DISTILLERY_API_KEY": server.api_key}
    proc = client_venv.run(client_venv.distillery, "quantize", files["model"], "--method", "static_int8",
                           "--dataset", files["data"], *QUICK, "-o", "q.onnx", "--json", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    out = json.loads(proc.stdout)
    job, artifact = out["job"], out["artifact"]
    assert job["status"] == "succeeded" and job["kind"] == "quantize"
    saved = tmp_path / "q.onnx"
    assert Path(out["output"]) == saved
    assert hashlib.sha256(saved.read_bytes()).hexdigest() == artifact["sha256"]

    # the SDK of the same environment: the job, its report, the artifact's lineage (a lazily imported schema),
    # and a second job submitted on the model the command line uploaded (found by its content hash)
    sdk = client_venv.python_json(f"""
        import json, sys
        from app.client import Client
        with Client({server.url!r}, {server.api_key!r}) as client:
            job = client.get_job({job["id"]!r})
            lineage = client.artifact_lineage({artifact["id"]!r})
            model = client.find_model({str(files["model"])!r})
            second = client.quantize(model.id, "dynamic_int8", benchmark={{"batch_sizes": [1], "repeats": 3,
                                                                          "warmup": 1}}).wait(timeout=240)
            print(json.dumps({{"status": job.status, "report": job.report(), "teacher": lineage.teacher.id,
                              "complete": lineage.complete, "model": model.id, "second": second.status,
                              "second_artifact": second.artifact_id,
                              "heavy": sorted({{m.split(".")[0] for m in sys.modules}} & set({SERVER_ONLY!r}))}}))
        """, cwd=tmp_path)
    assert sdk["status"] == "succeeded"
    assert "size" in sdk["report"] and "latency p50 @ batch 1" in sdk["report"], sdk["report"]
    assert sdk["complete"] and sdk["teacher"] == sdk["model"] == job["model_id"]
    assert sdk["second"] == "succeeded" and sdk["second_artifact"]
    assert sdk["heavy"] == []


def test_the_build_refuses_a_shipped_module_that_imports_the_server(tmp_path):
    """The wheel's build hook (app/client/_dist/hatch_build.py) follows the client's imports into the server package
    and fails, naming the module and the import, when one of them needs a server dependency."""
    checkout = tmp_path / "checkout"
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "app", checkout / "app", ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", checkout / "pyproject.toml")
    schemas = checkout / "app" / "jobs" / "schemas.py"
    schemas.write_text(schemas.read_text() + "\nimport sqlalchemy  # a server dependency\n")
    line = len(schemas.read_text().splitlines())
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(tmp_path / "wheels"),
                           "./app/client"], cwd=checkout, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    assert f"app/jobs/schemas.py:{line}: imports sqlalchemy" in proc.stdout + proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "wheels").exists() or not any((tmp_path / "wheels").iterdir())
