"""Command line: `radnode run | api | worker | token | studies | jobs | plugins | echo | send | pull | watch | db`."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from node import __version__
from node.settings import Settings, load_settings

app = typer.Typer(no_args_is_help=True, add_completion=False, help="radnode: an AI node beside the PACS.")
db_app = typer.Typer(no_args_is_help=True, help="Job table maintenance.")
app.add_typer(db_app, name="db")
jobs_app = typer.Typer(help="List jobs (default) or act on one.")
app.add_typer(jobs_app, name="jobs")
models_app = typer.Typer(no_args_is_help=True, help="Model files: what each plugin expects and what is there.")
app.add_typer(models_app, name="models")
token_app = typer.Typer(no_args_is_help=True, help="Bearer tokens for the HTTP API and dashboard.")
app.add_typer(token_app, name="token")
rules_app = typer.Typer(no_args_is_help=True, help="Routing rules: try them on files.")
app.add_typer(rules_app, name="rules")
feedback_app = typer.Typer(no_args_is_help=True, help="Radiologists' feedback on results.")
app.add_typer(feedback_app, name="feedback")
rollout_app = typer.Typer(no_args_is_help=True, help="Roll-out modes (live, silent, review) per plugin or rule.")
app.add_typer(rollout_app, name="rollout")
console = Console(stderr=True)
_state: dict[str, Path | None] = {"config": None}


@app.callback()
def main(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", exists=True, dir_okay=False, help="YAML settings file")
    ] = None,
) -> None:
    _state["config"] = config


def settings() -> Settings:
    """Load settings once for the command; a bad value exits 2 with the field named."""
    try:
        return load_settings(_state["config"])
    except ValidationError as exc:
        console.print(f"[red]invalid configuration:[/red]\n{exc}")
        raise typer.Exit(2) from None


def _setup_logging(s: Settings) -> None:
    from node.logs import setup_logging

    setup_logging(s.log_level, s.log_json, s.uid_hash_salt.get_secret_value())


@app.command()
def run() -> None:
    """Start the node: DICOM receivers, tracker, router, sweeper and an embedded worker (SQLite, no broker server)."""
    from node.service import Node, StartupError

    s = settings()
    _setup_logging(s)
    node = Node(s)
    try:
        node.start()
    except StartupError as exc:
        console.print(f"[red]radnode cannot start:[/red] {exc}")
        raise typer.Exit(1) from None
    print(f"radnode {__version__} running", flush=True)
    for line in node.describe():
        print("  " + line, flush=True)
    if s.http_port:
        _first_token(s)
    node.serve_forever()


def _first_token(s: Settings) -> None:
    """On the first start without any API token, make one and show it once (only its hash is kept)."""
    from node.api.auth import new_token, saved_tokens, tokens_path

    try:
        if s.api_tokens or saved_tokens(s):
            return
        token, _ = new_token(s, "admin")
    except (ValueError, OSError) as exc:
        console.print(f"[red]API tokens: {exc}[/red]")
        return
    print(f"  API token 'admin' (shown once; its hash is in {tokens_path(s)}): {token}", flush=True)
    print("  open the dashboard and sign in with it; `radnode token new NAME` makes more", flush=True)


@app.command()
def api() -> None:
    """Run only the HTTP service (REST API, STOW-RS, dashboard, metrics) against the configured database."""
    from node.api.app import serve

    s = settings()
    _setup_logging(s)
    open_db()  # exits 1 when the database is unusable or not migrated
    if not s.http_port:
        console.print("[red]http_port is 0: the HTTP service is switched off[/red]")
        raise typer.Exit(2)
    print(f"radnode {__version__} HTTP service on {'https' if s.http_tls_cert else 'http'}://{s.dicom_host}:"
          f"{s.http_port}/", flush=True)
    try:
        serve(s)
    except OSError as exc:
        console.print(f"[red]cannot listen on port {s.http_port}: {exc}[/red]")
        raise typer.Exit(1) from None


@token_app.command("new")
def token_new(
    name: Annotated[str, typer.Argument(help="who uses it, e.g. pacs-admin or prometheus")],
    read_only: Annotated[bool, typer.Option("--read-only", help="may read, not change state")] = False,
    save: Annotated[bool, typer.Option("--save/--no-save", help="store its hash in the data folder; with "
                                       "--no-save only print the settings entry for RADNODE_API_TOKENS")] = True,
) -> None:
    """Make an API token: printed once; only its SHA-256 is stored (data folder, or your settings)."""
    from node.api.auth import new_token, tokens_path

    s = settings()
    try:
        token, entry = new_token(s, name, read_only=read_only, save=save)
    except ValueError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    print(token)
    where = f"saved in {tokens_path(s)}" if save else "not saved: add this entry to api_tokens / RADNODE_API_TOKENS"
    console.print(f"token {name!r} ({'read-only' if read_only else 'read and write'}), {where}:\n"
                  f"{json.dumps(entry.model_dump())}")


@token_app.command("list")
def token_list() -> None:
    """The API tokens that are accepted (names and rights; tokens themselves are never stored)."""
    from node.api.auth import saved_tokens, tokens_path

    s = settings()
    try:
        saved = saved_tokens(s)
    except ValueError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    for source, entries in (("settings", s.api_tokens), (str(tokens_path(s)), saved)):
        for t in entries:
            print(f"{t.name}\t{'read-only' if t.read_only else 'read-write'}\t{source}")


@app.command()
def studies(
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    study: Annotated[str | None, typer.Option(help="only this Study Instance UID")] = None,
    limit: Annotated[int, typer.Option(min=1)] = 200,
    after: Annotated[str | None, typer.Option(help="the next page: studies listed after this Study Instance UID")]
    = None,
) -> None:
    """List received studies with their series, state and instance counts, newest first."""
    from db.records import list_studies

    with open_db()() as session:
        try:
            rows = list_studies(session, study, limit, after=after)
        except LookupError as exc:
            console.print(f"[red]{exc}[/red]")
            raise typer.Exit(1) from None
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table("study", "series", "modality", "instances", "state", "description", "complete because", "routing",
                  box=None)
    for st in rows:
        table.add_row(st["study_uid"], "", "", "", st["state"], st["study_description"] or "", "", "")
        for se in st["series"]:
            table.add_row(
                "", se["series_uid"], se["modality"] or "", str(se["instances"]), se["state"],
                se["series_description"] or "", se.get("completion_reason") or "", se["route_note"] or "",
            )
    _wide_console().print(table)


def _wide_console() -> Console:
    out = Console()
    out.width = max(out.width, 300)  # UIDs are shown whole, also when piped
    return out


def open_db():
    """A sessionmaker for the configured database; exits 1 with the reason if it is not usable."""
    from db.session import make_engine, make_sessionmaker
    from node.service import StartupError, prepare_database

    s = settings()
    engine = make_engine(s.db_url)
    try:
        prepare_database(s, engine, auto_upgrade=False)
    except StartupError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    except Exception as exc:
        console.print(f"[red]database unavailable: {type(exc).__name__}: {exc}[/red]")
        raise typer.Exit(1) from None
    return make_sessionmaker(engine)


@app.command()
def worker(
    queues: Annotated[
        str, typer.Option(help="comma-separated queues: gpu, cpu, dispatch, gpu.NAME")
    ] = "gpu,cpu,dispatch",
    concurrency: Annotated[int, typer.Option(min=1, help="worker processes")] = 1,
    name: Annotated[str | None, typer.Option(help="worker name (default radnode@HOST-PID)")] = None,
    metrics_port: Annotated[int, typer.Option(min=0, max=65535, help="serve Prometheus metrics on this port "
                                              "(0: off)")] = 0,
) -> None:
    """Run a Celery worker for these queues (production: one per GPU host, `--queues gpu`)."""
    settings()  # validate the configuration before handing over
    args = [sys.executable, "-m", "workers", "--queues", queues, "--concurrency", str(concurrency)]
    if name:
        args += ["--name", name]
    if metrics_port:
        args += ["--metrics-port", str(metrics_port)]
    os.execv(sys.executable, args)  # the node never imports the worker code; the worker is its own program


@jobs_app.callback(invoke_without_command=True)
def jobs(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    state: Annotated[str | None, typer.Option(help="only jobs in this state")] = None,
    plugin: Annotated[str | None, typer.Option(help="only this plugin's jobs")] = None,
    study: Annotated[str | None, typer.Option(help="only this Study Instance UID")] = None,
    limit: Annotated[int, typer.Option(min=1)] = 200,
    after: Annotated[int | None, typer.Option(min=1, help="the next page: jobs older than this job id")] = None,
) -> None:
    """List jobs, newest first: plugin, state, attempts, warnings, error, outputs."""
    if ctx.invoked_subcommand is not None:
        return
    from db.jobs import list_jobs

    with open_db()() as session:
        rows = list_jobs(session, state=state, plugin=plugin, study_uid=study, limit=limit, after=after)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table("id", "series", "plugin", "state", "tries", "queue", "warnings", "deliveries", "reason", box=None)
    for j in rows:
        table.add_row(
            str(j["id"]), j["series_uid"], f"{j['plugin']} {j['plugin_version'] or ''}".strip(), j["state"],
            str(j["attempts"]), j["queue"], str(len(j["warnings"])), escape(_deliveries_cell(j["deliveries"])),
            escape((f"{j['fail_stage']}: " if j["fail_stage"] else "") + (j["reason"] or "")),
        )
    _wide_console().print(table)


def _deliveries_cell(deliveries: list[dict]) -> str:
    """`pacs: sent`, `backup: pending (2 tries: connection refused)` ... one per line."""
    lines = []
    for d in deliveries:
        text = f"{d['destination']}: {d['state']}"
        if d["state"] != "sent" and d["attempts"]:
            text += f" ({d['attempts']} tries" + (f": {d['last_error'][:60]}" if d["last_error"] else "") + ")"
        lines.append(text)
    return "\n".join(lines) or "-"


@jobs_app.command("retry")
def jobs_retry(job_id: Annotated[int, typer.Argument(help="job id")]) -> None:
    """Run a finished job again (failed, skipped, encoded or delivered); the node sends it to a worker."""
    from db.jobs import InputsRemoved, requeue

    with open_db().begin() as session:
        try:
            moved = requeue(session, job_id)
        except (LookupError, InputsRemoved) as exc:
            console.print(f"[red]{exc}[/red]")
            raise typer.Exit(1) from None
    if not moved:
        console.print(f"job {job_id} is queued or running already")
        raise typer.Exit(1)
    print(f"job {job_id} queued again; the node sends it to a worker within its sweep period")


@app.command()
def pull(
    study: Annotated[str, typer.Option("--study", help="Study Instance UID to fetch")],
    orthanc: Annotated[str | None, typer.Option("--orthanc", help="Orthanc URL, e.g. http://pacs:8042")] = None,
    dicomweb: Annotated[str | None, typer.Option("--dicomweb", help="DICOMweb root URL")] = None,
    username: Annotated[str | None, typer.Option(help="HTTP basic auth user")] = None,
    password: Annotated[str | None, typer.Option(envvar="RADNODE_PULL_PASSWORD", help="basic auth password")] = None,
    token: Annotated[str | None, typer.Option(envvar="RADNODE_PULL_TOKEN", help="bearer token (DICOMweb)")] = None,
    source_ae: Annotated[str | None, typer.Option("--ae", help="record the instances as sent by this AE")] = None,
) -> None:
    """Fetch one study from Orthanc (REST) or a DICOMweb server (WADO-RS) into storage, as if C-STOREd.

    The running node completes and routes it after the stability window.
    """
    from node.ingest.ingest import Ingest
    from node.ingest.pull import PullError, dicomweb_client, orthanc_ae, orthanc_client, pull_dicomweb, pull_orthanc

    if (orthanc is None) == (dicomweb is None):
        console.print("[red]give exactly one of --orthanc URL or --dicomweb URL[/red]")
        raise typer.Exit(2)
    s = settings()
    _setup_logging(s)
    ingest = Ingest(s, open_db())
    try:
        if orthanc is not None:
            client = orthanc_client(orthanc, username, password)
            report = pull_orthanc(client, ingest, study_uid=study, source_ae=source_ae or orthanc_ae(client))
        else:
            client = dicomweb_client(dicomweb, username, password, token)
            report = pull_dicomweb(client, ingest, study, source_ae=source_ae)
    except PullError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    for name, why in report.failed[:20]:
        console.print(f"[yellow]{name}: {why}[/yellow]")
    print(f"pulled {report.stored} instance(s), {len(report.failed)} failed")
    if report.failed:
        raise typer.Exit(1)


@app.command()
def watch(
    orthanc: Annotated[str, typer.Option("--orthanc", help="Orthanc URL, e.g. http://pacs:8042")],
    username: Annotated[str | None, typer.Option(help="HTTP basic auth user")] = None,
    password: Annotated[str | None, typer.Option(envvar="RADNODE_PULL_PASSWORD", help="basic auth password")] = None,
    interval: Annotated[float, typer.Option(min=0.1, help="seconds between reads of /changes")] = 5.0,
    from_start: Annotated[bool, typer.Option("--from-start", help="first start: pull every stable study")] = False,
) -> None:
    """Follow an Orthanc's /changes and pull each study once Orthanc marks it stable (until Ctrl-C)."""
    import signal
    import threading

    from node.ingest.ingest import Ingest
    from node.ingest.pull import OrthancWatcher, orthanc_client

    s = settings()
    _setup_logging(s)
    s.data_path.mkdir(parents=True, exist_ok=True)
    watcher = OrthancWatcher(orthanc_client(orthanc, username, password), Ingest(s, open_db()),
                             s.data_path / "watch-orthanc.json", from_start=from_start)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(f"watching {orthanc} for stable studies", flush=True)
    watcher.run(stop, interval)


@app.command()
def infer(
    path: Annotated[Path, typer.Argument(help="a folder, a zip of DICOM files, or one DICOM file")],
    plugin: Annotated[str, typer.Option("--plugin", help="plugin name (see `radnode plugins`)")],
    out: Annotated[Path, typer.Option("--out", help="folder for the DICOM outputs and findings.json")],
    as_json: Annotated[bool, typer.Option("--json", help="print the results as JSON")] = False,
) -> None:
    """Run one plugin offline on local files: writes SEG/SR/SC and findings.json, prints a summary.

    No node, job table or broker is needed. Exit 0 when every series ran (or the plugin does not apply
    to it), 1 when a series failed or the input holds no DICOM, 2 for an unknown or unavailable plugin.
    """
    from node.dicom.files import group_series
    from node.pipeline.offline import InferError, infer_series, input_files

    s, manifest, loaded, sha = _loaded_plugin(plugin)
    _setup_logging(s)
    runs = []
    try:
        with input_files(path) as files, Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            console=console, disable=as_json,
        ) as progress:
            task = progress.add_task("reading headers", total=len(files))
            series, info, skipped = group_series(files, on_file=lambda: progress.advance(task))
            if not series:
                raise InferError(f"{path}: no DICOM files found ({skipped} other file(s))")
            for i, (uid, series_files) in enumerate(series.items()):
                target = out if len(series) == 1 else out / f"series-{i + 1:02d}"
                stage = progress.add_task(f"series {i + 1}/{len(series)}", total=3)

                def step(what, stage=stage, i=i):
                    progress.update(stage, description=f"series {i + 1}/{len(series)}: {what}")
                    progress.advance(stage)

                runs.append(infer_series(loaded, manifest, s, series_files, info[uid], uid, target, sha, step))
                progress.update(stage, completed=3)
    except InferError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    if as_json:
        print(json.dumps([r.to_json() for r in runs], indent=2))
    else:
        _print_runs(runs, skipped)
    if any(r.state == "failed" for r in runs):
        raise typer.Exit(1)


def _print_runs(runs, skipped: int) -> None:
    out = _wide_console()
    for r in runs:
        out.print(f"[bold]series {r.series_uid}[/bold] ({escape(r.modality)}, {r.files} file(s)): {r.state}"
                  + (f" - {escape(r.reason)}" if r.reason else ""))
        f = r.findings or {}
        if f.get("measurements"):
            table = Table("measurement", "segment", "value", "unit", box=None)
            for m in f["measurements"]:
                table.add_row(escape(m["concept"]["meaning"]), escape(m["segment"] or "(whole image)"),
                              f"{m['value']:.4g}", escape(m["unit"]))
            out.print(table)
        if f.get("classifications"):
            table = Table("finding", "probability", "threshold", "result", box=None)
            for c in f["classifications"]:
                table.add_row(escape(c["concept"]["meaning"]), f"{c['probability']:.3f}", f"{c['threshold']:g}",
                              "present" if c["positive"] else "absent")
            out.print(table)
        if f.get("summary"):
            out.print(f"summary: {escape(f['summary'])}")
        for w in r.warnings:
            out.print(f"[yellow]warning:[/yellow] {escape(w)}")
        for p in r.outputs:
            out.print(f"  wrote {escape(p)}")
        if r.timings:
            out.print("  seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in r.timings.items()))
    if skipped:
        out.print(f"{skipped} file(s) that are not DICOM were skipped")


@app.command()
def demo(
    host: Annotated[str, typer.Option(help="the node's address")] = "127.0.0.1",
    port: Annotated[int | None, typer.Option(help="the node's DICOM port (default: the dicom_port setting)")] = None,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the job")] = 300.0,
    keep: Annotated[Path | None, typer.Option(help="keep the phantom's DICOM files in this folder")] = None,
) -> None:
    """Send a synthetic chest CT phantom to the running node, wait for its job, and print where the
    SR/SEG/SC went and the measured lung values next to the phantom's true values."""
    import tempfile

    from node.demo.run import DemoError, comparison, run_demo

    s = settings()
    maker = open_db()
    with tempfile.TemporaryDirectory(prefix="radnode-demo-") as tmp:
        folder = keep or Path(tmp)
        try:
            result = run_demo(folder, host, port or s.dicom_port, s.ae_title, maker, timeout,
                              progress=lambda msg: console.print(f"[cyan]{escape(msg)}[/cyan]"))
        except DemoError as exc:
            console.print(f"[red]{escape(str(exc))}[/red]")
            raise typer.Exit(1) from None
    out = _wide_console()
    ok = True
    for job in result.jobs:
        out.print(f"[bold]job {job['id']}[/bold]: {job['plugin']} {job['plugin_version']} -> {job['state']}"
                  + (f" ({escape(job['reason'])})" if job["reason"] else ""))
        # a model without weights here is skipped, saying why; any other outcome is a failed demo
        ok &= job["state"] in ("delivered", "encoded") or (job["state"] == "skipped"
                                                          and "model unavailable" in (job["reason"] or ""))
        for d in job["deliveries"]:
            out.print(f"  sent to {escape(d['destination'])}: {d['state']}"
                      + (f" - {escape(d['last_error'])}" if d["last_error"] and d["state"] != "sent" else ""))
        if not job["deliveries"]:
            out.print("  no destination configured: the objects stay in the outputs folder")
        for p in job["outputs"]:
            out.print(f"  {escape(p)}")
        for w in job["warnings"]:
            out.print(f"  [yellow]warning:[/yellow] {escape(w)}")
        rows = comparison(job, result.phantom, result.manifests.get(job["plugin"])) if job["findings"] else []
        if rows:
            table = Table("", "measured", "phantom truth", "difference", box=None)
            for what, unit, measured, truth in rows:
                shown = "-" if measured is None else f"{measured:.1f} {unit}"
                diff = "-" if measured is None else f"{measured - truth:+.1f} {unit}"
                table.add_row(what, shown, f"{truth:.1f} {unit}", diff)
            out.print(table)
    if not ok or not any(j["state"] in ("delivered", "encoded") for j in result.jobs):
        raise typer.Exit(1)


@jobs_app.command("review")
def jobs_review(
    job_id: Annotated[int, typer.Argument(help="job id")],
    accept: Annotated[bool, typer.Option("--accept/--reject", help="deliver it now, or never send it")],
    note: Annotated[str | None, typer.Option(help="why (kept with the decision)")] = None,
    reader: Annotated[str, typer.Option(help="who decides (recorded)")] = "cli",
) -> None:
    """Decide on a result held in review mode: --accept delivers it, --reject means it is never sent."""
    from db import review
    from db.models import utcnow

    with open_db().begin() as session:
        try:
            ids = review.decide(session, job_id, accept, reader, note, utcnow())
        except (LookupError, review.NotPending) as exc:
            console.print(f"[red]{exc.args[0]}[/red]")
            raise typer.Exit(1) from None
    print(f"job {job_id} accepted: {len(ids)} delivery(ies) due now" if accept else
          f"job {job_id} rejected: its results will never be sent")


@rollout_app.command("set")
def rollout_set(
    scope: Annotated[str, typer.Argument(help="plugin or rule")],
    name: Annotated[str, typer.Argument(help="the plugin's or rule's name")],
    mode: Annotated[str, typer.Argument(help="live, silent, review, or clear (remove the override)")],
    review_hours: Annotated[float | None, typer.Option(help="review mode: how long a result may wait")] = None,
    on_timeout: Annotated[str | None, typer.Option(help="review mode, after --review-hours: deliver or "
                                                   "discard (default)")] = None,
) -> None:
    """Set a plugin's or rule's roll-out mode for the jobs that start from now on (no restart)."""
    from db import review
    from db.models import utcnow

    with open_db().begin() as session:
        try:
            review.set_mode(session, scope, name, None if mode == "clear" else mode, utcnow(),
                            review_hours=review_hours, on_timeout=on_timeout, who="cli")
        except ValueError as exc:
            console.print(f"[red]{exc}[/red]")
            raise typer.Exit(1) from None
    print(f"{scope} {name}: " + ("override removed (the rules file decides)" if mode == "clear" else f"{mode} "
                                 "for jobs that start from now on"))


@rollout_app.command("list")
def rollout_list(as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """The run-time overrides (a rule's wins over its plugin's; both over the rules file)."""
    from db import review

    with open_db()() as session:
        rows, pending = review.overrides(session), review.pending_count(session)
    if as_json:
        print(json.dumps({"overrides": rows, "pending_reviews": pending}, indent=2))
        return
    table = Table("scope", "name", "mode", "review hours", "on timeout", "set by", "set at")
    for r in rows:
        table.add_row(r["scope"], r["name"], r["mode"], str(r["review_hours"] or ""), r["on_timeout"],
                      r["updated_by"] or "", r["updated_at"] or "")
    _wide_console().print(table)
    print(f"{pending} result(s) waiting for review")


@jobs_app.command("redeliver")
def jobs_redeliver(
    job_id: Annotated[int, typer.Argument(help="job id")],
    everything: Annotated[bool, typer.Option("--all", help="send to every destination again, not only failed")] = False,
) -> None:
    """Send a job's results again: the failed deliveries (or all with --all), with fresh attempts."""
    from db.deliveries import NotRedeliverable, redeliver
    from db.models import utcnow

    with open_db().begin() as session:
        try:
            ids = redeliver(session, job_id, utcnow(), everything=everything)
        except (LookupError, NotRedeliverable) as exc:
            console.print(f"[red]{exc.args[0]}[/red]")
            raise typer.Exit(1) from None
    print(f"job {job_id}: {len(ids)} delivery(ies) due again; the node sends them within its sweep period")


@app.command()
def plugins(as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """Installed plugins: name, version, queue, and whether each can run here (or why not)."""
    from plugins.registry import discover, unavailable_reason

    s = settings()
    found = discover()
    rows = [
        {"name": m.name, "version": m.version, "queue": m.queue, "modalities": m.modalities,
         "available": (why := unavailable_reason(m, s.models_path)) is None, "reason": why,
         "reference_only": m.reference_only, "title": m.title}
        for m in sorted(found.manifests.values(), key=lambda m: m.name)
    ]
    rows += [{"name": n, "version": None, "queue": None, "modalities": [], "available": False, "reason": e,
              "reference_only": False, "title": ""} for n, e in sorted(found.errors.items())]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table("plugin", "version", "queue", "modalities", "status", box=None)
    for r in rows:
        reason = r["reason"] or ""
        status = "available" if r["available"] else reason if reason.startswith("model unavailable") else (
            f"unavailable: {reason}")
        table.add_row(r["name"], r["version"] or "", r["queue"] or "", ",".join(r["modalities"]), escape(status))
    _wide_console().print(table)


@models_app.command("check")
def models_check(as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """Per plugin: the files it expects under <models dir>/<plugin>/ (weights, heads, ONNX), whether each
    is there (size, SHA-256), the configuration in force and whether the plugin can run. Exit 1 if any
    plugin is unavailable or broken."""
    from plugins.base import WeightsUnavailable
    from plugins.registry import discover, sha256_file, unavailable_reason

    s = settings()
    found = discover()
    rows = []
    for m in sorted(found.manifests.values(), key=lambda m: m.name):
        folder = s.models_path / m.name
        row: dict = {"plugin": m.name, "version": m.version, "folder": str(folder), "files": [], "config": None,
                     "config_file": (folder / "config.json").is_file(), "error": None}
        try:
            config = m.config_in(folder)
            row["config"] = config
        except WeightsUnavailable as exc:
            config, row["error"] = m.config, str(exc)
        for role, path in m.files(folder, config):
            entry = {"role": role, "path": str(path), "present": path.is_file(), "bytes": None, "sha256": None}
            if entry["present"]:
                entry["bytes"], entry["sha256"] = path.stat().st_size, sha256_file(path)
            row["files"].append(entry)
        row["available"] = unavailable_reason(m, s.models_path) is None
        row["cpu_backend"] = _cpu_backend(m, folder, config) if row["error"] is None else None
        rows.append(row)
    rows += [{"plugin": n, "version": None, "folder": None, "files": [], "config": None, "config_file": False,
              "error": e, "available": False} for n, e in sorted(found.errors.items())]
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        out = _wide_console()
        for r in rows:
            state = "[green]ready[/green]" if r["available"] else "[red]unavailable[/red]"
            out.print(f"[bold]{r['plugin']}[/bold] {r['version'] or ''} {state}  {escape(r['folder'] or '')}")
            if r["error"]:
                out.print(f"  [red]{escape(r['error'])}[/red]")
            if not r["files"] and not r["error"]:
                out.print("  needs no model files")
            for f in r["files"]:
                found_text = (f"found, {f['bytes']} bytes, sha256 {f['sha256'][:16]}..." if f["present"]
                              else "[red]missing[/red]")
                out.print(f"  {f['role']}: {escape(Path(f['path']).name)}: {found_text}")
            if r["config_file"]:
                out.print("  config.json overrides the manifest's configuration")
            if r.get("cpu_backend"):
                out.print(f"  on a CPU: {escape(r['cpu_backend'])}")
    if not all(r["available"] for r in rows):
        raise typer.Exit(1)


def _cpu_backend(manifest, folder: Path, config: dict) -> str | None:
    """What a torch plugin runs on a CPU (backend auto: whether its ONNX export passed the parity check)."""
    backend = config.get("backend")
    if backend in ("torch", "onnx"):
        return f"{'ONNX Runtime (model.onnx)' if backend == 'onnx' else 'torch'}: backend {backend} in config.json"
    if backend != "auto":
        return None
    from plugins.torch_common import auto_verdict

    verdict = auto_verdict(manifest, folder)
    if not verdict:
        return "backend auto: not settled yet (the first CPU load exports to ONNX and checks it against torch)"
    if verdict.get("passed"):
        return (f"ONNX Runtime (backend auto: parity passed, max abs difference {verdict['max_abs_diff']:.2g}, "
                f"{verdict['speedup']:.2f}x torch's speed)")
    if verdict["max_abs_diff"] > verdict["tolerance"]:
        return (f"torch (backend auto: ONNX Runtime differed by {verdict['max_abs_diff']:.2g}, above "
                f"{verdict['tolerance']:.2g})")
    return f"torch (backend auto: ONNX Runtime ran at {verdict['speedup']:.2f}x torch's speed)"


def _loaded_plugin(name: str, backend: str | None = None):
    """(settings, manifest, loaded plugin, weights SHA-256) for the CLI tools (`backend` overrides the
    configuration's); exits 2 with the reason when it cannot be loaded."""
    from node.pipeline.inference import load_plugin
    from plugins.base import WeightsUnavailable
    from plugins.registry import unavailable_reason

    s = settings()
    manifest = _manifest(name)
    why = unavailable_reason(manifest, s.models_path)
    if why:
        console.print(f"[red]plugin {name} is unavailable: {escape(why)}[/red]")
        raise typer.Exit(2)
    try:
        plugin, sha = load_plugin(manifest, s, backend)
    except WeightsUnavailable as exc:
        console.print(f"[red]plugin {name} is unavailable: {escape(str(exc))}[/red]")
        raise typer.Exit(2) from None
    return s, manifest, plugin, sha


@app.command("export-onnx")
def export_onnx(
    plugin: Annotated[str, typer.Argument(help="plugin name")],
    out: Annotated[Path | None, typer.Option(help="ONNX file (default <models dir>/<plugin>/model.onnx)")] = None,
) -> None:
    """Export a plugin's model to ONNX (for `backend: onnx` in its config.json) and print how far the
    ONNX Runtime outputs are from torch's on a sample input."""
    from plugins.base import ONNX_FILE, WeightsUnavailable

    s = settings()
    manifest = _manifest(plugin)
    try:
        backend = manifest.config_in(s.models_path / plugin).get("backend", "torch")
    except WeightsUnavailable as exc:
        console.print(f"[red]{escape(str(exc))}[/red]")
        raise typer.Exit(2) from None
    if backend not in ("torch", "auto"):
        console.print(f"[red]plugin {plugin} runs with backend {backend!r} (config.json): set it to \"auto\" or "
                      "\"torch\" to export from the torch weights[/red]")
        raise typer.Exit(2)
    s, manifest, loaded, _ = _loaded_plugin(plugin, backend="torch")
    target = out or s.models_path / plugin / ONNX_FILE
    try:
        report = loaded.export_onnx(target)
    except NotImplementedError as exc:
        console.print(f"[red]{escape(str(exc))}[/red]")
        raise typer.Exit(2) from None
    print(f"wrote {target}; max abs difference torch vs ONNX Runtime: {report['max_abs_diff']:.3g}")
    print(f'set "backend": "onnx" in {s.models_path / plugin / "config.json"} to run it with ONNX Runtime')


def _manifest(name: str):
    from plugins.registry import discover

    discovery = discover()
    manifest = discovery.manifests.get(name)
    if manifest is None:
        why = discovery.errors.get(name) or f"not installed (installed: {', '.join(sorted(discovery.manifests))})"
        console.print(f"[red]plugin {name}: {escape(why)}[/red]")
        raise typer.Exit(2)
    return manifest


@app.command()
def evaluate(
    path: Annotated[Path, typer.Argument(help="folder of cases: one sub-folder or DICOM file per case")],
    plugin: Annotated[str, typer.Option("--plugin", help="a classification plugin")],
    labels: Annotated[Path, typer.Option("--labels", help="CSV with columns id,label")],
    finding: Annotated[str | None, typer.Option(help="code value of the finding (default: the first)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON (metrics and every case)")] = False,
) -> None:
    """Accuracy, precision, recall, F1 and AUROC of a plugin's classification against labels."""
    from node.pipeline.evaluate import EvaluateError, read_labels
    from node.pipeline.evaluate import evaluate as run_evaluation

    _, manifest, loaded, _ = _loaded_plugin(plugin)
    classes = list(manifest.config.get("classes") or [])
    try:
        truth = read_labels(labels, negative=classes[:1] if len(classes) == 2 else (),
                            positive=classes[-1:] if len(classes) == 2 else ())
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=console, disable=as_json) as progress:
            task = progress.add_task("cases", total=len(truth))
            result = run_evaluation(loaded, manifest, path, truth, finding, progress=lambda _: progress.advance(task))
    except EvaluateError as exc:
        console.print(f"[red]{escape(str(exc))}[/red]")
        raise typer.Exit(1) from None
    m = result.metrics
    if as_json:
        print(json.dumps({"finding": result.finding, **m.to_json(), "cases": result.cases}, indent=2))
        return
    out = _wide_console()
    out.print(f"[bold]{escape(result.finding)}[/bold]: {m.n} case(s) scored "
              f"(TP {m.tp}, FP {m.fp}, TN {m.tn}, FN {m.fn})")
    table = Table("metric", "value", box=None)
    for name, value in (("accuracy", m.accuracy), ("precision", m.precision), ("recall", m.recall), ("F1", m.f1),
                        ("AUROC", m.auroc)):
        table.add_row(name, "n/a" if value is None or value != value else f"{value:.3f}")
    out.print(table)
    for case in result.cases:
        if case["error"]:
            out.print(f"[yellow]{escape(case['id'])}: left out: {escape(case['error'])}[/yellow]")


@app.command()
def embed(
    path: Annotated[Path, typer.Argument(help="folder of studies: one sub-folder or DICOM file per X-ray")],
    out: Annotated[Path, typer.Option("--out", help="embeddings file (.npz)")],
    plugin: Annotated[str, typer.Option(help="the foundation-model plugin")] = "cxr-foundation",
    batch_size: Annotated[int, typer.Option(min=1, help="images per forward pass")] = 8,
    patches: Annotated[bool, typer.Option("--patches", help="also keep every patch token (large)")] = False,
) -> None:
    """Embeddings of many X-ray studies with the foundation model's backbone (no heads needed), batched,
    for `radnode train-head`. Studies that cannot be read are listed and left out. The plugin must offer
    the embed capability (plugins.base.Plugin.embed_studies)."""
    import numpy as np

    from node.dicom.files import group_series, iter_dicom_files
    from node.files import atomic_write
    from node.imaging import load_image
    from node.pipeline.evaluate import EvaluateError, cases_in
    from node.pipeline.inference import resolve_device
    from plugins.base import WeightsUnavailable
    from plugins.registry import build, weights_path

    s = settings()
    manifest = _manifest(plugin)
    try:
        loaded = build(manifest)
        loaded.load_embedder(resolve_device(s.device, manifest), weights_path(manifest, s.models_path))
        cases = cases_in(path)
    except NotImplementedError as exc:  # the plugin cannot embed
        console.print(f"[red]{escape(str(exc))}[/red]")
        raise typer.Exit(2) from None
    except (WeightsUnavailable, EvaluateError) as exc:
        console.print(f"[red]{escape(str(exc))}[/red]")
        raise typer.Exit(2 if isinstance(exc, WeightsUnavailable) else 1) from None
    items, skipped = [], {}
    for case, entry in cases.items():
        series, _, _ = group_series(list(iter_dicom_files([entry])))
        if len(series) == 1:
            items.append((case, next(iter(series.values()))))
        else:
            skipped[case] = f"{len(series)} series (a study must hold exactly one X-ray series)"
    with Progress(TextColumn("embedding"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console) as progress:
        task = progress.add_task("embed", total=len(items))
        result = loaded.embed_studies(items, load_image, batch_size=batch_size, patches=patches,
                                      progress=lambda done, total: progress.update(task, completed=done))
    result.failed.update(skipped)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, result.write)
    for case, why in sorted(result.failed.items()):
        console.print(f"[yellow]{escape(case)}: left out: {escape(why)}[/yellow]")
    shapes = ", ".join(f"{k} {tuple(np.shape(v))}" for k, v in sorted(result.arrays.items()))
    print(f"embedded {len(result.ids)} stud(ies) into {out} ({shapes}); {len(result.failed)} left out")
    if not result.ids:
        raise typer.Exit(1)


@app.command("train-head")
def train_head(
    embeddings: Annotated[Path, typer.Option("--embeddings", help="file written by `radnode embed`")],
    labels: Annotated[Path, typer.Option("--labels", help="CSV: id, then one 0/1 column per finding")],
    out: Annotated[Path, typer.Option("--out", help="heads file to write (heads.safetensors)")],
    seed: Annotated[int, typer.Option(help="split and initialisation seed")] = 0,
    val_fraction: Annotated[float, typer.Option(min=0.05, max=0.9, help="validation share")] = 0.2,
    epochs: Annotated[int, typer.Option(min=1)] = 100,
    hidden: Annotated[int, typer.Option(min=0, help="MLP hidden units (0: linear heads)")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
    plugin: Annotated[str, typer.Option(help="the plugin whose heads to train")] = "cxr-foundation",
) -> None:
    """Train the foundation model's finding heads on embeddings and labels: class weighting, a stratified
    validation split, AUROC with a bootstrap 95% CI per finding. The plugin must offer the train-head
    capability (plugins.base.Plugin.train_heads)."""
    from node.files import atomic_write
    from plugins.registry import build

    trainer = build(_manifest(plugin))
    try:
        trained = trainer.train_heads(embeddings, labels, seed=seed, val_fraction=val_fraction, epochs=epochs,
                                      hidden=hidden)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, trained.content)
    except NotImplementedError as exc:  # the plugin has no trainable heads
        console.print(f"[red]{escape(str(exc))}[/red]")
        raise typer.Exit(2) from None
    except (ValueError, OSError) as exc:
        console.print(f"[red]{escape(str(exc))}[/red]")
        raise typer.Exit(1) from None
    report = trained.report
    if as_json:
        print(json.dumps(report, indent=2, default=float))
        return
    table = Table("finding", "AUROC", "95% CI", "threshold", "sensitivity", "specificity", "note", box=None)
    for name, r in (report.get("findings") or report).items():
        if not isinstance(r, dict) or "auroc" not in r:
            continue
        ci = r.get("auroc_ci95") or (None, None)
        table.add_row(escape(name), f"{r['auroc']:.3f}", f"{ci[0]:.3f}-{ci[1]:.3f}" if ci[0] is not None else "-",
                      f"{r.get('threshold', 0):.3f}", f"{r.get('sensitivity', 0):.3f}",
                      f"{r.get('specificity', 0):.3f}", escape(r.get("warning") or ""))
    _wide_console().print(table)
    print(f"wrote {out}")


def _host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise typer.BadParameter(f"expected HOST:PORT, got {value!r}")
    return host, int(port)


@app.command()
def echo(
    host: str,
    port: int,
    aec: Annotated[str, typer.Option("--aec", help="called AE title")] = "ANY-SCP",
    aet: Annotated[str | None, typer.Option("--aet", help="calling AE title (default: ours)")] = None,
) -> None:
    """C-ECHO a DICOM peer."""
    from node.dispatch.scu import AssociationFailed
    from node.dispatch.scu import echo as do_echo

    s = settings()
    try:
        status = do_echo(host, port, aec, aet or s.ae_title)
    except AssociationFailed as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    print(f"C-ECHO {host}:{port} status 0x{status:04X}")
    if status != 0:
        raise typer.Exit(1)


@app.command()
def send(
    paths: Annotated[list[Path], typer.Argument(exists=True, help="files or folders")],
    to: Annotated[str, typer.Option("--to", help="HOST:PORT")],
    aec: Annotated[str, typer.Option("--aec", help="called AE title")] = "ANY-SCP",
    aet: Annotated[str | None, typer.Option("--aet", help="calling AE title (default: ours)")] = None,
) -> None:
    """C-STORE files (or folders, recursively) to a DICOM peer over one association."""
    from node.dicom.files import iter_dicom_files
    from node.dispatch.scu import AssociationFailed
    from node.dispatch.scu import send as do_send

    host, port = _host_port(to)
    s = settings()
    files = list(iter_dicom_files(paths))
    with Progress(
        TextColumn("C-STORE"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console
    ) as progress:
        task = progress.add_task("send", total=len(files))
        try:
            report = do_send(files, host, port, aec, aet or s.ae_title, progress=lambda f, c: progress.advance(task))
        except (AssociationFailed, ValueError) as exc:
            console.print(f"[red]{exc}[/red]")
            raise typer.Exit(1) from None
    for f, why in report.skipped:
        console.print(f"skipped {f}: {why}")
    for f, why in report.failed:
        console.print(f"[red]failed[/red] {f}: {why}")
    print(f"sent {report.sent}, failed {len(report.failed)}, skipped {len(report.skipped)}")
    if report.failed:
        raise typer.Exit(1)


@rules_app.command("test")
def rules_test(
    path: Annotated[Path, typer.Argument(help="a folder, a zip of DICOM files, or one DICOM file")],
    rules_file: Annotated[Path | None, typer.Option("--rules", exists=True, dir_okay=False,
                                                   help="rules file (default: RADNODE_RULES_FILE or the default rules)")
                          ] = None,
    calling_ae: Annotated[str | None, typer.Option("--calling-ae", help="as if sent by this AE title")] = None,
    called_ae: Annotated[str | None, typer.Option("--called-ae", help="as if sent to this AE title")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Show what the routing rules would do with these files, without storing or sending anything.

    For each series: the attributes the rules see (body part normalised), each rule's verdict and why
    it did not match, and the jobs that would be queued (after the CT lung pixel check). Exit 0, or 1
    when the input holds no DICOM, 2 for an invalid rules file.
    """
    from node.pipeline.offline import InferError, input_files
    from node.route.rules import RulesError, load_rules
    from node.route.tester import dry_run
    from plugins.registry import discover, unavailable_reason

    s = settings()
    manifests = discover().manifests
    try:
        rules = load_rules(rules_file or s.rules_file, manifests, [d.name for d in s.destinations])
    except RulesError as exc:
        console.print(f"[red]{escape(str(exc))}[/red]")
        raise typer.Exit(2) from None
    try:
        with input_files(path) as files:
            reports, refused, studies = dry_run(files, rules, manifests, calling_ae,
                                       unavailable=lambda m: unavailable_reason(m, s.models_path),
                                       called_ae=called_ae, stat_called_aes=s.stat_called_ae_titles)
    except InferError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from None
    if as_json:
        print(json.dumps({"series": [r.to_json() for r in reports], "studies": [s.to_json() for s in studies],
                          "refused": [{"file": str(f.path), "reason": f.reason} for f in refused]}, indent=2))
    else:
        print(f"rules: {len(rules.rules)} from {rules_file or s.rules_file or 'the default rules'}")
        for r in reports:
            _print_series_report(r)
        for st in studies:
            _print_study_report(st)
        for f in refused[:20]:
            print(f"refused {f.path}: {f.reason}")
        if len(refused) > 20:
            print(f"... and {len(refused) - 20} more refused file(s)")
    if not reports:
        console.print(f"[red]{path}: no DICOM series found ({len(refused)} other file(s))[/red]")
        raise typer.Exit(1)


def _print_study_report(st) -> None:
    print(f"\nstudy {st.study_uid}: study-level rules")
    for c in st.checks:
        if c.missing:
            print(f"  rule {c.rule}: no match: waiting for {'; '.join(c.missing)}")
        for sid, ms in c.chosen:
            for m in ms:
                print(f"  rule {c.rule}: would queue {m.plugin} on {m.queue} ({m.priority}) for series "
                      f"{st.series_uids[sid]}")
        for sid, plugin, why in c.left_out:
            print(f"  rule {c.rule}: {plugin} left out on series {st.series_uids[sid]}: {why}")


def _print_series_report(r) -> None:
    number = f" #{r.series_number}" if r.series_number is not None else ""
    print(f"\nseries {r.series_uid}{number}: {r.files} instance(s)")
    for key, value in r.attributes().items():
        shown = "\\".join(value) if key == "ImageType" else ", ".join(value) if isinstance(value, list) else value
        print(f"  {key:<18} {'-' if shown in (None, '') else shown}")
    for c in r.checks:
        if not c.matched:
            print(f"  rule {c.rule}: no match: {'; '.join(c.failed)}")
            continue
        chosen = ", ".join(m.plugin for m in c.matches) or "no plugin"
        print(f"  rule {c.rule}: matches -> {chosen}")
        for plugin, why in c.left_out:
            print(f"    {plugin} left out: {why}")
    for note in r.notes:
        print(f"  {note}")
    if not r.queued:
        print("  would queue: nothing")
    for m in r.queued:
        dests = "all destinations" if m.destinations is None else ", ".join(m.destinations) or "no destination"
        extra = "".join([f", stat: {m.urgent}" if m.urgent else "", f", within hours {m.hours}" if m.hours else ""])
        print(f"  would queue: {m.plugin} on {m.queue} ({m.priority}, rule {m.rule}{extra}) -> {dests}")


@feedback_app.command("export")
def feedback_export(
    fmt: Annotated[str, typer.Option("--format", help="csv (one line per verdict) or json")] = "csv",
    plugin: Annotated[str | None, typer.Option(help="only this plugin's jobs")] = None,
    since: Annotated[str | None, typer.Option(help="only verdicts given since this date or time (ISO 8601, UTC "
                                              "unless a zone is given)")] = None,
    out: Annotated[Path | None, typer.Option("--output", "-o", dir_okay=False,
                                             help="write here, not to stdout")] = None,
) -> None:
    """Every verdict with its job: plugin, version, rollout, study/series UIDs (no patient data), the finding it
    judged and the job's findings, ready for `radnode evaluate`-style metrics."""
    from datetime import UTC, datetime

    from node.monitor import export_text

    if fmt not in ("csv", "json"):
        console.print(f"[red]--format must be csv or json, got {escape(fmt)!r}[/red]")
        raise typer.Exit(2)
    try:
        start = datetime.fromisoformat(since) if since else None
    except ValueError:
        console.print(f"[red]--since is not an ISO 8601 date or time: {escape(since or '')!r}[/red]")
        raise typer.Exit(2) from None
    if start is not None and start.tzinfo is None:
        start = start.replace(tzinfo=UTC)
    with open_db()() as session:
        text = export_text(session, fmt, plugin, start)
    if out is None:
        sys.stdout.write(text)
        return
    from node.files import atomic_write

    atomic_write(out, text.encode())
    console.print(f"wrote {out}")


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument()] = "head") -> None:
    """Apply the job-table migrations (PostgreSQL in production; SQLite upgrades itself on run)."""
    from db.migrate import current_revision, upgrade
    from db.session import make_engine

    s = settings()
    engine = make_engine(s.db_url)
    upgrade(engine, revision)
    print(f"database at revision {current_revision(engine)}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
