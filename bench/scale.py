"""Scale benchmark: does the job table stay fast as the history grows? Empty vs. a hospital's two years.

What it measures
    For SQLite and PostgreSQL side by side in one run, each first on an empty job table, then on one
    filled by bench/history.py (default 1,000,000 instances, 50,000 series in 25,000 studies,
    50,000 jobs with their deliveries, over two years), the median of ``--repeat`` (default 3) runs of:

    * in the benchmark's own process, against the database (real components, real database):
      - ``tracker sweep``: one pass of the tracker (node/ingest/tracker.py: ``sweep`` and the
        ``wait_seconds`` query it runs after each pass), nothing to complete;
      - ``sweeper pass``: one pass of the job-table sweeper (lost jobs, due deliveries);
      - ``route 1 series``: Router.route_series on a fresh complete CR series of 50 instances with a
        one-rule rule set (cxr-pneumonia), up to the hand-over of the job to the broker (the broker is
        left out: a stand-in records the ids);
      - ``list_jobs`` / ``list_studies`` (db/): the list functions behind the API, dashboard and CLI, a first
        page of 100, a deep page by offset and, where they have it, by cursor (no HTTP, no serialising);
    * against a running ``radnode run`` on that database (routing off: an empty rules file, no
      embedded worker, reading the API open):
      - ``node start``: from the start of the process to "running" and a C-ECHO answered;
      - ``C-STORE``: images/s acknowledged for a ``--slices`` (default 100) slice CT series sent by
        one DCMTK ``storescu`` (bench/ingest.py builds the series from the shared chest CT);
        the stored count is checked through the API;
      - ``GET /v1/jobs``, ``GET /v1/studies``: the first page (limit 100), a deep page by offset
        (jobs offset 40,000, studies offset 20,000) and, where the API has it, the same deep page by
        cursor (``after``);
      - ``GET /`` (dashboard: jobs and studies lists);
      - ``radnode jobs --json`` and ``radnode studies`` (whole commands, Python start-up included).

    Then it prints one table: each figure empty and with history, and the ratio history/empty
    (for C-STORE empty/history, so that > 1 means slower in both cases).

Caveats
    The machine (2 cores here) may be shared with other work while this runs: each figure is the
    median of ``--repeat`` runs, and the empty/history pairs are measured one after the other.
    The instance rows of the history point to files that do not exist (see bench/history.py).

Usage
    .venv/bin/python bench/scale.py [--instances 1000000] [--repeat 3] [--backends sqlite,postgresql]
        [--pg-admin postgresql://postgres@127.0.0.1:5432/postgres] [--json FILE]

Every process it starts (node, storescu, CLI) is stopped and every temporary folder and database it
made is removed at the end, also after an error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
for p in (REPO, REPO / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import history  # noqa: E402  (bench/history.py)
import ingest  # noqa: E402  (bench/ingest.py: processes, series factory, storescu)

PG_ADMIN = os.environ.get("RADNODE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
AE = "RADNODE"
JOBS_DEEP_OFFSET, STUDIES_DEEP_OFFSET = 40_000, 20_000
ROUTE_RULES = """rules:
  - name: chest-cr
    when: {Modality: CR}
    plugins: [cxr-pneumonia]
"""


class BenchError(RuntimeError):
    """The benchmark cannot go on."""


# --- databases ----------------------------------------------------------------------------------


@dataclass
class Database:
    kind: str
    url: str
    pg_name: str | None = None


def make_database(kind: str, folder: Path, pg_admin: str) -> Database:
    if kind == "sqlite":
        return Database(kind, f"sqlite:///{folder / 'radnode.db'}")
    import psycopg

    name = f"radnode_scale_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg_admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = pg_admin.rsplit("/", 1)[0]
    return Database(kind, f"{base}/{name}", name)


def drop_database(db: Database, pg_admin: str) -> None:
    if db.pg_name is None:
        return
    import psycopg

    with psycopg.connect(pg_admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{db.pg_name}" WITH (FORCE)')


# --- in-process measurements --------------------------------------------------------------------


def timed(fn: Callable[[], Any], repeat: int, warm: int = 1) -> list[float]:
    """Seconds of `repeat` calls of fn after `warm` unmeasured ones."""
    for _ in range(warm):
        fn()
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return runs


class StandIn:
    """Takes the broker's place in process (the broker is not what is measured): records what it was given."""

    def __init__(self) -> None:
        self.sent: list[Any] = []

    def send(self, items: list[tuple[int, str, str]]) -> list[int]:
        self.sent += items
        return [i for i, _, _ in items]

    def send_dispatch(self, ids: list[int]) -> list[int]:
        self.sent += ids
        return list(ids)


def in_process(url: str, work: Path, repeat: int) -> dict[str, list[float]]:
    from pydicom.uid import generate_uid

    from db.models import utcnow
    from db.records import ReceivedInstance, complete_stable, record_instance, series_id_of
    from db.session import make_engine, make_sessionmaker
    from node.ingest.tracker import Tracker
    from node.queueing.sweeper import Sweeper
    from node.route.router import Router
    from node.route.rules import parse_rules
    from node.settings import Settings
    from plugins.registry import discover

    engine = make_engine(url)
    maker = make_sessionmaker(engine)
    out: dict[str, list[float]] = {}
    try:
        tracker = Tracker(maker, stable_seconds=5)
        out["tracker sweep"] = timed(lambda: (tracker.sweep(), tracker.wait_seconds()), repeat)
        sweeper = Sweeper(maker, StandIn(), Settings(data_dir=work / "sweeper", output_retention_days=0))
        out["sweeper pass"] = timed(sweeper.sweep, repeat)
        manifests = discover().manifests
        router = Router(maker, parse_rules(ROUTE_RULES, manifests), manifests, StandIn(), work / "instances")

        def fresh_series() -> int:
            now = utcnow() - timedelta(seconds=60)
            study, series = generate_uid(), generate_uid()
            with maker.begin() as session:
                for _ in range(50):
                    sop = generate_uid()
                    record_instance(session, ReceivedInstance(
                        study, series, sop, "1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.1.2.1",
                        f"{study}/{series}/{sop}.dcm", 1000, "BENCH", modality="CR", body_part_examined="CHEST"),
                        now)
            with maker.begin() as session:
                complete_stable(session, utcnow(), 5)
                return series_id_of(session, series)

        runs = []
        for _ in range(repeat):
            sid = fresh_series()
            t0 = time.perf_counter()
            if not router.route_series(sid):
                raise BenchError("routing the benchmark series made no job")
            runs.append(time.perf_counter() - t0)
        out["route 1 series"] = runs
        out |= list_queries(maker, url, repeat)
    finally:
        engine.dispose()
    return out


def list_queries(maker: Any, url: str, repeat: int) -> dict[str, list[float]]:
    """The list functions behind the API, the dashboard and the CLI, in process (no HTTP, no serialising):
    a first page of 100 and a deep one by offset and, where this version has them, by cursor."""
    import inspect

    from db.jobs import list_jobs
    from db.records import list_studies

    job_after, study_after = deep_cursors(url)
    calls: dict[str, Callable[[Any], Any]] = {
        "list_jobs first page": lambda s: list_jobs(s, limit=100),
        "list_jobs deep (offset)": lambda s: list_jobs(s, limit=100, offset=JOBS_DEEP_OFFSET),
        "list_studies first page": lambda s: list_studies(s, limit=100),
        "list_studies deep (offset)": lambda s: list_studies(s, limit=100, offset=STUDIES_DEEP_OFFSET),
    }
    if "after" in inspect.signature(list_jobs).parameters:
        calls["list_jobs deep (cursor)"] = lambda s: list_jobs(s, limit=100, after=job_after)
        if study_after:
            calls["list_studies deep (cursor)"] = lambda s: list_studies(s, limit=100, after=study_after)
    out = {}
    for name, call in calls.items():
        def once(call=call):
            with maker() as session:
                call(session)
        out[name] = timed(once, repeat)
    return out


# --- the node -----------------------------------------------------------------------------------


@dataclass
class Node:
    env: dict[str, str]
    port: int
    http: int
    log: Path
    command: list[str] = field(default_factory=list)

    def get(self, path: str, timeout: float = 120) -> tuple[float, bytes]:
        t0 = time.perf_counter()
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http}{path}", timeout=timeout) as r:
            body = r.read()
        return time.perf_counter() - t0, body

    def cli(self, *args: str) -> float:
        t0 = time.perf_counter()
        done = subprocess.run([*self.command, *args], env=self.env, capture_output=True, timeout=300, check=False)
        if done.returncode != 0:
            raise BenchError(f"radnode {' '.join(args)} exited {done.returncode}: {done.stderr[-1500:]!r}")
        return time.perf_counter() - t0


def start_node(procs: ingest.Processes, work: Path, url: str, tries: int = 3) -> tuple[Node, float]:
    """`radnode run` on the database (routing off); returns the node and its start-up seconds. A port taken by
    another program between choosing it and binding it (a shared machine) is retried with new ports."""
    for attempt in range(tries):
        try:
            return _start_node(procs, work, url)
        except ingest.BenchError as exc:
            if "Address already in use" not in str(exc) or attempt == tries - 1:
                raise
            print("  a port was taken meanwhile; starting again on others", flush=True)
    raise AssertionError("unreachable")


def _start_node(procs: ingest.Processes, work: Path, url: str) -> tuple[Node, float]:
    rules = work / "rules.yaml"
    rules.write_text("rules: []\n")
    port, http = ingest.free_port(), ingest.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADNODE_")}
    env.update(
        RADNODE_DATA_DIR=str(work / "data"), RADNODE_DATABASE_URL=url, RADNODE_DICOM_HOST="127.0.0.1",
        RADNODE_DICOM_PORT=str(port), RADNODE_HTTP_PORT=str(http), RADNODE_STABLE_SECONDS="5",
        RADNODE_AE_TITLE=AE, RADNODE_RULES_FILE=str(rules), RADNODE_EMBEDDED_WORKER="false",
        RADNODE_API_READ_OPEN="true", RADNODE_OUTPUT_RETENTION_DAYS="0",
    )
    command = ingest.radnode_command()
    log = work / "radnode.log"
    log.unlink(missing_ok=True)
    t0 = time.perf_counter()
    proc = procs.start([*command, "run"], env, log)

    def running() -> bool:
        return any(ln.startswith("radnode ") and ln.rstrip().endswith("running")
                   for ln in log.read_text(errors="replace").splitlines())

    ingest.wait_until("radnode start", running, proc, log, timeout=300)
    ingest.wait_until("radnode C-ECHO", lambda: ingest.dicom_echo(AE, port), proc, log, timeout=60)
    started = time.perf_counter() - t0
    node = Node(env, port, http, log, command)
    ingest.wait_until("radnode HTTP", lambda: _http_up(node), proc, log, timeout=60)
    return node, started


def _http_up(node: Node) -> bool:
    try:
        node.get("/healthz", timeout=5)
        return True
    except OSError:
        try:
            node.get("/v1/plugins", timeout=5)
            return True
        except OSError:
            return False


def has_cursor(node: Node) -> bool:
    """Whether this version's /v1/jobs takes `after` (keyset pagination)."""
    _, body = node.get("/openapi.json")
    params = json.loads(body)["paths"]["/v1/jobs"]["get"].get("parameters", [])
    return any(p["name"] == "after" for p in params)


def deep_cursors(url: str) -> tuple[int, str | None]:
    """The job id and study UID that end the page before the deep offsets (what a client would pass as `after`)."""
    from sqlalchemy import select

    from db.models import Job, Study
    from db.session import make_engine, make_sessionmaker

    engine = make_engine(url)
    try:
        with make_sessionmaker(engine)() as s:
            job = s.execute(select(Job.id).order_by(Job.id.desc()).offset(JOBS_DEEP_OFFSET - 1).limit(1)).scalar()
            study = s.execute(select(Study.study_uid).order_by(Study.first_received_at.desc(), Study.id.desc())
                              .offset(STUDIES_DEEP_OFFSET - 1).limit(1)).scalar()
    finally:
        engine.dispose()
    return job or 1, study


def against_node(procs: ingest.Processes, work: Path, url: str, factory: ingest.SeriesFactory, args: argparse.Namespace,
                 ) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    job_after, study_after = deep_cursors(url)
    starts = []
    node, seconds = start_node(procs, work, url)
    starts.append(seconds)
    out["node start"] = starts
    rates = []
    for r in range(args.repeat):
        series = factory.make(work / "series" / str(r), args.slices, f"scale bench {r}")
        os.sync()
        try:
            elapsed = ingest.send(procs, ingest.Target("radnode", AE, node.port, node.log), series.files, 1,
                                  work, f"scale-{r}")
        except ingest.BenchError as exc:
            raise BenchError(f"{exc}\nnode log:\n{ingest.tail(node.log, 40)}") from None
        rates.append(args.slices / elapsed)
        _, body = node.get(f"/v1/studies/{series.study_uid}")
        stored = sum(se["instances"] for se in json.loads(body)["series"])
        if stored != args.slices:
            raise BenchError(f"{stored} instances stored, {args.slices} sent")
        shutil.rmtree(work / "series" / str(r))
    out["C-STORE img/s"] = rates
    paths = {
        "GET /v1/jobs first page": "/v1/jobs?limit=100",
        "GET /v1/jobs deep (offset)": f"/v1/jobs?limit=100&offset={JOBS_DEEP_OFFSET}",
        "GET /v1/studies first page": "/v1/studies?limit=100",
        "GET /v1/studies deep (offset)": f"/v1/studies?limit=100&offset={STUDIES_DEEP_OFFSET}",
        "GET / (dashboard)": "/?refresh=0",
    }
    if has_cursor(node):
        paths["GET /v1/jobs deep (cursor)"] = f"/v1/jobs?limit=100&after={job_after}"
        if study_after:
            paths["GET /v1/studies deep (cursor)"] = (
                f"/v1/studies?limit=100&after={urllib.parse.quote(study_after)}")
    for name, path in paths.items():
        out[name] = timed(lambda path=path: node.get(path), args.repeat)
    out["radnode jobs --json"] = timed(lambda: node.cli("jobs", "--json"), args.repeat, warm=0)
    out["radnode studies"] = timed(lambda: node.cli("studies"), args.repeat, warm=0)
    return out


# --- the run ------------------------------------------------------------------------------------

ORDER = ("tracker sweep", "sweeper pass", "route 1 series",
         "list_jobs first page", "list_jobs deep (offset)", "list_jobs deep (cursor)", "list_studies first page",
         "list_studies deep (offset)", "list_studies deep (cursor)", "node start", "C-STORE img/s",
         "GET /v1/jobs first page", "GET /v1/jobs deep (offset)", "GET /v1/jobs deep (cursor)",
         "GET /v1/studies first page", "GET /v1/studies deep (offset)", "GET /v1/studies deep (cursor)",
         "GET / (dashboard)", "radnode jobs --json", "radnode studies")


def measure(kind: str, filled: bool, args: argparse.Namespace, factory: ingest.SeriesFactory, root: Path,
            ) -> dict[str, list[float]]:
    work = Path(tempfile.mkdtemp(prefix=f"{kind}-{'history' if filled else 'empty'}-", dir=root))
    db = make_database(kind, work, args.pg_admin)
    procs = ingest.Processes()
    try:
        if filled:
            counts = history.Counts(args.studies, args.series, args.instances)
            history.generate(db.url, counts, args.days, seed=15)
        else:
            from db.migrate import upgrade
            from db.session import make_engine

            engine = make_engine(db.url)
            upgrade(engine)
            engine.dispose()
        results = in_process(db.url, work, args.repeat)
        results |= against_node(procs, work, db.url, factory, args)
        findings = ingest.log_findings(work / "radnode.log")
        if findings:
            print("  node log warnings/errors:\n" + "\n".join("    " + ln for ln in findings), flush=True)
        return results
    finally:
        procs.close()
        drop_database(db, args.pg_admin)
        shutil.rmtree(work, ignore_errors=True)


def cell(name: str, runs: list[float] | None) -> str:
    if not runs:
        return "-"
    m = statistics.median(runs)
    return f"{m:.0f}" if name.endswith("img/s") else f"{m * 1000:.1f} ms" if m < 10 else f"{m:.1f} s"


def ratio(name: str, empty: list[float] | None, big: list[float] | None) -> str:
    if not empty or not big:
        return "-"
    a, b = statistics.median(empty), statistics.median(big)
    r = a / b if name.endswith("img/s") else b / a
    return f"{r:.2f}x"


def render(results: dict[str, dict[str, dict[str, list[float]]]], args: argparse.Namespace) -> str:
    kinds = list(results)
    lines = [f"history: {args.instances:,} instances, {args.series:,} series, {args.studies:,} studies, "
             f"{args.series:,} jobs over {args.days:g} days; median of {args.repeat} run(s); ratio = history/empty "
             "(C-STORE: empty/history), > 1 is slower"]
    head = f"{'':<32}" + "".join(f"{k + ' empty':>20}{k + ' history':>20}{'ratio':>8}" for k in kinds)
    lines.append(head)
    for name in ORDER:
        if not any(name in results[k].get("empty", {}) or name in results[k].get("history", {}) for k in kinds):
            continue
        row = f"{name:<32}"
        for k in kinds:
            e, b = results[k].get("empty", {}).get(name), results[k].get("history", {}).get(name)
            row += f"{cell(name, e):>20}{cell(name, b):>20}{ratio(name, e, b):>8}"
        lines.append(row)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", default="sqlite,postgresql")
    p.add_argument("--instances", type=int, default=1_000_000)
    p.add_argument("--series", type=int, default=50_000)
    p.add_argument("--studies", type=int, default=25_000)
    p.add_argument("--days", type=float, default=730.0)
    p.add_argument("--slices", type=int, default=100, help="slices of each C-STORE series (default 100)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--histories", default="empty,history", help="which of empty,history to measure")
    p.add_argument("--pg-admin", default=PG_ADMIN, help="PostgreSQL URL allowed to create and drop databases")
    p.add_argument("--source", type=Path, default=None, help="folder of source CT slices (default: shared data)")
    p.add_argument("--tmp", type=Path, default=None, help="parent of the temporary work folder")
    p.add_argument("--json", type=Path, default=None, help="write the runs to this file")
    args = p.parse_args(argv)
    kinds = [k.strip() for k in args.backends.split(",") if k.strip()]
    if not kinds or set(kinds) - {"sqlite", "postgresql"}:
        p.error("--backends: sqlite and/or postgresql")

    def on_term(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    for tool in ("storescu", "echoscu"):
        if shutil.which(tool) is None:
            print(f"{tool} not found: apt-get install dcmtk", file=sys.stderr)
            return 1
    root = Path(tempfile.mkdtemp(prefix="radnode-scale-", dir=args.tmp))
    results: dict[str, dict[str, dict[str, list[float]]]] = {}
    try:
        factory = ingest.SeriesFactory(ingest.load_templates((args.source or ingest.default_source()).resolve()))
        for kind in kinds:
            results[kind] = {}
            for label in [h.strip() for h in args.histories.split(",") if h.strip()]:
                filled = label == "history"
                print(f"{kind}, {label} ...", flush=True)
                results[kind][label] = measure(kind, filled, args, factory, root)
                for name in ORDER:
                    if name in results[kind][label]:
                        print(f"  {name:<32}{cell(name, results[kind][label][name]):>12}", flush=True)
    except (BenchError, ingest.BenchError, RuntimeError) as exc:
        print(f"scale benchmark failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print()
    print(render(results, args))
    if args.json:
        args.json.write_text(json.dumps({
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
            "results": results,
        }, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
