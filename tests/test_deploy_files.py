"""The Dockerfile and docker-compose.yml checked against the code they deploy.

No Docker engine is needed: both files are parsed, and every name they rely on (settings,
CLI subcommands and options, queues, the health route, services, volumes) is looked up in the code.
"""
from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import pytest

yaml = pytest.importorskip("yaml", reason="pyyaml is in the `test` extra")

from app.cli import build_parser  # noqa: E402
from app.core.broker import QUEUES  # noqa: E402
from app.core.config import Settings  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
EXPECTED_SERVICES = {"postgres", "redis", "minio", "minio-init", "migrate", "api", "worker-gpu", "worker-cpu"}
IMAGE_SERVICES = {"migrate", "api", "worker-gpu", "worker-cpu"}
ENV_VAR = re.compile(r"\bDISTILLERY_[A-Z0-9_]+\b")
TORCH_PIN = re.compile(r"\btorch\s*(===|==|~=|!=|>=|<=|>|<)\s*[0-9]", re.IGNORECASE)


# ------------------------------------------------------------------------------------ parsing

@pytest.fixture(scope="module")
def compose() -> dict:
    assert COMPOSE.is_file(), f"{COMPOSE} is missing"
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict), \
        "docker-compose.yml must be a mapping with a `services` mapping"
    return data


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


@pytest.fixture(scope="module")
def image_services(services) -> dict:
    """The services that run the Distillery image (built from the Dockerfile)."""
    found = {name: svc for name, svc in services.items() if "build" in svc}
    assert set(found) == IMAGE_SERVICES, (
        f"services built from the Dockerfile: expected {sorted(IMAGE_SERVICES)}, got {sorted(found)}")
    return found


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) for each instruction of a Dockerfile, continuations joined."""
    out: list[tuple[str, str]] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        word, _, rest = current.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        current = ""
    return out


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    assert DOCKERFILE.is_file(), f"{DOCKERFILE} is missing"
    return _instructions(DOCKERFILE.read_text())


def _final_stage(instructions):
    starts = [i for i, (word, _) in enumerate(instructions) if word == "FROM"]
    return instructions[starts[-1]:]


def _exec_form(args: str) -> list[str] | None:
    try:
        value = json.loads(args)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def _depends_on(service: dict) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {name: "service_started" for name in deps}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def _mounts(service: dict) -> dict[str, str]:
    """container path -> source (named volume or host path)."""
    mounts: dict[str, str] = {}
    for vol in service.get("volumes") or []:
        if isinstance(vol, dict):
            mounts[vol["target"]] = vol.get("source", "")
        else:
            parts = vol.split(":")
            if len(parts) >= 2:
                mounts[parts[1]] = parts[0]
    return mounts


def _parse_command(name: str, command):
    assert isinstance(command, list) and command, \
        f"service {name!r}: command should be a non-empty list (exec form), got {command!r}"
    try:
        return build_parser().parse_args([str(c) for c in command])
    except SystemExit as exc:
        pytest.fail(f"service {name!r}: command {command!r} is not a valid `distillery` CLI invocation "
                    f"(argparse exited with {exc.code})")


# ------------------------------------------------------------------------ settings everywhere

def test_every_distillery_variable_is_a_setting():
    fields = set(Settings.model_fields)
    for path in (DOCKERFILE, COMPOSE):
        used = set(ENV_VAR.findall(path.read_text()))
        unknown = sorted(v for v in used if v.removeprefix("DISTILLERY_").lower() not in fields)
        assert not unknown, (f"{path.name} uses {unknown}, which Settings (app/core/config.py) does not "
                             f"read: the variable would be silently ignored. Known fields: {sorted(fields)}")


def test_image_services_share_the_production_settings(image_services):
    envs = {name: _env(svc) for name, svc in image_services.items()}
    for name, env in envs.items():
        for key in ("DISTILLERY_DATABASE_URL", "DISTILLERY_BROKER_URL", "DISTILLERY_DATA_DIR"):
            assert env.get(key), (f"service {name!r} does not set {key}: it would fall back to the embedded "
                                  f"default (SQLite / file-system broker) and not see the other services")
    for key in ("DISTILLERY_DATABASE_URL", "DISTILLERY_BROKER_URL", "DISTILLERY_DATA_DIR"):
        values = {name: env[key] for name, env in envs.items()}
        assert len(set(values.values())) == 1, f"{key} differs between services: {values}"
    for name, env in envs.items():
        Settings(**{k.removeprefix("DISTILLERY_").lower(): v for k, v in env.items()
                    if k.startswith("DISTILLERY_")})  # raises on a value Settings rejects


# -------------------------------------------------------------------------------- compose

def test_compose_has_the_services(services):
    missing = EXPECTED_SERVICES - set(services)
    assert not missing, f"docker-compose.yml lacks services {sorted(missing)}"


def test_image_service_commands_are_cli_subcommands(image_services):
    subcommands = {"migrate": "migrate", "api": "api", "worker-gpu": "worker", "worker-cpu": "worker"}
    for name, svc in image_services.items():
        args = _parse_command(name, svc.get("command"))
        assert args.command == subcommands[name], \
            f"service {name!r} runs `distillery {args.command}`, expected `distillery {subcommands[name]}`"


def test_api_port_matches_its_command(services):
    api = services["api"]
    args = _parse_command("api", api["command"])
    ports = [str(p) for p in api.get("ports") or []]
    container_ports = {p.rsplit(":", 1)[-1].split("/")[0] for p in ports}
    assert str(args.port) in container_ports, (
        f"api listens on --port {args.port} but publishes {ports}: the published container port must match")
    assert args.host == "0.0.0.0", f"api binds {args.host}: inside a container it must bind 0.0.0.0 to be reachable"


def test_workers_consume_their_queues(services):
    for name, queue in (("worker-gpu", "gpu"), ("worker-cpu", "cpu")):
        args = _parse_command(name, services[name]["command"])
        queues = [q.strip() for q in (args.queues or "").split(",") if q.strip()]
        assert queues == [queue], f"{name} should consume exactly queue {queue!r}, its --queues is {args.queues!r}"
        assert queue in QUEUES, f"queue {queue!r} is not in app.core.broker.QUEUES {QUEUES}"


def test_plain_up_runs_on_a_host_without_a_gpu(services):
    """`docker compose up` must work without the NVIDIA runtime: only services in the `gpu` profile reserve GPUs,
    and everything else (a CPU worker included) starts without a profile."""
    for name, svc in services.items():
        devices = (svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices") or [])
        if devices:
            assert "gpu" in (svc.get("profiles") or []), f"{name} reserves a GPU but is not in the `gpu` profile"
        else:
            assert not svc.get("profiles"), f"{name} needs no GPU but only starts with profiles {svc['profiles']}"
    assert "worker-cpu" in services and not services["worker-cpu"].get("profiles")


def test_gpu_worker_reserves_an_nvidia_gpu(services):
    devices = (services["worker-gpu"].get("deploy", {}).get("resources", {})
               .get("reservations", {}).get("devices") or [])
    gpu = [d for d in devices if d.get("driver") == "nvidia" and "gpu" in (d.get("capabilities") or [])]
    assert gpu, f"worker-gpu must reserve a device with driver nvidia and capabilities [gpu]; it has {devices}"
    count, ids = gpu[0].get("count"), gpu[0].get("device_ids")
    assert count == "all" or (isinstance(count, int) and count >= 1) or (count is None and ids), \
        f"worker-gpu's GPU reservation needs count >= 1, 'all' or device_ids; got {gpu[0]}"
    assert "deploy" not in services["worker-cpu"] or not (
        services["worker-cpu"]["deploy"].get("resources", {}).get("reservations", {}).get("devices")), \
        "worker-cpu should not reserve a GPU"


def test_volume_at_the_data_dir(compose, image_services):
    """A named volume at the data dir of every service; one volume shared by all of them unless the files live in
    object storage (DISTILLERY_STORAGE_URL), where each service keeps its own, as on separate machines."""
    named = set(compose.get("volumes") or {})
    sources = {}
    for name, svc in image_services.items():
        data_dir = _env(svc)["DISTILLERY_DATA_DIR"]
        mounts = _mounts(svc)
        assert data_dir in mounts, (f"service {name!r} keeps its data in {data_dir} (DISTILLERY_DATA_DIR) but mounts "
                                    f"nothing there ({mounts})")
        sources[name] = mounts[data_dir]
        assert sources[name] in named, \
            f"{sources[name]!r} should be a named volume declared under top-level `volumes:` ({named})"
    if not all(_env(svc).get("DISTILLERY_STORAGE_URL") for svc in image_services.values()):
        assert len(set(sources.values())) == 1, \
            f"without object storage the services must share one volume at the data dir (artifacts): {sources}"


def test_object_storage_is_the_minio_service(compose, services, image_services):
    """Uploads and artifacts go to the MinIO bucket: same URL and endpoint everywhere, the endpoint is the minio
    service's S3 port, the credentials are MinIO's user, and the api and workers start once the bucket exists."""
    envs = {name: _env(svc) for name, svc in image_services.items()}
    for key in ("DISTILLERY_STORAGE_URL", "DISTILLERY_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        values = {name: env.get(key) for name, env in envs.items()}
        assert all(values.values()) and len(set(values.values())) == 1, f"{key} should be set, the same, everywhere: {values}"
    env = next(iter(envs.values()))
    from app.core.storage import parse_s3_url

    bucket, prefix = parse_s3_url(env["DISTILLERY_STORAGE_URL"])
    assert bucket and prefix, f"storage URL {env['DISTILLERY_STORAGE_URL']!r} should name a bucket and a prefix"
    endpoint = urlsplit(env["DISTILLERY_S3_ENDPOINT_URL"])
    minio = services.get("minio")
    assert minio is not None and str(minio.get("image", "")).startswith("minio/minio"), \
        "docker-compose.yml should run MinIO as the service `minio`"
    assert endpoint.scheme == "http" and endpoint.hostname == "minio", \
        f"S3 endpoint {endpoint.geturl()!r} should be the compose service 'minio'"
    command = [str(c) for c in minio.get("command") or []]
    assert command[:2] == ["server", "/data"], f"minio should run `server /data`, runs {command}"
    address = command[command.index("--address") + 1] if "--address" in command else ":9000"
    assert address.rsplit(":", 1)[-1] == str(endpoint.port or 80), \
        f"minio listens on {address}, the endpoint URL names port {endpoint.port}"
    assert _mounts(minio).get("/data") in set(compose.get("volumes") or {}), \
        f"minio's /data should be a named volume (the bucket's bytes survive a restart): {_mounts(minio)}"
    minio_env = _env(minio)
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == (
        minio_env.get("MINIO_ROOT_USER"), minio_env.get("MINIO_ROOT_PASSWORD")), \
        "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY should be the MinIO user's"
    assert "ready" in json.dumps(minio.get("healthcheck", {}).get("test")), "minio needs an `mc ready` healthcheck"
    init = services.get("minio-init")
    assert init is not None, "a one-shot `minio-init` service should create the bucket"
    script = " ".join(str(c) for c in (init.get("entrypoint") or []) + (init.get("command") or []))
    assert f"mc mb --ignore-existing local/{bucket}" in script and "http://minio:9000" in script, \
        f"minio-init should create bucket {bucket!r} on minio: {script}"
    assert f"{minio_env['MINIO_ROOT_USER']} {minio_env['MINIO_ROOT_PASSWORD']}" in script, \
        "minio-init should log in as the MinIO user"
    assert _depends_on(init).get("minio") == "service_healthy" and str(init.get("restart", "no")) == "no"
    for name in ("api", "worker-gpu", "worker-cpu"):
        assert _depends_on(services[name]).get("minio-init") == "service_completed_successfully", \
            f"{name} must start after the bucket exists (minio-init: service_completed_successfully)"


def test_database_url_matches_postgres(services, image_services):
    from sqlalchemy.engine import make_url

    url = make_url(_env(next(iter(image_services.values())))["DISTILLERY_DATABASE_URL"])
    pg = services["postgres"]
    pg_env = _env(pg)
    assert str(pg.get("image", "")).startswith("postgres"), f"postgres service runs {pg.get('image')!r}"
    assert url.drivername == "postgresql+psycopg", \
        f"DB URL driver is {url.drivername!r}; the project ships psycopg 3, use postgresql+psycopg"
    assert url.host == "postgres", f"DB URL host {url.host!r} should be the compose service 'postgres'"
    assert url.port in (None, 5432), f"DB URL port {url.port} is not PostgreSQL's 5432"
    assert url.username == pg_env.get("POSTGRES_USER"), \
        f"DB URL user {url.username!r} != POSTGRES_USER {pg_env.get('POSTGRES_USER')!r}"
    assert url.password == pg_env.get("POSTGRES_PASSWORD"), "DB URL password != POSTGRES_PASSWORD"
    assert url.database == pg_env.get("POSTGRES_DB"), \
        f"DB URL database {url.database!r} != POSTGRES_DB {pg_env.get('POSTGRES_DB')!r}"
    assert "pg_isready" in json.dumps(pg.get("healthcheck", {}).get("test")), \
        "postgres needs a pg_isready healthcheck (migrate waits for service_healthy)"


def test_broker_url_points_at_redis(services, image_services):
    url = urlsplit(_env(next(iter(image_services.values())))["DISTILLERY_BROKER_URL"])
    assert url.scheme == "redis", f"broker URL scheme {url.scheme!r} should be redis"
    assert url.hostname == "redis" and "redis" in services, \
        f"broker URL host {url.hostname!r} should be the compose service 'redis'"
    assert url.port in (None, 6379), f"broker URL port {url.port} is not Redis's 6379"
    redis = services["redis"]
    assert str(redis.get("image", "")).startswith("redis"), f"redis service runs {redis.get('image')!r}"
    assert "ping" in json.dumps(redis.get("healthcheck", {}).get("test")), "redis needs a `redis-cli ping` healthcheck"
    command = redis.get("command") or []
    command = shlex.split(command) if isinstance(command, str) else [str(c) for c in command]
    assert "--appendonly" in command and command[command.index("--appendonly") + 1] == "yes", \
        f"redis should run with --appendonly yes so queued jobs survive a restart; command is {command}"


def test_startup_order(services):
    migrate = services["migrate"]
    assert _depends_on(migrate).get("postgres") == "service_healthy", \
        f"migrate must wait for postgres to be healthy; depends_on is {_depends_on(migrate)}"
    assert str(migrate.get("restart", "no")) == "no", "migrate is one-shot: restart must be \"no\""
    for name in ("api", "worker-gpu", "worker-cpu"):
        deps = _depends_on(services[name])
        assert deps.get("migrate") == "service_completed_successfully", \
            f"{name} must start after the schema is migrated (migrate: service_completed_successfully); got {deps}"
        assert deps.get("redis") == "service_healthy", f"{name} must wait for redis to be healthy; got {deps}"


# ------------------------------------------------------------------------------ Dockerfile

def test_dockerfile_is_multi_stage(dockerfile):
    froms = [args for word, args in dockerfile if word == "FROM"]
    assert len(froms) >= 2, f"Dockerfile should be multi-stage (builder + runtime), has FROM {froms}"
    assert "PYTHON_IMAGE=python:3.11-slim" in DOCKERFILE.read_text() or all("python:3.11-slim" in f for f in froms), \
        "both stages should be based on python:3.11-slim"
    assert any(word == "COPY" and "--from=" in args for word, args in _final_stage(dockerfile)), \
        "the final stage should COPY --from the builder stage"


def test_dockerfile_runs_as_non_root(dockerfile):
    users = [args for word, args in _final_stage(dockerfile) if word == "USER"]
    assert users, "the final stage sets no USER: the container would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"the final USER is {users[-1]!r}: it must be a non-root user"


def test_dockerfile_data_dir(dockerfile, image_services):
    text = " ".join(args for word, args in _final_stage(dockerfile) if word == "ENV")
    m = re.search(r"DISTILLERY_DATA_DIR=(\S+)", text)
    assert m, "the final stage should set ENV DISTILLERY_DATA_DIR"
    data_dir = m.group(1).strip("\"'")
    volumes = " ".join(args for word, args in _final_stage(dockerfile) if word == "VOLUME")
    assert data_dir in volumes, f"DISTILLERY_DATA_DIR={data_dir} should be declared as a VOLUME (has {volumes!r})"
    for name, svc in image_services.items():
        assert _env(svc)["DISTILLERY_DATA_DIR"] == data_dir, \
            f"service {name!r} sets DISTILLERY_DATA_DIR differently from the image ({data_dir})"


def test_dockerfile_healthcheck_hits_healthz(dockerfile, services):
    from app.cli import healthcheck_url
    from app.system.endpoints import router

    checks = [args for word, args in _final_stage(dockerfile) if word == "HEALTHCHECK"]
    assert checks, "the final stage has no HEALTHCHECK"
    assert _exec_form(checks[-1].split("CMD", 1)[1].strip()) == ["distillery", "healthcheck"], checks[-1]
    assert "/healthz" in {getattr(r, "path", None) for r in router.routes}, "the API no longer serves /healthz"
    exposed = " ".join(args for word, args in _final_stage(dockerfile) if word == "EXPOSE").split()
    api_port = _parse_command("api", services["api"]["command"]).port
    assert str(api_port) in exposed, f"the image EXPOSEs {exposed}, the api listens on {api_port}"
    # what `distillery healthcheck` probes in each container: the process the image's ENTRYPOINT starts
    for name, svc in services.items():
        if "image" not in svc or "command" not in svc:
            continue
        argv = ["/opt/venv/bin/python", "/opt/venv/bin/distillery", *svc["command"]]
        port = _parse_command("api", svc["command"]).port if svc["command"][0] == "api" else None
        assert healthcheck_url(argv) == (f"http://127.0.0.1:{port}/healthz" if port else None), name
    assert healthcheck_url(["/opt/venv/bin/python", "/opt/venv/bin/distillery", "api", "--port", "9001"]) \
        == "http://127.0.0.1:9001/healthz"
    assert healthcheck_url(["/opt/venv/bin/python", "-m", "celery", "-A", "worker.celery_app:celery"]) is None
    assert services["api"].get("healthcheck", {}).get("disable") is not True, \
        "docker-compose.yml disables the api's healthcheck"


def test_dockerfile_entrypoint_and_cmd(dockerfile):
    entry = [args for word, args in _final_stage(dockerfile) if word == "ENTRYPOINT"]
    assert entry and _exec_form(entry[-1]) == ["distillery"], \
        f"ENTRYPOINT should be [\"distillery\"] (exec form), got {entry}"
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "distillery" in scripts, f"pyproject.toml no longer declares the `distillery` script: {scripts}"
    cmd = [args for word, args in _final_stage(dockerfile) if word == "CMD"]
    assert cmd, "the final stage should set a default CMD"
    _parse_command("<image default CMD>", _exec_form(cmd[-1]))


def test_torch_is_pinned_only_by_the_project(dockerfile):
    engine = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["engine"]
    assert any(TORCH_PIN.match(dep) for dep in engine), f"pyproject's engine extra should pin torch: {engine}"
    for path in (DOCKERFILE, COMPOSE):
        pins = TORCH_PIN.findall(path.read_text())
        assert not pins, (f"{path.name} names a torch version; torch is pinned in pyproject.toml only "
                          f"(install '.[engine]'), so the two cannot drift apart")
    runs = " ".join(args for word, args in dockerfile if word == "RUN")
    assert re.search(r"pip install\b[^&;]*['\"]?\.\[engine\]", runs), \
        "the builder should install the project with its engine extra: pip install '.[engine]'"
