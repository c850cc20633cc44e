"""Build hook of the distillery-client wheel (app/client/pyproject.toml): decides what the wheel holds.

It holds every module of app/client (this _dist folder excepted) and the modules of the server package the client
imports, `from app.jobs.schemas import JobOut` and the like, at the top of a module or inside a function, followed
transitively (app.jobs.schemas imports app.core.ids and app.webhooks.schemas), with the __init__.py of their
packages. app/__init__.py is not shipped: `app` is an implicit namespace package in a client-only install.

Every module shipped may import only the standard library, the distribution's dependencies (httpx, pydantic) and
other shipped modules: one that imports anything else (fastapi, sqlalchemy, ...) fails the build, naming the module
and the import, rather than making a wheel that cannot be imported without the server.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

from hatchling.builders.hooks.plugin.interface import BuildHookInterface
from packaging.requirements import Requirement


class ClientFiles(BuildHookInterface):
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict) -> None:
        if version != "standard":  # editable: the repository root goes on sys.path (dev-mode-dirs)
            return
        allowed = {Requirement(dep).name.replace("-", "_") for dep in self.metadata.core.dependencies}
        for path, target in wheel_files(Path(self.root).resolve(), allowed).items():
            build_data["force_include"][str(path)] = target


def wheel_files(client_dir: Path, allowed: set[str]) -> dict[Path, str]:
    """{source file: its path in the wheel} for the client package at `client_dir` (= <repo>/app/client)."""
    repo = client_dir.parents[1]
    todo = [p for p in sorted(client_dir.rglob("*.py"))
            if "__pycache__" not in p.parts and "_dist" not in p.relative_to(client_dir).parts]
    files: dict[Path, str] = {}
    problems: list[str] = []
    while todo:
        path = todo.pop()
        if path in files:
            continue
        files[path] = path.relative_to(repo).as_posix()
        for parent in path.relative_to(repo).parents[:-2]:  # app/x/__init__.py, not app/__init__.py
            init = repo / parent / "__init__.py"
            if init.is_file() and init not in files:
                todo.append(init)
        for lineno, module in imports(path, repo):
            top = module.split(".")[0]
            if module == "app":  # the namespace package itself: nothing to ship
                continue
            if top == "app":
                found = module_file(repo, module)
                if found is None:
                    problems.append(f"{files[path]}:{lineno}: imports {module}, which is not in the repository")
                else:
                    todo.append(found)
            elif top not in allowed and top not in sys.stdlib_module_names:
                problems.append(f"{files[path]}:{lineno}: imports {module} (only the standard library, "
                                f"{', '.join(sorted(allowed))} and the client's own modules can go in the client "
                                "distribution)")
    if problems:
        raise RuntimeError("distillery-client cannot be built:\n  " + "\n  ".join(problems))
    return files


def imports(path: Path, repo: Path) -> list[tuple[int, str]]:
    """(line, module) for every import in the file, relative ones resolved; `from M import n` yields M and, where
    n is a module of package M, M.n."""
    package = ".".join(path.relative_to(repo).with_suffix("").parts).rpartition(".")[0]  # app/x/y.py, app/x/__init__.py: app.x
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_bytes(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.append((node.lineno, base))
            if base.split(".")[0] == "app":
                found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names
                          if module_file(repo, f"{base}.{alias.name}") is not None]
    return found


def module_file(repo: Path, module: str) -> Path | None:
    base = repo.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None
