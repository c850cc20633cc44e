"""Workers publish what they can run when they start; the API aggregates the live ones."""
from __future__ import annotations

from sqlalchemy.orm import Session

from app.core.db import cutoff
from app.core.tables import WorkerRow
from app.fleet import repository as repo
from app.fleet.schemas import CapabilitiesOut, MethodCapability, WorkerOut


def _worker_out(row: WorkerRow, live: bool) -> WorkerOut:
    info = row.info or {}
    return WorkerOut(name=row.name, queues=[q for q in row.queues.split(",") if q], device=row.device, live=live,
                     started_at=row.started_at, last_seen_at=row.last_seen_at,
                     builtin_datasets=info.get("builtin_datasets", {}), sandbox=info.get("sandbox"))


def capabilities(session: Session, live_within_s: float) -> CapabilitiesOut:
    since = cutoff(live_within_s)
    rows = repo.all_by_name(session)
    merged: dict[tuple[str, str], MethodCapability] = {}
    builtins: dict[str, bool] = {}
    workers = []
    for row in rows:
        live = row.last_seen_at >= since
        workers.append(_worker_out(row, live))
        if not live:
            continue
        info = row.info or {}
        for name, ok in info.get("builtin_datasets", {}).items():
            builtins[name] = builtins.get(name, False) or bool(ok)
        for m in info.get("methods", []):
            key = (m["kind"], m["method"])
            cap = merged.setdefault(key, MethodCapability(kind=m["kind"], method=m["method"], input_formats=[],
                                                          output_formats=[], devices=[]))
            cap.input_formats = sorted(set(cap.input_formats) | set(m.get("input_formats", [])))
            cap.output_formats = sorted(set(cap.output_formats) | set(m.get("output_formats", [])))
            cap.devices = sorted(set(cap.devices) | set(m.get("devices", [])))
    return CapabilitiesOut(methods=sorted(merged.values(), key=lambda c: (c.kind, c.method)),
                           builtin_datasets=builtins, workers=workers)
