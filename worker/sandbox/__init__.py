"""The job process's sandbox.

A job runs the uploader's model, and a TorchScript model is a program: its code can open files and write to any
descriptor the process holds. So the job process is untrusted. It runs in layers, each one built on what the kernel
and well-kept tools provide, so that a hole in one is not a hole in all:

1. **Namespaces (bubblewrap)**: its own mount, PID, network, IPC, UTS, cgroup and user namespaces, all capabilities
   dropped, an empty root with the system (`/usr`), the Python installation and the engine's code mounted
   read-only, its job folder's `in/` read-only and `work/` read-write, a `/proc` that shows only its own processes
   and a network with only `lo`. No environment but an allow-list.
2. **Landlock**: the process itself gives up file access outside the same read-only and read-write paths, every TCP
   bind and connect, abstract UNIX sockets and signals to processes outside its domain. Applied before the engine
   is imported, while the process has one thread; it needs no privilege, so it also holds where user namespaces
   are blocked (Docker's default seccomp profile).
3. **seccomp (libseccomp)**: no sockets but AF_UNIX, no fork or exec, no ptrace, mounts, namespaces, keyrings,
   BPF, io_uring and the like (worker/sandbox/seccomp.py). Applied once the engine is imported, before the job's
   spec is read.
4. **Resource limits**: no core dumps, a per-file size limit (the job's disk limit), a bounded number of open
   files; the supervisor adds the memory, time and disk limits and kills the whole process tree.
5. **Python isolated**: `python -I -B` (no environment variables, no user site, no current folder on the import
   path, no bytecode written), started in a work folder of its own that no later process reads code from.

The supervisor (worker/supervisor.py) believes nothing the process says: the artifact is a fixed name in `work/`,
opened without following links, and the report pipe is bounded and validated.

`DISTILLERY_JOB_SANDBOX` decides what happens where a layer is missing: `strict` (the default) refuses formats whose
loading runs the uploader's code (TorchScript) unless file confinement (namespaces or Landlock) and the system-call
filter both hold; `permissive` runs them with the layers there are. Either way the worker says at start-up which
layers it has, and `/v1/capabilities` shows it.
"""
from __future__ import annotations

import functools
import json
import logging
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from worker.sandbox import landlock, seccomp

log = logging.getLogger("distillery.sandbox")

#: Formats whose loading runs code from the upload.
UNTRUSTED_FORMATS = frozenset({"torchscript"})
#: The one name a job's artifact may have, inside its work folder.
ARTIFACT_NAME = "artifact"
#: The uid and gid of the job process inside its user namespace (nobody).
SANDBOX_ID = 65534
#: Open files a job process may hold.
MAX_OPEN_FILES = 4096

_SYSTEM_READ = ("/usr", "/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/localtime",
                "/etc/alternatives", "/sys/devices/system/cpu", "/sys/fs/cgroup")
_ROOT_LINKS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_PROC_READ = ("/proc/cpuinfo", "/proc/meminfo", "/proc/stat", "/proc/sys/vm/overcommit_memory", "/proc/driver")
_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
_GPU_READ = ("/sys/bus/pci", "/sys/devices", "/sys/module/nvidia", "/proc/driver/nvidia")
#: Variables a job process may see (none carries a credential); everything else is dropped.
_ENV_PASS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "CUDA_VISIBLE_DEVICES",
             "NVIDIA_VISIBLE_DEVICES", "NVIDIA_DRIVER_CAPABILITIES", "LD_LIBRARY_PATH", "TZ", "HF_HUB_OFFLINE")


# --------------------------------------------------------------------------- the job folder


@dataclass(frozen=True)
class JobFolder:
    """One job process's folder: `in/` (its inputs, read-only to it), `work/` (the only place it may write) and
    `child.log` (its output, which it cannot read back or see)."""

    root: Path

    @property
    def inputs(self) -> Path:
        return self.root / "in"

    @property
    def work(self) -> Path:
        return self.root / "work"

    @property
    def log_path(self) -> Path:
        return self.root / "child.log"

    @classmethod
    def create(cls, parent: Path) -> "JobFolder":
        folder = cls(parent / uuid.uuid4().hex)
        folder.root.mkdir(parents=True, mode=0o700)
        folder.inputs.mkdir(mode=0o700)
        folder.work.mkdir(mode=0o700)
        (folder.work / "tmp").mkdir(mode=0o700)
        return folder

    def place_input(self, name: str, source: Path) -> Path:
        """Make `source` available to the job as `in/<name>`: a hard link (no copy) where the file system allows
        one, else a copy. The job can only read it."""
        dest = self.inputs / name
        try:
            os.link(source, dest)
        except OSError:
            shutil.copyfile(source, dest)
        return dest

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


# --------------------------------------------------------------------------- what this machine offers


@dataclass(frozen=True)
class Support:
    """The layers this machine offers a job process, found once per worker process by trying them."""

    mode: str  # "strict" | "permissive"
    namespaces: bool
    namespaces_reason: str
    landlock_abi: int
    seccomp: bool
    python_path: tuple[str, ...] = field(default=(), repr=False)
    checks: dict[str, bool] = field(default_factory=dict)  # the start-up self-test: what held

    @property
    def layers(self) -> dict[str, bool]:
        return {"namespaces": self.namespaces, "landlock": self.landlock_abi > 0, "seccomp": self.seccomp,
                "rlimits": True, "python_isolated": True}

    @property
    def missing(self) -> list[str]:
        return [name for name, ok in self.layers.items() if not ok]

    @property
    def confined(self) -> bool:
        """File confinement and the system-call filter both hold: untrusted code cannot reach files, the network or
        other processes."""
        return (self.namespaces or self.landlock_abi > 0) and self.seccomp and bool(self.checks) and all(
            self.checks.values())

    @property
    def runs_untrusted(self) -> bool:
        return self.confined or self.mode == "permissive"

    def describe(self) -> dict:
        return {"mode": self.mode, "layers": self.layers, "landlock_abi": self.landlock_abi,
                "namespaces_note": self.namespaces_reason or None, "self_test": self.checks,
                "untrusted_formats": sorted(UNTRUSTED_FORMATS),
                "runs_untrusted_formats": self.runs_untrusted}

    def refusal(self, model_format: str) -> str | None:
        """Why a job on a `model_format` upload must not run here, or None."""
        if model_format in UNTRUSTED_FORMATS and not self.runs_untrusted:
            failed = [name for name, ok in self.checks.items() if not ok]
            gaps = self.missing + [f"self-test '{name}'" for name in failed]
            return (f"this worker does not run {model_format} models: loading one runs the uploader's code, and the "
                    f"job sandbox is missing {', '.join(gaps)} (DISTILLERY_JOB_SANDBOX=strict); see "
                    "docs/security.md")
        return None

    def summary(self) -> str:
        """One line for the worker's start-up log."""
        layers = ", ".join(f"{name} {'yes' if ok else 'NO'}" for name, ok in self.layers.items())
        held = "all checks held" if self.checks and all(self.checks.values()) else (
            "failed: " + ", ".join(k for k, ok in self.checks.items() if not ok) if self.checks else "not run")
        verdict = "TorchScript jobs run" if self.runs_untrusted else "TorchScript jobs are REFUSED"
        note = f" ({self.namespaces_reason})" if self.namespaces_reason else ""
        return (f"job sandbox ({self.mode}): {layers}; landlock ABI {self.landlock_abi}{note}; self-test {held}; "
                f"{verdict}")


_support: Support | None = None
_support_lock = threading.Lock()


def support(mode: str = "strict") -> Support:
    """This machine's layers (tried once per process and mode)."""
    global _support
    with _support_lock:
        if _support is None or _support.mode != mode:
            _support = _detect(mode)
        return _support


def _detect(mode: str) -> Support:
    python_path = _child_python_path()
    namespaces, reason = _try_namespaces(python_path)
    found = Support(mode=mode, namespaces=namespaces, namespaces_reason=reason, landlock_abi=landlock.abi_version(),
                    seccomp=seccomp.available(), python_path=python_path)
    return replace(found, checks=self_test(found))


def self_test(sup: Support) -> dict[str, bool]:
    """Run worker/sandbox/selftest.py in a sandbox with `sup`'s layers: {check: held}; {} if it could not run."""
    with tempfile.TemporaryDirectory(prefix="distillery-sandbox-test-") as tmp:
        canary = Path(tmp) / "canary"
        canary.write_text("a file outside the job folder")
        folder = JobFolder.create(Path(tmp) / "jobs")
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(8)
            argv, env = command(folder, "worker.sandbox.selftest",
                                [str(canary), str(os.getpid()), str(listener.getsockname()[1])], sup,
                                disk_limit_bytes=1024**2)
            try:
                out = subprocess.run(argv, env=env, cwd=folder.work, capture_output=True, text=True, timeout=120)
                checks = json.loads(out.stdout)["checks"]
            except (OSError, subprocess.SubprocessError, ValueError, KeyError) as exc:
                log.error("the job sandbox's self-test could not run: %s", exc)
                return {}
        checks["write_outside"] = checks.get("write_outside", False) and not (Path(tmp) / "written-by-job").exists()
        return {str(k): bool(v) for k, v in checks.items()}


def _child_python_path() -> tuple[str, ...]:
    """The import path of `python -I` (what the job process will have): the folders it must be able to read."""
    out = subprocess.run([sys.executable, "-I", "-c", "import json, sys; print(json.dumps(sys.path))"],
                         capture_output=True, text=True, timeout=60, check=True)
    return tuple(p for p in json.loads(out.stdout) if p and os.path.isabs(p))


def _try_namespaces(python_path: tuple[str, ...]) -> tuple[bool, str]:
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return False, "bubblewrap (bwrap) is not installed"
    probe = [*_bwrap_args(bwrap, None, python_path), sys.executable, "-I", "-c", "pass"]
    try:
        out = subprocess.run(probe, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        return False, f"bwrap could not start: {exc}"
    if out.returncode != 0:
        return False, f"bwrap could not create the namespaces: {out.stderr.strip()[-300:]}"
    return True, ""


# --------------------------------------------------------------------------- the command and environment


def read_paths(python_path: tuple[str, ...]) -> list[str]:
    """Everything a job process may read besides its inputs: the system, the Python installation and the code."""
    paths = [*_SYSTEM_READ, sys.base_prefix, sys.base_exec_prefix, sys.prefix, sys.exec_prefix, *python_path]
    for package in ("worker", "app"):
        paths.append(str(Path(__file__).resolve().parents[2] / package))
    real = sorted({os.path.realpath(p) for p in paths if os.path.exists(p)})
    out: list[str] = []
    for p in real:  # sorted: a folder comes before what lies inside it, which it already covers
        if not any(p.startswith(q.rstrip("/") + "/") for q in out):
            out.append(p)
    return out


def gpu_devices() -> list[str]:
    dev = Path("/dev")
    found = sorted(str(p) for p in dev.glob("nvidia*") if not p.is_dir())
    found += sorted(str(p) for p in (dev / "nvidia-caps").glob("*")) if (dev / "nvidia-caps").is_dir() else []
    return found


def _bwrap_args(bwrap: str, folder: JobFolder | None, python_path: tuple[str, ...]) -> list[str]:
    args = [bwrap, "--die-with-parent", "--unshare-all", "--unshare-user", "--cap-drop", "ALL",
            "--uid", str(SANDBOX_ID), "--gid", str(SANDBOX_ID), "--hostname", "job", "--clearenv"]
    for link in _ROOT_LINKS:
        if os.path.islink(link):
            args += ["--symlink", os.readlink(link), link]
        elif os.path.isdir(link):
            args += ["--ro-bind", link, link]
    for path in read_paths(python_path):
        args += ["--ro-bind", path, path]
    args += ["--proc", "/proc", "--dev", "/dev"]
    gpus = gpu_devices()
    for device in gpus:
        args += ["--dev-bind", device, device]
    if gpus:
        for path in _GPU_READ:
            args += ["--ro-bind-try", path, path]
    if folder is not None:
        args += ["--ro-bind", str(folder.inputs), str(folder.inputs), "--bind", str(folder.work), str(folder.work),
                 "--chdir", str(folder.work)]
    args += ["--remount-ro", "/"]
    for key, value in job_env(folder).items():
        args += ["--setenv", key, value]
    return args


def job_env(folder: JobFolder | None) -> dict[str, str]:
    """The job process's whole environment: an allow-list, no credentials (the database, broker, object-store and
    webhook settings all stay with the worker)."""
    env = {k: os.environ[k] for k in _ENV_PASS if k in os.environ}
    home = str(folder.work) if folder is not None else "/"
    env.update({"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": home, "USER": "job",
                "TMPDIR": str(folder.work / "tmp") if folder is not None else "/tmp",
                "XDG_CACHE_HOME": str(folder.work / "tmp") if folder is not None else "/tmp"})
    return env


@dataclass(frozen=True)
class Plan:
    """What the job process applies to itself at start (passed on its command line by the worker, which the
    process trusts: nothing of the upload has been read yet)."""

    folder: str
    read: list[str]
    devices: list[str]
    landlock: bool
    seccomp: bool
    disk_limit_bytes: int
    plugins: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str) -> "Plan":
        return cls(**json.loads(raw))


def command(folder: JobFolder, module: str, args: list[str], sup: Support, *, disk_limit_bytes: int,
            plugins: list[str] | None = None) -> tuple[list[str], dict[str, str]]:
    """argv and environment that start `python -m module` as a sandboxed job process in `folder`."""
    plugins = [str(Path(p).resolve()) for p in plugins or []]
    read = read_paths(sup.python_path) + sorted(_PROC_READ) + ["/proc/self"] + plugins
    plan = Plan(folder=str(folder.root), read=read, devices=[*_DEVICES, *gpu_devices()],
                landlock=sup.landlock_abi > 0, seccomp=sup.seccomp, disk_limit_bytes=disk_limit_bytes,
                plugins=plugins)
    python = [sys.executable, "-I", "-B", "-u", "-m", module, plan.to_json(), *args]
    if not sup.namespaces:
        return python, job_env(folder)
    argv = _bwrap_args(shutil.which("bwrap") or "bwrap", folder, sup.python_path)
    for plugin in plugins:
        i = argv.index("--proc")
        argv[i:i] = ["--ro-bind", plugin, plugin]
    return [*argv, *python], job_env(folder)


# --------------------------------------------------------------------------- inside the job process


def confine(plan: Plan) -> dict:
    """Called first thing in the job process, while it has one thread: resource limits and Landlock. Raises if a
    planned layer cannot be applied (the process must not go on without it)."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (plan.disk_limit_bytes, plan.disk_limit_bytes))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    cap = MAX_OPEN_FILES if hard == resource.RLIM_INFINITY else min(MAX_OPEN_FILES, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, cap) if soft != resource.RLIM_INFINITY else cap, cap))
    applied = {"rlimits": True, "landlock": False, "seccomp": False}
    if plan.landlock:
        if threading.active_count() != 1 or len(os.listdir("/proc/self/task")) != 1:
            raise RuntimeError("Landlock must be applied while the process has one thread")
        folder = JobFolder(Path(plan.folder))
        grants = landlock.Grants(read=tuple(Path(p) for p in [*plan.read, str(folder.inputs)]),
                                 write=(folder.work,), devices=tuple(Path(p) for p in plan.devices))
        landlock.restrict_self(grants)
        applied["landlock"] = True
    return applied


def confine_syscalls(plan: Plan, applied: dict) -> dict:
    """Called once the engine is imported, before the job's spec is read: the system-call filter."""
    if plan.seccomp:
        seccomp.install()
        applied["seccomp"] = True
    return applied
