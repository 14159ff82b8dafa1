"""The job table at scale, on SQLite and PostgreSQL: keyset pagination of jobs and studies (every row once, stable
under inserts; API and CLI), the query plans that keep the lists and the tracker flat (indexes, no full scans),
and migration 0005 on an existing database with rows."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import event, inspect, select, text

from db import jobs
from db.jobs import NewJob, list_jobs
from db.migrate import current_revision, upgrade
from db.models import Study, utcnow
from db.records import ReceivedInstance, complete_stable, list_studies, record_instance, series_id_of


def _series(sessionmaker, at, study: str | None = None) -> tuple[str, int]:
    """One instance of a new series (in `study` or a new one) received at `at`; returns (study uid, series id)."""
    study = study or generate_uid()
    series, sop = generate_uid(), generate_uid()
    with sessionmaker.begin() as s:
        record_instance(s, ReceivedInstance(study, series, sop, "1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.1.2.1",
                                            f"{study}/{series}/{sop}.dcm", 10, "CR1", modality="CR"), at)
        return study, series_id_of(s, series)


def _job(sessionmaker, at) -> int:
    _, sid = _series(sessionmaker, at)
    with sessionmaker.begin() as s:
        [job_id] = jobs.create_jobs(s, sid, [NewJob("p1", "1.0", "r", "cpu", "routine")], at)
    return job_id


def test_job_pages_by_cursor_cover_every_job_once_under_inserts(sessionmaker):
    t0 = utcnow()
    made = [_job(sessionmaker, t0) for _ in range(23)]
    seen, after, pages = [], None, 0
    while True:
        with sessionmaker() as s:
            page = list_jobs(s, limit=5, after=after)
        if not page:
            break
        pages += 1
        seen += [j["id"] for j in page]
        after = page[-1]["id"]
        _job(sessionmaker, t0)  # new jobs arrive while a client pages: they go in front, nothing shifts
    assert pages == 5
    assert seen == sorted(made, reverse=True)
    with sessionmaker() as s:  # the offset form still works, filters combine with the cursor
        assert [j["id"] for j in list_jobs(s, limit=3, offset=0)] == [j["id"] for j in list_jobs(s, limit=3)]
        assert [j["id"] for j in list_jobs(s, state="queued", after=made[3], limit=100)] == made[2::-1]


def test_study_pages_by_cursor_cover_every_study_once_under_inserts(sessionmaker):
    t0 = utcnow() - timedelta(days=1)
    made = []
    for i in range(12):  # pairs received at the same moment: the id breaks the tie
        study, _ = _series(sessionmaker, t0 + timedelta(minutes=i // 2))
        made.append(study)
    _series(sessionmaker, t0, study=made[5])  # a second series in one study: still one row
    seen, after = [], None
    while True:
        with sessionmaker() as s:
            page = list_studies(s, limit=5, after=after)
        if not page:
            break
        seen += [st["study_uid"] for st in page]
        after = page[-1]["study_uid"]
        _series(sessionmaker, utcnow())  # a new study arrives meanwhile
    assert seen == made[::-1]
    with sessionmaker() as s:
        with pytest.raises(LookupError):
            list_studies(s, after=generate_uid())


def test_api_and_cli_take_the_cursor(tmp_path: Path, monkeypatch):
    from fastapi.testclient import TestClient
    from typer.testing import CliRunner

    from db.session import make_engine, make_sessionmaker
    from node.api.app import create_app
    from node.cli.main import app as cli
    from node.settings import Settings

    settings = Settings(data_dir=tmp_path / "data", api_read_open=True)
    engine = make_engine(settings.db_url)
    upgrade(engine)
    maker = make_sessionmaker(engine)
    ids = [_job(maker, utcnow()) for _ in range(4)]
    client = TestClient(create_app(settings))
    assert [j["id"] for j in client.get("/v1/jobs", params={"after": ids[2]}).json()] == [ids[1], ids[0]]
    assert [j["id"] for j in client.get("/v1/jobs", params={"limit": 2, "offset": 2}).json()] == [ids[1], ids[0]]
    studies = client.get("/v1/studies", params={"limit": 2}).json()
    rest = client.get("/v1/studies", params={"after": studies[-1]["study_uid"]}).json()
    assert len(studies) == 2 and len(rest) == 2 and not {s["study_uid"] for s in studies} & {s["study_uid"] for s in rest}
    assert client.get("/v1/studies", params={"after": "not-a-uid"}).status_code == 422
    assert client.get("/v1/studies", params={"after": generate_uid()}).status_code == 422
    assert client.get("/v1/jobs", params={"after": 0}).status_code == 422
    page = client.get("/", params={"limit": 2, "refresh": 0})
    assert page.status_code == 200 and f"after={ids[2]}" in page.text  # the dashboard links the older jobs
    assert f'href="/jobs/{ids[1]}"' not in page.text
    older = client.get("/", params={"limit": 2, "after": ids[2], "refresh": 0}).text
    assert f'href="/jobs/{ids[1]}"' in older and f'href="/jobs/{ids[3]}"' not in older
    monkeypatch.setenv("RADNODE_DATA_DIR", str(tmp_path / "data"))
    done = CliRunner().invoke(cli, ["jobs", "--json", "--after", str(ids[1])])
    assert done.exit_code == 0, done.output
    assert [j["id"] for j in json.loads(done.stdout)] == [ids[0]]
    done = CliRunner().invoke(cli, ["studies", "--json", "--limit", "1", "--after", studies[0]["study_uid"]])
    assert [s["study_uid"] for s in json.loads(done.stdout)] == [studies[1]["study_uid"]]
    engine.dispose()


def _plans(sessionmaker, work) -> dict[str, list[str]]:
    """Run `work(session)` on SQLite and return EXPLAIN QUERY PLAN of every statement it ran."""
    engine = sessionmaker.kw["bind"]
    statements = []

    def grab(conn, cursor, statement, parameters, context, executemany):
        if not executemany and not statement.lstrip().upper().startswith(("PRAGMA", "EXPLAIN")):
            statements.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", grab)
    try:
        with sessionmaker.begin() as s:
            work(s)
    finally:
        event.remove(engine, "before_cursor_execute", grab)
    plans = {}
    with engine.connect() as conn:
        raw = conn.connection.dbapi_connection
        for statement, parameters in statements:
            plans[statement] = [row[3] for row in raw.execute("EXPLAIN QUERY PLAN " + statement, parameters)]
    return plans


BIG = ("study", "series", "instance", "job", "delivery")


def _full_scans(plans: dict[str, list[str]]) -> list[str]:
    """Plan lines that read a whole big table: a SCAN without an index, unless it walks the primary key in the
    order asked and stops at the LIMIT (no sort)."""
    bad = []
    for stmt, lines in plans.items():
        ordered_walk = "ORDER BY" in stmt and "LIMIT" in stmt and not any("TEMP B-TREE FOR ORDER BY" in ln
                                                                             for ln in lines)
        bad += [f"{line}  <-  {stmt[:100]}" for line in lines
                if any(line.startswith(f"SCAN {t}") for t in BIG) and "USING" not in line and not ordered_walk]
    return bad


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_lists_and_passes_that_must_stay_flat_use_indexes(sessionmaker):
    now = utcnow()
    _series(sessionmaker, now - timedelta(days=3))
    _job(sessionmaker, now - timedelta(days=3))
    with sessionmaker() as s:
        after = s.execute(select(Study.study_uid)).scalars().first()

    def lists(s):
        list_jobs(s, limit=100)
        list_jobs(s, limit=100, after=10)
        list_studies(s, limit=100)
        list_studies(s, limit=100, after=after)
        jobs.series_to_route(s)
        jobs.expired_outputs(s, now)

    assert _full_scans(_plans(sessionmaker, lists)) == []
    # the tracker's steady pass (late instances since its previous pass) and the time to its next pass
    from db.records import next_stable_at

    assert _full_scans(_plans(sessionmaker, lambda s: (complete_stable(s, now, 30, now - timedelta(minutes=2)),
                                                         next_stable_at(s, 30)))) == []


def test_migration_0005_upgrades_a_database_with_rows(db_url):
    from db.session import make_engine

    engine = make_engine(db_url)
    upgrade(engine, "0004")
    when = "2025-01-02 03:04:05"
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO study (id, study_uid, state, first_received_at, last_received_at, "
                          "reopened_count) VALUES (1, '1.2.3', 'complete', :t, :t, 0)"), {"t": when})
        conn.execute(text("INSERT INTO series (id, series_uid, study_id, state, instance_count, first_received_at, "
                          "last_received_at, reopened_count) VALUES (1, '1.2.3.4', 1, 'routed', 1, :t, :t, 0)"),
                     {"t": when})
        conn.execute(text("INSERT INTO instance (id, sop_instance_uid, series_id, sop_class_uid, transfer_syntax_uid, "
                          "path, size_bytes, received_at, receive_count) VALUES (1, '1.2.3.4.5', 1, '1.2', '1.2', "
                          "'1.2.3/1.2.3.4/1.2.3.4.5.dcm', 10, :t, 1)"), {"t": when})
    upgrade(engine)
    assert current_revision(engine) >= "0005"
    found = inspect(engine)
    assert "instances_removed_at" in {c["name"] for c in found.get_columns("series")}
    indexes = {i["name"] for t in BIG for i in found.get_indexes(t)}
    assert {"ix_study_first_received", "ix_series_state_completed", "ix_instance_received",
            "ix_job_outputs_removed_updated"} <= indexes
    with engine.connect() as conn:
        assert conn.execute(text("SELECT instances_removed_at, series_uid FROM series")).one() == (None, "1.2.3.4")
        assert conn.execute(text("SELECT count(*) FROM instance")).scalar_one() == 1
    engine.dispose()
