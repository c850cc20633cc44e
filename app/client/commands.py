"""The client commands of `distillery` (models, datasets, jobs, artifacts, capabilities, and the quantize / prune /
distill shortcuts), registered into app/cli.py's parser by `register`. They talk to a running service over HTTP
through the SDK and need no Settings: `--url` / $DISTILLERY_URL and `--api-key` / $DISTILLERY_API_KEY.

Exit codes, for pipelines: 0 success; 1 the job failed or was cancelled; 2 usage error; 3 the API refused the
request (4xx: unknown id, invalid config, conflict, quota, auth); 4 service unavailable (503, connection error,
5xx, a corrupt download); 5 `--timeout` passed before the job ended (the job goes on); 130 interrupted.

With --json, stdout carries exactly one JSON document whatever happens (`jobs events`: one object a line): the
result, or {"error": {"code", "message", "status_code", "detail"}, "exit_code": N}, usage errors found by argparse
included (JsonArgumentParser). Numbers in text output are written by app.client.fmt.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_args

from pydantic import BaseModel
from pydantic import ValidationError as PydanticValidationError

from app.client import fmt
from app.client.client import DEFAULT_URL, Client, Job
from app.client.errors import (ApiError, DistilleryError, DownloadError, JobFailed, ServerError, ServiceUnavailable,
                               WaitTimeout)
from app.client.progress import ProgressBar
from app.client.report import format_report

EXIT_OK, EXIT_JOB_FAILED, EXIT_USAGE, EXIT_API, EXIT_UNAVAILABLE, EXIT_TIMEOUT = 0, 1, 2, 3, 4, 5
EXIT_INTERRUPTED = 130
_ID = re.compile(r"^[0-9a-f]{32}$")

EPILOG = f"""environment:
  DISTILLERY_URL      the service (default {DEFAULT_URL}); --url overrides it
  DISTILLERY_API_KEY  the API key sent as 'Authorization: Bearer'; --api-key overrides it

exit codes:
  0 success   1 job failed or cancelled   2 usage error   3 API error (4xx)
  4 service unavailable or connection error   5 --timeout passed   130 interrupted"""


class UsageError(Exception):
    """A bad command line the parser could not see (a missing file, bad JSON): exit 2."""


# -- --json for usage errors ---------------------------------------------------------------------------------------
# argparse reports a bad command line (a missing argument, a bad choice, an id that is not one) itself, before any
# command runs: it prints to stderr and exits 2. Under --json the parser also writes the error document on stdout.

_ARGV: list[str] | None = None  # the command line being parsed, while it is


def json_requested(argv: list[str] | None) -> bool:
    """Whether a command line asks for --json (or an unambiguous abbreviation), before any '--'."""
    for token in argv or ():
        if token == "--":
            return False
        if token.startswith("--js") and "--json".startswith(token):
            return True
    return False


def error_document(code: str, message: str, exit_code: int, *, status_code: int | None = None,
                   detail: Any = None) -> dict[str, Any]:
    """The one shape every --json error takes on stdout."""
    return {"error": {"code": code, "message": message, "status_code": status_code,
                      "detail": detail if detail is not None else {}}, "exit_code": exit_code}


class JsonArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors, when the command line has --json, also print the error document on stdout
    (the usual usage and message still go to stderr; the exit status stays 2)."""

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        with _parsing(args):
            return super().parse_args(args, namespace)

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        with _parsing(args):
            return super().parse_known_args(args, namespace)

    def error(self, message: str):  # type: ignore[override]
        if json_requested(_ARGV):
            self.print_usage(sys.stderr)
            print(f"{self.prog}: error: {message}", file=sys.stderr)
            print(json.dumps(error_document("usage_error", message, EXIT_USAGE,
                                            detail={"usage": " ".join(self.format_usage().split())}), indent=2))
            sys.stdout.flush()
            self.exit(EXIT_USAGE)
        super().error(message)


class _parsing:
    """Remembers the whole command line for the outermost parse (subcommand parsers only see their tail)."""

    def __init__(self, args):
        self.args = args
        self.outer = False

    def __enter__(self):
        global _ARGV
        if _ARGV is None:
            self.outer = True
            _ARGV = list(sys.argv[1:] if self.args is None else self.args)

    def __exit__(self, *exc):
        global _ARGV
        if self.outer:
            _ARGV = None


def _json_errors(parser: argparse.ArgumentParser) -> None:
    """Make `parser` and every subcommand parser under it a JsonArgumentParser. app/cli.py builds them as plain
    ArgumentParsers; JsonArgumentParser adds no state, so switching the class of the built parsers is enough."""
    if type(parser) is argparse.ArgumentParser:
        parser.__class__ = JsonArgumentParser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            if action._parser_class is argparse.ArgumentParser:
                action._parser_class = JsonArgumentParser
            for sub in action.choices.values():
                _json_errors(sub)


def _schema_choices(model: type[BaseModel], field: str) -> list[str]:
    return list(get_args(model.model_fields[field].annotation))


def _default(model: type[BaseModel], field: str) -> Any:
    """A config key's default, as the service fills it in (app/methods): the CLI's help never restates one."""
    return model.model_fields[field].get_default(call_default_factory=True)


def _json_arg(text: str) -> Any:
    """A JSON value, or @FILE to read it from a file."""
    try:
        if text.startswith("@"):
            return json.loads(Path(text[1:]).read_text())
        return json.loads(text)
    except (OSError, ValueError) as exc:
        raise argparse.ArgumentTypeError(f"not JSON (or @FILE of JSON): {exc}") from None


def _json_object(text: str) -> dict:
    value = _json_arg(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError("expected KEY=VALUE")
    return key, value


def _batch_sizes(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("expected a comma list of integers, e.g. 1,64") from None


def _id(text: str) -> str:
    if not _ID.match(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not an id (32 lowercase hex characters)")
    return text


# -- output ------------------------------------------------------------------------------------------------------


class Out:
    """Where a command writes: machine output (--json) or text on stdout; notes and bars on stderr."""

    def __init__(self, json_mode: bool):
        self.json_mode = json_mode
        self.lines = False  # JSON lines (jobs events): an error document is one line too
        self.tty = _isatty(sys.stderr) and not json_mode

    def bar(self) -> ProgressBar:
        return ProgressBar(sys.stderr, enabled=self.tty)

    def note(self, text: str) -> None:
        if not self.json_mode:
            print(text, file=sys.stderr)

    def data(self, value: Any, text: Callable[[], str] | str | None = None) -> None:
        if self.json_mode:
            print(json.dumps(_plain(value), indent=2, sort_keys=False))
        elif text is not None:
            print(text() if callable(text) else text)
        else:
            print(json.dumps(_plain(value), indent=2))


def _plain(value: Any) -> Any:
    if isinstance(value, Job):
        value = value.info
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _table(rows: list[list[str]], header: list[str]) -> str:
    if not rows:
        return "(none)"
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows])


def _when(dt) -> str:
    return dt.strftime("%Y-%m-%d %H:%M:%S") if dt else "-"


def _labels_text(labels: dict | None) -> str:
    return ",".join(f"{k}={v}" for k, v in (labels or {}).items()) or "-"


def _model_text(m) -> str:
    lines = [f"id        {m.id}", f"name      {m.name}", f"format    {m.format}",
             f"size      {fmt.size(m.size_bytes)} ({fmt.count(m.size_bytes)} bytes)", f"sha256    {m.sha256}",
             f"owner     {m.owner}", f"created   {_when(m.created_at)}"]
    if getattr(m, "labels", None):
        lines.append(f"labels    {_labels_text(m.labels)}")
    insp = m.inspection
    for kind, specs in (("input", insp.inputs), ("output", insp.outputs)):
        for s in specs:
            lines.append(f"{kind:<9} {s.name} {s.dtype} {s.shape}")
    if insp.params is not None:
        lines.append(f"params    {fmt.count(insp.params)}")
    return "\n".join(lines)


def _dataset_text(d) -> str:
    lines = [f"id        {d.id}", f"name      {d.name}", f"size      {fmt.size(d.size_bytes)}",
             f"sha256    {d.sha256}",
             f"samples   {fmt.count(d.n_samples)} (+{fmt.count(d.n_test)} test; split {d.split})",
             f"inputs    {', '.join(d.inputs)}", f"labels    {'yes' if d.has_labels else 'no'}"
             + (f" ({fmt.count(d.num_classes)} classes)" if d.num_classes else ""), f"created   {_when(d.created_at)}"]
    for name, info in d.arrays.items():
        lines.append(f"array     {name} {info.dtype} {info.shape}")
    return "\n".join(lines)


def _job_text(j) -> str:
    info = j.info if isinstance(j, Job) else j
    lines = [f"id        {info.id}", f"kind      {info.kind}", f"status    {info.status}",
             f"progress  {fmt.percent(info.progress)}  {info.stage}", f"model     {info.model_id}",
             f"dataset   {info.dataset_id or '-'}", f"config    {json.dumps(info.config)}",
             f"device    {info.device or info.device_requested}", f"attempts  {info.attempts}/{info.max_attempts}",
             f"created   {_when(info.created_at)}", f"finished  {_when(info.finished_at)}"]
    if getattr(info, "labels", None):
        lines.append(f"labels    {_labels_text(info.labels)}")
    if info.error:
        lines.append(f"error     {info.error.code}: {info.error.message}")
    if info.artifact_id:
        lines.append(f"artifact  {info.artifact_id}")
    if info.metrics:
        lines += ["", format_report(info.metrics)]
    return "\n".join(lines)


def _artifact_text(a) -> str:
    return "\n".join([f"id        {a.id}", f"job       {a.job_id}", f"format    {a.format}",
                      f"filename  {a.filename}",
                      f"size      {fmt.size(a.size_bytes)} ({fmt.count(a.size_bytes)} bytes)",
                      f"sha256    {a.sha256}", f"created   {_when(a.created_at)}"])


# -- commands ----------------------------------------------------------------------------------------------------


def _upload_progress(out: Out, path: str | os.PathLike, bar: ProgressBar):
    return bar.upload(f"uploading {Path(path).name}") if out.tty else None


def _check_file(path: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"no such file: {path}")
    return p


def _stored(record: Any, existing: bool) -> dict[str, Any]:
    """A model or dataset record for --json, with `existing`: true when the service already had this content (the
    file was not uploaded again)."""
    return {**_plain(record), "existing": existing}


def _ensure_model(client: Client, out: Out, path: Path, name: str | None,
                  labels: dict[str, str] | None = None) -> tuple[Any, bool]:
    """The model of this file: reused when the service already stores the same content (sha256), else uploaded."""
    m, existing = client.ensure_model(path, name, labels=labels, progress=_upload_progress(out, path, out.bar()))
    _say_stored(out, "model", m, name, existing, fmt.size(m.size_bytes))
    return m, existing


def _ensure_dataset(client: Client, out: Out, path: Path, name: str | None = None) -> tuple[Any, bool]:
    d, existing = client.ensure_dataset(path, name, progress=_upload_progress(out, path, out.bar()))
    _say_stored(out, "dataset", d, name, existing, f"{fmt.count(d.n_samples)} samples, {fmt.size(d.size_bytes)}")
    return d, existing


def _say_stored(out: Out, what: str, item: Any, name: str | None, existing: bool, sizes: str) -> None:
    if existing:
        renamed = f"; stored as {item.name!r}, --name not applied" if name and name != item.name else ""
        out.note(f"using {what} {item.id} (already uploaded{renamed})")
    else:
        out.note(f"{what} {item.id} uploaded ({sizes})")


def cmd_models_upload(client: Client, args, out: Out) -> int:
    path = _check_file(args.file)
    m, existing = _ensure_model(client, out, path, args.name, dict(args.label) or None)
    out.data(_stored(m, existing), lambda: _model_text(m))
    return EXIT_OK


def cmd_models_list(client: Client, args, out: Out) -> int:
    labels = [f"{k}:{v}" for k, v in args.label] or None
    if args.all:
        items = list(client.iter_models(labels=labels))
        page = {"items": items, "next_cursor": None}
    else:
        p = client.list_models(cursor=args.cursor, limit=args.limit, labels=labels)
        items, page = p.items, p
    out.data(page, lambda: _table([[m.id, m.name, m.format, fmt.size(m.size_bytes), _when(m.created_at)]
                                   for m in items], ["ID", "NAME", "FORMAT", "SIZE", "CREATED"])
             + _more(page))
    return EXIT_OK


def _more(page) -> str:
    cursor = page["next_cursor"] if isinstance(page, dict) else page.next_cursor
    return f"\n(more: --cursor {cursor}, or --all)" if cursor else ""


def cmd_models_show(client: Client, args, out: Out) -> int:
    m = client.get_model(args.id)
    out.data(m, lambda: _model_text(m))
    return EXIT_OK


def cmd_models_delete(client: Client, args, out: Out) -> int:
    client.delete_model(args.id)
    out.data({"deleted": args.id}, f"deleted model {args.id}")
    return EXIT_OK


def cmd_datasets_upload(client: Client, args, out: Out) -> int:
    path = _check_file(args.file)
    d, existing = _ensure_dataset(client, out, path, args.name)
    out.data(_stored(d, existing), lambda: _dataset_text(d))
    return EXIT_OK


def cmd_datasets_list(client: Client, args, out: Out) -> int:
    if args.all:
        items = list(client.iter_datasets())
        page = {"items": items, "next_cursor": None}
    else:
        p = client.list_datasets(cursor=args.cursor, limit=args.limit)
        items, page = p.items, p
    out.data(page, lambda: _table([[d.id, d.name, fmt.count(d.n_samples), fmt.size(d.size_bytes), _when(d.created_at)]
                                   for d in items], ["ID", "NAME", "SAMPLES", "SIZE", "CREATED"]) + _more(page))
    return EXIT_OK


def cmd_datasets_show(client: Client, args, out: Out) -> int:
    d = client.get_dataset(args.id)
    out.data(d, lambda: _dataset_text(d))
    return EXIT_OK


def _model_ref(text: str) -> dict[str, Any]:
    """MODEL on the command line: a file (uploaded), a model id, or artifact:ID (an earlier job's artifact)."""
    if text.startswith("artifact:"):
        return {"model": None, "artifact_id": _id(text.split(":", 1)[1])}
    if _ID.match(text) and not Path(text).is_file():
        return {"model": text}
    return {"model": _check_file(text)}


def _dataset_ref(text: str | None) -> Any:
    if text is None or text.startswith("builtin:") or (_ID.match(text) and not Path(text).is_file()):
        return text
    return _check_file(text)


def _job_fields(args) -> dict[str, Any]:
    fields: dict[str, Any] = dict(getattr(args, "option", None) or [])
    if args.device:
        fields["device"] = args.device
    if args.label:
        fields["labels"] = dict(args.label)
    if args.callback_url:
        fields["callback_url"] = args.callback_url
    return fields


def _submit(client: Client, args, out: Out, kind: str, config: dict[str, Any]) -> tuple[Job, dict[str, Any]]:
    """Use (or upload, with a bar) what is a file, then submit; returns the job and, for --json, the records of the
    files given with `existing` (true: the service already had that content and nothing was uploaded)."""
    ref = _model_ref(args.model)
    dataset = _dataset_ref(args.dataset)
    files: dict[str, Any] = {}
    if isinstance(ref.get("model"), Path):
        m, existing = _ensure_model(client, out, ref["model"], getattr(args, "name", None))
        files["model"] = _stored(m, existing)
        ref["model"] = m.id
    if isinstance(dataset, Path):
        d, existing = _ensure_dataset(client, out, dataset)
        files["dataset"] = _stored(d, existing)
        dataset = d.id
    model = ref.pop("model")
    job = client.submit_job(kind, model, config, dataset=dataset, idempotency_key=getattr(args, "idempotency_key", None),
                            **_job_fields(args), **ref)
    out.note(f"job {job.id} submitted ({kind}, {config.get('method') or 'student'}); status {job.status}")
    return job, files


def _wait(job: Job, out: Out, timeout: float | None) -> Job:
    bar = out.bar()
    try:
        job.wait(progress=bar.job if out.tty else False, timeout=timeout, raise_on_failure=False)
    except KeyboardInterrupt:
        bar.done()
        print(f"\ninterrupted: job {job.id} goes on on the server (distillery jobs cancel {job.id} stops it)",
              file=sys.stderr)
        raise
    finally:
        bar.done()
    return job


def _job_exit(job: Job, out: Out) -> int:
    if job.status == "succeeded":
        return EXIT_OK
    err = job.error
    print(f"error: job {job.id} {job.status}" + (f": {err.code}: {err.message}" if err else ""), file=sys.stderr)
    return EXIT_JOB_FAILED


def cmd_jobs_submit(client: Client, args, out: Out) -> int:
    job, files = _submit(client, args, out, args.kind, args.config or {})
    if args.wait:
        _wait(job, out, args.timeout)
    # --json: the job; with `uploads` (model / dataset records, each with `existing`) when files were given
    out.data({**_plain(job), "uploads": files} if files else job, lambda: _job_text(job))
    return _job_exit(job, out) if args.wait else EXIT_OK


def cmd_jobs_list(client: Client, args, out: Out) -> int:
    filters = {"status": args.status, "kind": args.kind, "model_id": args.model,
               "labels": [f"{k}:{v}" for k, v in args.label] or None}
    if args.all:
        items = list(client.iter_jobs(**filters))
        page = {"items": items, "next_cursor": None}
    else:
        p = client.list_jobs(cursor=args.cursor, limit=args.limit, **filters)
        items, page = p.items, p
    out.data(page, lambda: _table([[j.id, j.kind, j.status, fmt.percent(j.progress), j.stage[:40], _when(j.created_at)]
                                   for j in items], ["ID", "KIND", "STATUS", "PROGRESS", "STAGE", "CREATED"])
             + _more(page))
    return EXIT_OK


def cmd_jobs_show(client: Client, args, out: Out) -> int:
    job = client.get_job(args.id)
    out.data(job, lambda: _job_text(job))
    return EXIT_OK


def cmd_jobs_wait(client: Client, args, out: Out) -> int:
    job = _wait(client.get_job(args.id), out, args.timeout)
    out.data(job, lambda: _job_text(job))
    return _job_exit(job, out)


def cmd_jobs_cancel(client: Client, args, out: Out) -> int:
    job = client.cancel_job(args.id)
    out.data(job, f"job {job.id}: {job.status} ({job.stage})")
    return EXIT_OK


def cmd_jobs_events(client: Client, args, out: Out) -> int:
    out.lines = True
    for ev in client.job_events(args.id, args.last_event_id, timeout=args.timeout):
        if out.json_mode:
            print(ev.model_dump_json(), flush=True)
        else:
            print(f"{ev.seq:>5}  {_when(ev.at)}  {ev.status:<9} {fmt.percent(ev.progress):>6}  {ev.stage}", flush=True)
    return EXIT_OK


def cmd_artifacts_show(client: Client, args, out: Out) -> int:
    a = client.get_artifact(args.id)
    out.data(a, lambda: _artifact_text(a))
    return EXIT_OK


def cmd_artifacts_download(client: Client, args, out: Out) -> int:
    bar = out.bar()
    path = client.download_artifact(args.id, args.output, progress=bar.upload("downloading") if out.tty else None)
    out.data({"artifact_id": args.id, "path": str(path), "size_bytes": path.stat().st_size},
             f"saved {path} ({fmt.size(path.stat().st_size)})")
    return EXIT_OK


def cmd_capabilities(client: Client, args, out: Out) -> int:
    caps = client.capabilities()

    def text() -> str:
        rows = [[c.kind, c.method, ",".join(c.input_formats), ",".join(c.output_formats), ",".join(c.devices)]
                for c in caps.methods]
        builtin = ", ".join(f"{k}{'' if v else ' (missing)'}" for k, v in caps.builtin_datasets.items())
        workers = ", ".join(f"{w.name} ({w.device})" for w in caps.workers if w.live) or "none live"
        return (_table(rows, ["KIND", "METHOD", "INPUTS", "OUTPUTS", "DEVICES"])
                + f"\nbuilt-in datasets: {builtin or '-'}\nworkers: {workers}")

    out.data(caps, text)
    return EXIT_OK


def _benchmark(args) -> dict[str, Any]:
    bench: dict[str, Any] = {}
    if args.batch_sizes:
        bench["batch_sizes"] = args.batch_sizes
    if args.repeats is not None:
        bench["repeats"] = args.repeats
    if args.warmup is not None:
        bench["warmup"] = args.warmup
    return bench


def _shortcut_config(args) -> dict[str, Any]:
    config: dict[str, Any] = {}
    if args.kind == "quantize":
        config["method"] = args.method
        calib = {k: v for k, v in (("samples", args.calibration_samples), ("method", args.calibration_method))
                 if v is not None}
        if calib:
            config["calibration"] = calib
        if args.max_accuracy_drop is not None:
            config["max_accuracy_drop"] = args.max_accuracy_drop
    elif args.kind == "prune":
        config["method"] = args.method
        for key in ("ratio", "sparsity", "scope", "round_to"):
            if getattr(args, key) is not None:
                config[key] = getattr(args, key)
        if args.fine_tune_epochs:
            config["fine_tune"] = {"epochs": args.fine_tune_epochs,
                                   **({"lr": args.fine_tune_lr} if args.fine_tune_lr is not None else {})}
    else:
        config["student"] = args.student
        for key in ("epochs", "temperature", "alpha", "lr", "batch_size", "train_samples"):
            if getattr(args, key) is not None:
                config[key] = getattr(args, key)
        if args.compare_baseline:
            config["compare_baseline"] = True
    if args.output_format:
        config["output_format"] = args.output_format
    bench = _benchmark(args)
    if bench:
        config["benchmark"] = bench
    return {**config, **(args.config or {})}


def cmd_shortcut(client: Client, args, out: Out) -> int:
    """Upload, submit, wait with a live bar, print the before/after table, download the artifact."""
    job, uploaded = _submit(client, args, out, args.kind, _shortcut_config(args))
    _wait(job, out, args.timeout)
    result: dict[str, Any] = {**uploaded, "job": job, "artifact": None, "output": None}
    code = _job_exit(job, out)
    if code != EXIT_OK:  # --json: the job's document, with the error block every failure has, and the exit code
        err = job.error
        result.update(error_document(err.code if err else job.status, err.message if err else f"job {job.status}",
                                     code, detail={"job_id": job.id, "status": job.status}))
    if code == EXIT_OK and job.artifact_id and not args.no_download:
        bar = out.bar()
        artifact = job.artifact()
        path = client.download_artifact(artifact.id, args.output,
                                        progress=bar.upload(f"downloading {artifact.filename}") if out.tty else None)
        result.update(artifact=artifact, output=path)
    if out.json_mode:
        out.data(result)
    else:
        print(_job_text(job) if code != EXIT_OK else format_report(job.metrics))
        if result["output"]:
            print(f"\nartifact {result['artifact'].id} saved to {result['output']} "
                  f"({fmt.size(result['artifact'].size_bytes)})")
    return code


# -- wiring ------------------------------------------------------------------------------------------------------


def run(args) -> int:
    """Run a client command and map what happened to the exit code. With --json, stdout gets exactly one document:
    the command's, or the error document."""
    out = Out(bool(getattr(args, "json", False)))
    # the CLI's output is its own: httpx's per-request INFO lines stay out even where logging is configured
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.WARNING)
    url = getattr(args, "url", None) or os.environ.get("DISTILLERY_URL") or DEFAULT_URL
    api_key = getattr(args, "api_key", None) or os.environ.get("DISTILLERY_API_KEY") or None
    try:
        with Client(url, api_key, retries=args.retries) as client:
            return args.client_func(client, args, out)
    except JobFailed as exc:
        return _fail(out, exc, EXIT_JOB_FAILED)
    except ApiError as exc:
        return _fail(out, exc, EXIT_API)
    except (ServiceUnavailable, ServerError, DownloadError) as exc:
        return _fail(out, exc, EXIT_UNAVAILABLE)
    except WaitTimeout as exc:
        return _fail(out, exc, EXIT_TIMEOUT)
    except (UsageError, argparse.ArgumentTypeError, FileNotFoundError, IsADirectoryError) as exc:
        return _fail(out, DistilleryError(str(exc), code="usage_error"), EXIT_USAGE, f"distillery: error: {exc}")
    except PydanticValidationError as exc:  # the service answered something that is not what the API says
        return _fail(out, DistilleryError(f"unexpected answer from the service: {exc}", code="bad_response"),
                     EXIT_UNAVAILABLE)
    except DistilleryError as exc:  # e.g. a malformed id
        return _fail(out, exc, EXIT_UNAVAILABLE if exc.code == "bad_response" else EXIT_USAGE)
    except KeyboardInterrupt:
        return _fail(out, DistilleryError("interrupted", code="interrupted"), EXIT_INTERRUPTED,
                     "distillery: interrupted")
    except Exception as exc:
        if out.json_mode:  # a bug: still one document on stdout; the traceback follows on stderr (exit 1)
            _emit(out, error_document("client_error", f"{type(exc).__name__}: {exc}", 1))
        raise


def _fail(out: Out, exc: DistilleryError, code: int, text: str | None = None) -> int:
    print(text or f"error: {exc}", file=sys.stderr)
    if out.json_mode:
        _emit(out, error_document(exc.code, exc.message, code, status_code=exc.status_code, detail=exc.detail))
    return code


def _emit(out: Out, doc: dict[str, Any]) -> None:
    print(json.dumps(_plain(doc), indent=None if out.lines else 2), flush=True)


def _client_options(g, suppress: bool) -> None:
    """--url, --api-key, --json, --retries: accepted before the command (defaults) and after it (SUPPRESS, so an
    option given before is not reset by the subcommand's default)."""
    d = (lambda v: argparse.SUPPRESS) if suppress else (lambda v: v)
    g.add_argument("--url", default=d(None), metavar="URL",
                   help=f"the Distillery service (default: $DISTILLERY_URL, else {DEFAULT_URL})")
    g.add_argument("--api-key", default=d(None), metavar="KEY", help="API key (default: $DISTILLERY_API_KEY)")
    g.add_argument("--json", action="store_true", default=d(False),
                   help="machine output: one JSON document on stdout (errors too); no progress bar")
    g.add_argument("--retries", type=int, default=d(4), metavar="N",
                   help="retries on 503 and connection errors, with exponential back-off (default 4)")


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    _client_options(p.add_argument_group("client options"), suppress=True)
    return p


def _add(sub, name: str, func: Callable, help_: str, common, **kw) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_, description=help_, parents=[common], epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter, **kw)
    p.set_defaults(client_func=func)
    return p


def _list_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--limit", type=int, default=None, help="items per page (1..200; default 50)")
    p.add_argument("--cursor", default=None, help="the next_cursor of the previous page")
    p.add_argument("--all", action="store_true", help="every page")


def _job_opts(p: argparse.ArgumentParser, with_model: bool = True) -> None:
    if with_model:
        p.add_argument("--dataset", default=None, metavar="DATA",
                       help="an .npz file (uploaded), a dataset id, or builtin:mnist | builtin:fashion-mnist | "
                            "builtin:digits")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None, help="where it runs (default auto)")
    p.add_argument("--label", type=_label, action="append", default=[], metavar="KEY=VALUE",
                   help="a label on the job (repeatable)")
    p.add_argument("--callback-url", default=None, metavar="URL", help="POSTed the job when it ends (signed)")
    p.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="stop waiting after S seconds (exit 5; the job goes on)")


def _shortcut(sub, common, kind: str, help_: str) -> argparse.ArgumentParser:
    from app.methods import BenchmarkConfig, OutputFormat

    bench = BenchmarkConfig()

    p = _add(sub, kind, cmd_shortcut, help_, common)
    p.set_defaults(kind=kind)
    p.add_argument("model", metavar="MODEL_FILE",
                   help="the model: an ONNX or TorchScript file (uploaded), a model id, or artifact:ID")
    p.add_argument("--name", default=None, help="name of the uploaded model (default: the file name)")
    _job_opts(p)
    p.add_argument("-o", "--output", default=None, metavar="PATH",
                   help="where to save the artifact (a file or a folder; default: its filename here)")
    p.add_argument("--no-download", action="store_true", help="do not download the artifact")
    p.add_argument("--output-format", choices=list(get_args(OutputFormat)), default=None,
                   help="format of the artifact (default: the input's where the method allows, else onnx)")
    p.add_argument("--batch-sizes", type=_batch_sizes, default=None, metavar="1,64",
                   help=f"batch sizes timed (default {','.join(map(str, bench.batch_sizes))})")
    p.add_argument("--repeats", type=int, default=None, help=f"timed runs per batch size (default {bench.repeats})")
    p.add_argument("--warmup", type=int, default=None, help=f"untimed runs first (default {bench.warmup})")
    p.add_argument("--config", type=_json_object, default=None, metavar="JSON",
                   help="more config keys as a JSON object (or @FILE), merged last; see docs/api.md")
    return p


def register(parser: argparse.ArgumentParser, sub) -> None:
    """Add the client commands to `distillery`'s parser (`sub`: its subparsers) and the client options to it."""
    from app.methods import (KINDS, CalibrationConfig, DistillConfig, FineTuneConfig, PruneBase, QuantizeBase,
                             methods_of)

    _client_options(parser.add_argument_group("client options (for the client commands below)"), suppress=False)
    common = _common()

    m = sub.add_parser("models", help="Upload, list, show and delete models on a Distillery service.",
                       description="Models on the service (ONNX or TorchScript files).", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    ms = m.add_subparsers(dest="models_command", required=True, metavar="{upload,list,show,delete}")
    p = _add(ms, "upload", cmd_models_upload, "Upload a model file (streamed; the format is detected).", common)
    p.add_argument("file", help="an .onnx or TorchScript .pt file")
    p.add_argument("--name", default=None, help="a name (default: the file name)")
    p.add_argument("--label", type=_label, action="append", default=[], metavar="KEY=VALUE",
                   help="a label on the model (repeatable)")
    p = _add(ms, "list", cmd_models_list, "List models, newest first.", common)
    _list_opts(p)
    p.add_argument("--label", type=_label, action="append", default=[], metavar="KEY=VALUE",
                   help="only models with this label (repeatable: all must match)")
    p = _add(ms, "show", cmd_models_show, "Show a model: format, size, inputs and outputs.", common)
    p.add_argument("id", type=_id, help="a model id")
    p = _add(ms, "delete", cmd_models_delete, "Delete a model (refused while a queued or running job uses it).",
             common)
    p.add_argument("id", type=_id, help="a model id")

    d = sub.add_parser("datasets", help="Upload, list and show datasets (.npz).",
                       description="Datasets on the service (.npz: x, optional y, x_test, y_test).", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    ds = d.add_subparsers(dest="datasets_command", required=True, metavar="{upload,list,show}")
    p = _add(ds, "upload", cmd_datasets_upload, "Upload an .npz dataset (validated without unpickling).", common)
    p.add_argument("file", help="an .npz file")
    p.add_argument("--name", default=None, help="a name (default: the file name)")
    p = _add(ds, "list", cmd_datasets_list, "List datasets, newest first.", common)
    _list_opts(p)
    p = _add(ds, "show", cmd_datasets_show, "Show a dataset: arrays, samples, labels.", common)
    p.add_argument("id", type=_id, help="a dataset id")

    j = sub.add_parser("jobs", help="Submit, list, show, wait for, cancel and follow jobs.",
                       description="Compression jobs.", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    js = j.add_subparsers(dest="jobs_command", required=True, metavar="{submit,list,show,wait,cancel,events}")
    p = _add(js, "submit", cmd_jobs_submit, "Submit a job with a JSON config (see docs/api.md).", common)
    p.add_argument("--kind", required=True, choices=list(KINDS))
    p.add_argument("--model", required=True, metavar="MODEL",
                   help="a model id, a model file (uploaded), or artifact:ID")
    p.add_argument("--config", type=_json_object, required=True, metavar="JSON",
                   help='the config, e.g. \'{"method": "static_int8"}\' (or @FILE)')
    _job_opts(p)
    p.add_argument("--option", type=lambda t: (lambda k, v: (k, _json_arg(v)))(*_label(t)), action="append",
                   default=[], metavar="FIELD=JSON", help="another top-level job field (repeatable)")
    p.add_argument("--idempotency-key", default=None, metavar="KEY",
                   help="repeat-safe submission key (default: a fresh one)")
    p.add_argument("--wait", action="store_true", help="wait for the end (exit 1 if it fails)")
    p = _add(js, "list", cmd_jobs_list, "List jobs, newest first.", common)
    _list_opts(p)
    p.add_argument("--status", choices=["queued", "running", "succeeded", "failed", "cancelled"], default=None)
    p.add_argument("--kind", choices=list(KINDS), default=None)
    p.add_argument("--model", type=_id, default=None, metavar="ID", help="only jobs on this model")
    p.add_argument("--label", type=_label, action="append", default=[], metavar="KEY=VALUE",
                   help="only jobs with this label (repeatable: all must match)")
    p = _add(js, "show", cmd_jobs_show, "Show a job, with its before/after report once it succeeded.", common)
    p.add_argument("id", type=_id, help="a job id")
    p = _add(js, "wait", cmd_jobs_wait, "Wait for a job to end (progress bar on a terminal); exit 1 if it failed.",
             common)
    p.add_argument("id", type=_id, help="a job id")
    p.add_argument("--timeout", type=float, default=None, metavar="S", help="give up after S seconds (exit 5)")
    p = _add(js, "cancel", cmd_jobs_cancel, "Cancel a queued or running job.", common)
    p.add_argument("id", type=_id, help="a job id")
    p = _add(js, "events", cmd_jobs_events, "Print a job's status events as they happen, until it ends "
             "(--json: one JSON object a line).", common)
    p.add_argument("id", type=_id, help="a job id")
    p.add_argument("--last-event-id", type=int, default=None, metavar="N", help="start after event N")
    p.add_argument("--timeout", type=float, default=None, metavar="S", help="give up after S seconds (exit 5)")

    a = sub.add_parser("artifacts", help="Show and download artifacts (the compressed models).",
                       description="Artifacts: the compressed models jobs produce.", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    as_ = a.add_subparsers(dest="artifacts_command", required=True, metavar="{download,show}")
    p = _add(as_, "download", cmd_artifacts_download, "Download an artifact (resumable: a .part file is continued "
             "with a Range request; checked against its sha256).", common)
    p.add_argument("id", type=_id, help="an artifact id")
    p.add_argument("-o", "--output", default=None, metavar="PATH",
                   help="a file or a folder (default: the artifact's filename here)")
    p = _add(as_, "show", cmd_artifacts_show, "Show an artifact: job, format, size, sha256.", common)
    p.add_argument("id", type=_id, help="an artifact id")

    _add(sub, "capabilities", cmd_capabilities, "What the live workers can run: method x format x device, "
         "built-in datasets.", common)

    p = _shortcut(sub, common, "quantize", "Upload a model (and dataset), quantize it, wait, print the before/after "
                  "report and download the artifact.")
    p.add_argument("--method", required=True, choices=methods_of("quantize"),
                   help="static_int8 needs --dataset (calibration); auto keeps the fastest within the accuracy budget")
    p.add_argument("--calibration-samples", type=int, default=None, metavar="N",
                   help=f"static_int8 (default {_default(CalibrationConfig, 'samples')})")
    p.add_argument("--calibration-method", choices=_schema_choices(CalibrationConfig, "method"), default=None)
    p.add_argument("--max-accuracy-drop", type=float, default=None, metavar="F",
                   help=f"accuracy budget as a fraction (default {_default(QuantizeBase, 'max_accuracy_drop')})")

    p = _shortcut(sub, common, "prune", "Upload a model (and dataset), prune it, wait, print the before/after "
                  "report and download the artifact.")
    p.add_argument("--method", required=True, choices=methods_of("prune"),
                   help="channels: structured (smaller, faster); magnitude: unstructured sparsity")
    p.add_argument("--ratio", type=float, default=None,
                   help=f"channels removed (channels; default {_default(PruneBase, 'ratio')})")
    p.add_argument("--sparsity", type=float, default=None,
                   help=f"target sparsity (magnitude; default {_default(PruneBase, 'sparsity')})")
    p.add_argument("--scope", choices=_schema_choices(PruneBase, "scope"), default=None)
    p.add_argument("--round-to", type=int, default=None, metavar="N",
                   help=f"kept channels rounded to N (default {_default(PruneBase, 'round_to')})")
    p.add_argument("--fine-tune-epochs", type=int, default=None, metavar="N",
                   help="fine-tune N epochs after pruning (needs --dataset)")
    p.add_argument("--fine-tune-lr", type=float, default=None, metavar="LR",
                   help=f"(default {_default(FineTuneConfig, 'lr')})")

    p = _shortcut(sub, common, "distill", "Upload a teacher model (and dataset), distill a student, wait, print "
                  "the before/after report and download the student.")
    p.add_argument("--student", type=_json_object, required=True, metavar="JSON",
                   help='{"arch": "mlp", "hidden": [64]}, {"arch": "cnn", "channels": [8, 16]}, {"shrink": 0.5} '
                        'or {"model_id": "..."}')
    p.add_argument("--epochs", type=int, default=None,
                   help=f"training epochs (default {_default(DistillConfig, 'epochs')})")
    p.add_argument("--temperature", type=float, default=None,
                   help=f"softmax temperature (default {_default(DistillConfig, 'temperature')})")
    p.add_argument("--alpha", type=float, default=None,
                   help=f"weight of the soft-target term (default {_default(DistillConfig, 'alpha')})")
    p.add_argument("--lr", type=float, default=None, help=f"(default {_default(DistillConfig, 'lr')})")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"(default {_default(DistillConfig, 'batch_size')})")
    p.add_argument("--train-samples", type=int, default=None, metavar="N")
    p.add_argument("--compare-baseline", action="store_true", help="also train the student from labels alone")

    _json_errors(parser)  # last: every parser of the tree, the ones app/cli.py made before this call included


def is_client_command(args) -> bool:
    return getattr(args, "client_func", None) is not None


# -- the client distribution's own `distillery` ------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """`distillery` with the client commands only: the parser of the distillery-client distribution (pip install
    ./app/client), which has no server. The server distribution's `distillery` (app/cli.py) registers the same
    commands beside serve, api, worker, migrate and keys."""
    parser = argparse.ArgumentParser(
        prog="distillery", description="Client of a Distillery service (model compression as a service). The "
        "server commands (serve, api, worker, migrate, keys, example) come with the server distribution.")
    register(parser, parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of distillery-client's `distillery` command."""
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
