"""Scale benchmark input: fill a radnode job table with a realistic history, fast.

What it writes
    Into the database at ``--database-url`` (SQLite file or PostgreSQL), after bringing its schema
    to the current revision with the project's migrations (db/migrate.py):

    * ``--studies`` studies (default 25,000) holding ``--series`` series (default 50,000) and
      ``--instances`` instance rows (default 1,000,000), received over ``--days`` days (default
      730) before now: CT series of a few dozen to a few hundred slices, CR/DX of one or two
      images, MR and US in between, so the instance counts per series are as skewed as a
      hospital's; every study and series complete or routed, as after a quiet period;
    * one job per series (default 50,000 jobs), each finished: about 90 % delivered, 5 % failed
      (at infer, encode or dispatch, with a reason), 5 % skipped, with findings, outputs, timings
      and warnings shaped like the workers' (db/jobs.py ``job_dict``), outputs removed by the
      retention for jobs older than a week;
    * deliveries for the jobs that reached dispatch (one or two destinations each): sent, or
      failed after the attempts for a job failed at dispatch.

    Rows go in with bulk statements: PostgreSQL ``COPY``, SQLite ``executemany`` in one
    transaction, so a million instances take a minute or two. The ids are assigned here; on
    PostgreSQL the id sequences are moved past them afterwards, so the node can go on inserting.
    The database must be empty (a fresh one): the generator refuses to add to a history.

    The instance rows point to paths (``<study>/<series>/<sop>.dcm`` under the node's instances
    folder) whose files do not exist: nothing in the job-table queries reads them. With
    ``--files DATA_DIR`` a small DICOM file (header only, no pixels) is written for every instance
    under ``DATA_DIR/instances``, for runs that need the files (retention, reconcile).

Usage
    .venv/bin/python bench/history.py --database-url sqlite:////tmp/big.db [--instances 1000000]
    .venv/bin/python bench/history.py --database-url postgresql://postgres@127.0.0.1/radnode_big

UIDs are ``2.25.<128-bit number>`` from a seeded generator (``--seed``): the same arguments give
the same history. No patient data is written (there is none in the job table).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

BATCH = 20_000
MODALITIES = (  # (modality, share of series, relative instance weight, SOP Class, body part, plugin, queue)
    ("CT", 0.30, 8.0, "1.2.840.10008.5.1.4.1.1.2", "CHEST", "lung-quant", "gpu"),
    ("CR", 0.35, 0.08, "1.2.840.10008.5.1.4.1.1.1", "CHEST", "cxr-pneumonia", "gpu"),
    ("DX", 0.15, 0.08, "1.2.840.10008.5.1.4.1.1.1.1", "CHEST", "cxr-foundation", "gpu"),
    ("MR", 0.12, 3.0, "1.2.840.10008.5.1.4.1.1.4", "BRAIN", "mr-triage", "gpu"),
    ("US", 0.08, 0.5, "1.2.840.10008.5.1.4.1.1.6.1", "PROSTATE", "us-prostate-seg", "cpu"),
)
DESTINATIONS = ("pacs", "backup")
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"


@dataclass(frozen=True, slots=True)
class Counts:
    studies: int
    series: int
    instances: int


def uid(rng: random.Random) -> str:
    return f"2.25.{rng.getrandbits(127)}"


def spread(total: int, weights: Sequence[float], rng: random.Random, minimum: int = 1) -> list[int]:
    """`total` split over len(weights) parts, each >= `minimum`, proportional to the weights (with noise)."""
    noisy = [w * rng.lognormvariate(0, 0.6) for w in weights]
    scale = (total - minimum * len(weights)) / sum(noisy)
    parts = [minimum + int(n * scale) for n in noisy]
    short = total - sum(parts)
    for i in range(abs(short)):  # hand out (or take back) the rounding remainder
        j = i % len(parts)
        if short > 0:
            parts[j] += 1
        elif parts[j] > minimum:
            parts[j] -= 1
    return parts


class Writer:
    """Bulk rows into one table: COPY on PostgreSQL, executemany on SQLite (same transaction)."""

    def __init__(self, dbapi: Any, dialect: str) -> None:
        self.dbapi = dbapi
        self.dialect = dialect

    def value(self, v: Any) -> Any:
        if isinstance(v, datetime):
            v = v.astimezone(UTC)
            # SQLite: naive UTC in SQLAlchemy's storage format, so comparisons with the node's values work
            return v if self.dialect == "postgresql" else v.replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S.%f")
        if isinstance(v, (dict, list)):
            return json.dumps(v)
        return v

    def rows(self, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> int:
        n = 0
        cur = self.dbapi.cursor()
        if self.dialect == "postgresql":
            with cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row([self.value(v) for v in row])
                    n += 1
        else:
            sql = f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
            batch: list[list[Any]] = []
            for row in rows:
                batch.append([self.value(v) for v in row])
                if len(batch) >= BATCH:
                    cur.executemany(sql, batch)
                    n += len(batch)
                    batch.clear()
            if batch:
                cur.executemany(sql, batch)
                n += len(batch)
        cur.close()
        return n


def header_file(path: Path, study_uid: str, series_uid: str, sop_uid: str, sop_class: str, modality: str) -> None:
    """A small DICOM file (header only) for one instance row."""
    from pydicom.dataset import Dataset, FileMetaDataset

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = EXPLICIT_VR_LE
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study_uid, series_uid, modality
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def job_columns(job_id: int, series_id: int, kind: tuple, finished: datetime, rng: random.Random) -> dict[str, Any]:
    """One finished job as the workers leave it."""
    modality, _, _, _, _, plugin, queue = kind
    roll = rng.random()
    state = "delivered" if roll < 0.90 else "failed" if roll < 0.95 else "skipped"
    fail_stage = reason = None
    findings = outputs = None
    timings = {"queue_wait": round(rng.uniform(0.05, 30), 3), "model_load": round(rng.uniform(0, 4), 3),
               "image_load": round(rng.uniform(0.1, 6), 3)}
    warnings: list[str] = []
    if state == "skipped":
        reason = rng.choice(["not applicable: no lungs in the field of view", "model unavailable: weights missing"])
    else:
        timings |= {"infer": round(rng.uniform(0.2, 40), 3), "encode": round(rng.uniform(0.2, 5), 3),
                    "encode:SR": round(rng.uniform(0.05, 1), 3), "encode:SEG": round(rng.uniform(0.1, 3), 3)}
        p = round(rng.random(), 4)
        findings = {
            "summary": f"{plugin}: probability {p}",
            "classifications": [{"code": "233604007", "scheme": "SCT", "meaning": "Pneumonia", "probability": p,
                                 "threshold": 0.5, "positive": p >= 0.5}],
            "measurements": [{"code": "39607008", "scheme": "SCT", "meaning": "Lung",
                              "value": round(rng.uniform(3e3, 7e3), 1), "unit": "cm3"}] if modality == "CT" else [],
            "not_applicable": None,
        }
        outputs = [f"/data/outputs/{job_id}/{name}.dcm" for name in ("SR", "SEG", "SC-001")]
        if rng.random() < 0.1:
            warnings = ["slice spacing uneven (max gap 2.5 mm)"]
        if state == "failed":
            fail_stage = rng.choice(["infer", "encode", "dispatch", "dispatch"])
            reason = {"infer": "CUDA out of memory", "encode": "SEG geometry does not match the source",
                      "dispatch": "pacs: association rejected (0x0122) after 8 tries"}[fail_stage]
            if fail_stage == "infer":
                findings = outputs = None
    created = finished - timedelta(seconds=sum(timings.values()) + 2)
    return {
        "id": job_id, "series_id": series_id, "plugin": plugin, "plugin_version": "1.0.0",
        "rule": f"{modality.lower()}-ai",
        "state": state, "queue": queue, "priority": "routine", "attempts": 1 if state != "failed" else 3,
        "fail_stage": fail_stage, "reason": reason, "weights_sha256": "ab" * 32, "worker": "gpu-host-1:4242",
        "warnings": warnings, "findings": findings, "outputs": outputs, "timings": timings, "destinations": None,
        "created_at": created, "updated_at": finished, "queued_at": created, "enqueued_at": created,
        "started_at": created + timedelta(seconds=timings["queue_wait"]), "heartbeat_at": finished,
        "encoded_at": finished if outputs else None, "delivered_at": finished if state == "delivered" else None,
        "finished_at": finished if state in ("failed", "skipped") else None,
        "outputs_removed_at": None,
    }


def instance_rows(plan: Iterable[tuple], rng: random.Random, files: Path | None) -> Iterable[tuple]:
    """The instance rows of the planned series, received evenly between the series' first and last arrival
    (and their header-only files when `files` is a data dir)."""
    instance_id = 0
    for study_uid, series_uid, series_id, kind, n, first, received in plan:
        for k in range(n):
            instance_id += 1
            sop = uid(rng)
            if files is not None:
                header_file(files / "instances" / study_uid / series_uid / f"{sop}.dcm", study_uid, series_uid, sop,
                            kind[3], kind[0])
            yield (instance_id, sop, series_id, kind[3], EXPLICIT_VR_LE, f"{study_uid}/{series_uid}/{sop}.dcm",
                   520_000 if kind[0] == "CT" else 8_000_000, None, "MODALITY1",
                   first + (received - first) * (k / max(1, n - 1)), 1)


def generate(url: str, counts: Counts, days: float, seed: int, files: Path | None = None,
             now: datetime | None = None, quiet: bool = False) -> dict[str, int]:
    """Fill the (empty) database at `url` with a history; returns the rows written per table.

    Raises RuntimeError when the database already holds studies, SQLAlchemy errors when it is unreachable.
    """
    from sqlalchemy import text

    from db.migrate import upgrade
    from db.session import make_engine

    rng = random.Random(seed)
    now = now or datetime.now(UTC)
    start = now - timedelta(days=days)
    engine = make_engine(url)
    upgrade(engine)
    dialect = engine.dialect.name
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    written: dict[str, int] = {}
    t0 = time.perf_counter()
    with engine.begin() as conn:
        if conn.execute(text("SELECT count(*) FROM study")).scalar_one():
            raise RuntimeError("the database already holds studies: give a fresh one")
        dbapi = conn.connection.dbapi_connection
        w = Writer(dbapi, dialect)
        # studies: arrival times spread over the period, ordered (ids grow with time as in real life)
        times = sorted(start + timedelta(seconds=rng.uniform(0, days * 86400)) for _ in range(counts.studies))
        series_per_study = spread(counts.series, [1.0] * counts.studies, rng)
        kinds = [rng.choices(MODALITIES, weights=[m[1] for m in MODALITIES])[0] for _ in range(counts.series)]
        per_series = spread(counts.instances, [k[2] for k in kinds], rng)
        studies, series, jobs, deliveries = [], [], [], []
        plan = []  # (study_uid, series_uid, series_id, kind, n, first, received): the instances, written after
        series_id = job_id = delivery_id = 0
        for study_id, (at, n_series) in enumerate(zip(times, series_per_study, strict=True), start=1):
            study_uid = uid(rng)
            last = at
            for _ in range(n_series):
                series_id += 1
                kind = kinds[series_id - 1]
                n = per_series[series_id - 1]
                series_uid = uid(rng)
                first = last
                received = first + timedelta(seconds=n * rng.uniform(0.01, 0.05))
                completed = received + timedelta(seconds=30)
                routed = completed + timedelta(seconds=rng.uniform(0.05, 2))
                series.append((series_id, series_uid, study_id, "routed", kind[0], kind[3], kind[4],
                               f"{kind[0]} {kind[4].lower()}", "routine", "SIEMENS", 1.0 if kind[0] == "CT" else None,
                               "ORIGINAL\\PRIMARY\\AXIAL", rng.randint(1, 9), "MODALITY1", n, first, received,
                               completed, 0, routed, f"jobs: {kind[5]} (rule {kind[0].lower()}-ai)"))
                plan.append((study_uid, series_uid, series_id, kind, n, first, received))
                job_id += 1
                finished = routed + timedelta(seconds=rng.uniform(5, 120))
                job = job_columns(job_id, series_id, kind, finished, rng)
                if finished < now - timedelta(days=7):
                    job["outputs_removed_at"] = finished + timedelta(days=7, minutes=5)
                jobs.append(job)
                if job["outputs"] and job["fail_stage"] in (None, "dispatch"):
                    for dest in DESTINATIONS[: rng.choice((1, 1, 2))]:
                        delivery_id += 1
                        failed = job["fail_stage"] == "dispatch"
                        deliveries.append((delivery_id, job_id, dest, "failed" if failed else "sent",
                                           8 if failed else 1, "association rejected (0x0122)" if failed else None,
                                           finished, finished, None, finished, None, None,
                                           None if failed else finished, None if failed else 3))
                last = received
            studies.append((study_id, study_uid, "complete", "CT chest" if rng.random() < 0.5 else "XR chest", at,
                            last, last + timedelta(seconds=30), 0))
        written["study"] = w.rows("study", STUDY_COLUMNS, studies)
        written["series"] = w.rows("series", SERIES_COLUMNS, series)
        written["instance"] = w.rows("instance", INSTANCE_COLUMNS, instance_rows(plan, rng, files))
        written["job"] = w.rows("job", JOB_COLUMNS, ([j[c] for c in JOB_COLUMNS] for j in jobs))
        written["delivery"] = w.rows("delivery", DELIVERY_COLUMNS, deliveries)
        if dialect == "postgresql":
            for table in ("study", "series", "instance", "job", "delivery"):
                conn.execute(text(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                                  f"(SELECT coalesce(max(id), 0) + 1 FROM {table}), false)"))
    if dialect == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("ANALYZE"))
    else:
        with engine.begin() as conn:
            conn.execute(text("ANALYZE"))
    engine.dispose()
    say(f"history written in {time.perf_counter() - t0:.1f} s: "
        + ", ".join(f"{n:,} {t}" for t, n in written.items()))
    return written


STUDY_COLUMNS = ("id", "study_uid", "state", "study_description", "first_received_at", "last_received_at",
                 "completed_at", "reopened_count")
SERIES_COLUMNS = ("id", "series_uid", "study_id", "state", "modality", "sop_class_uid", "body_part_examined",
                  "series_description", "protocol_name", "manufacturer", "slice_thickness", "image_type",
                  "series_number", "calling_ae", "instance_count", "first_received_at", "last_received_at",
                  "completed_at", "reopened_count", "routed_at", "route_note")
INSTANCE_COLUMNS = ("id", "sop_instance_uid", "series_id", "sop_class_uid", "transfer_syntax_uid", "path",
                    "size_bytes", "number_of_frames", "calling_ae", "received_at", "receive_count")
JOB_COLUMNS = ("id", "series_id", "plugin", "plugin_version", "rule", "state", "queue", "priority", "attempts",
               "fail_stage", "reason", "weights_sha256", "worker", "warnings", "findings", "outputs", "timings",
               "destinations", "outputs_removed_at", "created_at", "updated_at", "queued_at", "enqueued_at",
               "started_at", "heartbeat_at", "encoded_at", "delivered_at", "finished_at")
DELIVERY_COLUMNS = ("id", "job_id", "destination", "state", "attempts", "last_error", "created_at", "updated_at",
                    "next_attempt_at", "enqueued_at", "started_at", "heartbeat_at", "sent_at", "instances")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--database-url", required=True, help="SQLAlchemy URL of an empty database")
    p.add_argument("--studies", type=int, default=25_000)
    p.add_argument("--series", type=int, default=50_000)
    p.add_argument("--instances", type=int, default=1_000_000)
    p.add_argument("--days", type=float, default=730.0, help="history spread over this many days before now")
    p.add_argument("--seed", type=int, default=15)
    p.add_argument("--files", type=Path, default=None, help="also write a header-only DICOM file per instance under "
                                                            "FILES/instances (a node's data dir)")
    args = p.parse_args(argv)
    if not (1 <= args.studies <= args.series <= args.instances) or args.days <= 0:
        p.error("need 1 <= studies <= series <= instances and days > 0")
    try:
        generate(args.database_url, Counts(args.studies, args.series, args.instances), args.days, args.seed, args.files)
    except RuntimeError as exc:
        print(f"history: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
