"""Feedback: verdicts by API on a running node (history kept, validation, auth, export as CSV/JSON by API and
CLI) on SQLite and PostgreSQL; in Chromium, the job page's review buttons (db.review.decide) and feedback forms."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from sqlalchemy import select

from db.models import Delivery, Job, JobState, Series, Study, utcnow
from db.session import make_engine, make_sessionmaker
from tests.conftest import NodeProcess, need

PNEUMONIA = {"value": "233604007", "scheme": "SCT", "meaning": "Pneumonia"}
EFFUSION = {"value": "60046008", "scheme": "SCT", "meaning": "Pleural effusion"}
FINDINGS = {"not_applicable": None, "summary": "pneumonia", "warnings": [], "heatmaps": [],
            "classifications": [{"concept": PNEUMONIA, "probability": 0.91, "threshold": 0.5, "positive": True},
                                {"concept": EFFUSION, "probability": 0.12, "threshold": 0.5, "positive": False}],
            "measurements": [], "segmentations": [{"segment": "lung", "voxels": 1234}]}
STUDY = "1.2.826.0.1.3680043.8.498.777"


def add_job(db_url: str, number: int, state: str = JobState.ENCODED, findings: dict | None = FINDINGS,
            plugin: str = "chest-ai", **values) -> int:
    """One job on its own series of STUDY, written straight into the node's job table; returns its id."""
    engine = make_engine(db_url)
    try:
        with make_sessionmaker(engine).begin() as s:
            now = utcnow()
            study = s.scalar(select(Study).where(Study.study_uid == STUDY))
            if study is None:
                study = Study(study_uid=STUDY, first_received_at=now, last_received_at=now)
                s.add(study)
                s.flush()
            series = Series(series_uid=f"{STUDY}.{number}", study_id=study.id, first_received_at=now,
                            last_received_at=now, modality="CT")
            s.add(series)
            s.flush()
            job = Job(series_id=series.id, plugin=plugin, plugin_version="1.2", queue="cpu", state=state,
                      findings=findings, created_at=now, updated_at=now, **values)
            s.add(job)
            s.flush()
            return job.id
    finally:
        engine.dispose()


def test_feedback_by_api_keeps_history_validates_and_exports(node: NodeProcess, db_url: str, tmp_path: Path):
    job = add_job(db_url, 1)
    queued = add_job(db_url, 2, state=JobState.QUEUED, findings=None)
    url = f"/v1/jobs/{job}/feedback"
    agree = {"target_kind": "finding", "target": "SCT:233604007", "verdict": "agree"}

    assert node.api("POST", url, token=None, json=agree).status_code == 401
    assert node.api("POST", url, token="rn_not_a_token", json=agree).status_code == 401
    assert node.api("GET", url, token=None).status_code == 401
    r = node.api("POST", "/v1/jobs/99999/feedback", json=agree)
    assert r.status_code == 404 and r.json()["detail"] == "no job 99999"
    for body, message in (
        (agree | {"target": "SCT:999"}, "the job's findings have no finding 'SCT:999'; known: SCT:233604007, "
                                        "SCT:60046008"),
        (agree | {"verdict": "accept"}, "verdict on a finding must be one of agree, disagree, got 'accept'"),
        ({"target_kind": "segment", "target": "liver", "verdict": "edited"}, "the job's findings have no segment "
                                                                              "'liver'; known: lung"),
        ({"target_kind": "result", "target": "x", "verdict": "agree"},
         'the target of a result verdict is "" (the whole result)'),
    ):
        r = node.api("POST", url, json=body)
        assert (r.status_code, r.json()["detail"]) == (422, message), r.text
    for body in (agree | {"verdict": "maybe"}, agree | {"target_kind": "study"}, agree | {"reader": "someone"},
                 agree | {"comment": "nul \x00 here"}):
        r = node.api("POST", url, json=body)
        assert r.status_code == 422, r.text
    r = node.api("POST", f"/v1/jobs/{queued}/feedback", json={"target_kind": "result", "verdict": "agree"})
    assert (r.status_code, r.json()["detail"]) == (422, "the job has no results to give feedback on")
    assert node.api("GET", url).json() == []  # nothing stored by the refused ones

    first = node.api("POST", url, json=agree)
    assert first.status_code == 201, first.text
    second = node.api("POST", url, json=agree | {"verdict": "disagree", "comment": " consolidation is atelectasis "})
    seg = node.api("POST", url, json={"target_kind": "segment", "target": "lung", "verdict": "edited"})
    whole = node.api("POST", url, json={"target_kind": "result", "verdict": "agree"})
    assert [x.status_code for x in (second, seg, whole)] == [201] * 3
    assert first.json() | {"id": 0, "created_at": ""} == {
        "id": 0, "job_id": job, "reader": "test", "target_kind": "finding", "target": "SCT:233604007",
        "verdict": "agree", "comment": None, "created_at": ""}
    assert second.json()["comment"] == "consolidation is atelectasis"
    history = node.api("GET", url).json()
    assert [(h["target"], h["verdict"]) for h in history] == [
        ("SCT:233604007", "agree"), ("SCT:233604007", "disagree"), ("lung", "edited"), ("", "agree")]
    assert node.api("GET", "/v1/jobs/99999/feedback").status_code == 404

    r = node.api("GET", "/v1/feedback/export?format=csv")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert [(x["target"], x["verdict"], x["probability"], x["positive"]) for x in rows[:2]] == [
        ("SCT:233604007", "agree", "0.91", "True"), ("SCT:233604007", "disagree", "0.91", "True")]
    assert rows[2]["voxels"] == "1234" and rows[3]["target_kind"] == "result"
    assert {(x["plugin"], x["plugin_version"], x["study_uid"], x["series_uid"], x["rollout"]) for x in rows} == {
        ("chest-ai", "1.2", STUDY, f"{STUDY}.1", "live")}
    assert json.loads(rows[0]["findings"]) == FINDINGS
    assert not {"patient_name", "patient_id", "PatientName", "PatientID"} & set(rows[0])
    exported = node.api("GET", "/v1/feedback/export?format=json").json()
    assert [x["id"] for x in exported] == [h["id"] for h in history]
    assert exported[1]["subject"] == {"meaning": "Pneumonia", "probability": 0.91, "threshold": 0.5, "positive": True}
    assert node.api("GET", "/v1/feedback/export?plugin=other").text.strip().count("\n") == 0  # the header only
    assert node.api("GET", "/v1/feedback/export?format=json&since=2999-01-01T00:00:00Z").json() == []
    assert node.api("GET", "/v1/feedback/export?since=2020-01-01T00:00:00").status_code == 422
    assert node.api("GET", "/v1/feedback/export?format=xml").status_code == 422
    assert node.api("GET", "/v1/feedback/export", token=None).status_code == 401

    out = tmp_path / "feedback.csv"
    done = node.cli("feedback", "export", "--format", "csv", "--plugin", "chest-ai", "-o", str(out))
    assert list(csv.DictReader(out.open())) == rows and str(out) in done.stderr + done.stdout
    assert json.loads(node.cli("feedback", "export", "--format", "json").stdout) == exported
    assert json.loads(node.cli("feedback", "export", "--format", "json", "--since", "2999-01-01").stdout) == []
    bad = node.cli("feedback", "export", "--format", "xml", check=False)
    assert bad.returncode == 2 and "xml" in bad.stderr

    agreement = node.api("GET", "/v1/monitoring").json()["plugins"][0]["agreement"]
    # the latest verdict of reader "test" on the positive finding is "disagree": a false positive
    assert agreement["SCT:233604007"] | {"agreement": 0} == {
        "meaning": "Pneumonia", "verdicts": 1, "agreement": 0, "tp": 0, "fp": 1, "tn": 0, "fn": 0,
        "sensitivity": None, "specificity": 0.0}
    assert agreement["segment:lung"]["agreement"] == 0.0 and agreement["result"]["agreement"] == 1.0


CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


@pytest.mark.slow
def test_browser_review_buttons_and_feedback_forms(tmp_path: Path, monkeypatch):
    need(CHROMIUM.exists() and CHROMEDRIVER.exists(), "chromium and chromedriver are needed")
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.test_dashboard import chromium

    monkeypatch.setenv("SE_OFFLINE", "true")
    db_url = f"sqlite:///{tmp_path / 'radnode.db'}"
    node = NodeProcess(tmp_path / "data", db_url)
    try:
        node.start()
        pending = dict(rollout="review", review_state="pending")
        accept_me, reject_me = add_job(db_url, 1, **pending), add_job(db_url, 2, **pending)
        live = add_job(db_url, 3)
        engine = make_engine(db_url)
        maker = make_sessionmaker(engine)
        with maker.begin() as s:  # a held delivery (not due) to a destination this node does not have
            s.add(Delivery(job_id=reject_me, destination="pacs", created_at=utcnow(), updated_at=utcnow()))
        driver = chromium()
        try:
            wait = WebDriverWait(driver, 30, ignored_exceptions=[StaleElementReferenceException])
            driver.get(f"{node.url}/login?next=/jobs/{accept_me}")
            driver.find_element(By.ID, "token").send_keys(node.token)
            driver.find_element(By.CSS_SELECTOR, "section.login button[type=submit]").click()
            form = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "form.review"))
            form.find_element(By.NAME, "note").send_keys("looks right")
            form.find_element(By.CSS_SELECTOR, "button.accept").click()
            flash = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".flash.ok"))
            assert f"job {accept_me} accepted" in flash.text
            state = driver.find_element(By.CSS_SELECTOR, "p.review-state").text
            assert "accepted" in state and "test" in state and "looks right" in state
            assert not driver.find_elements(By.CSS_SELECTOR, "form.review")

            # feedback on the positive finding with a comment, then on the segment
            row = driver.find_element(By.XPATH, "//table[@class='feedback-form']//tr[td[contains(., 'Pneumonia')]]")
            row.find_element(By.NAME, "comment").send_keys("small consolidation")
            row.find_element(By.CSS_SELECTOR, "button.verdict-disagree").click()
            # until the next page is there, the previous page's flash (the acceptance) is still found
            wait.until(lambda d: "disagree on finding SCT:233604007 recorded"
                       in d.find_element(By.CSS_SELECTOR, ".flash.ok").text)
            row = driver.find_element(By.XPATH, "//table[@class='feedback-form']//tr[td[contains(., 'segment lung')]]")
            row.find_element(By.CSS_SELECTOR, "button.verdict-edited").click()
            wait.until(lambda d: "edited on segment lung recorded" in d.find_element(By.CSS_SELECTOR, ".flash.ok").text)
            history = [[td.text for td in tr.find_elements(By.TAG_NAME, "td")]
                       for tr in driver.find_elements(By.CSS_SELECTOR, "table.feedback-history tbody tr")]
            assert [h[1:] for h in history] == [["test", "segment lung", "edited", ""],
                                                ["test", "finding SCT:233604007", "disagree", "small consolidation"]]

            driver.get(f"{node.url}/jobs/{reject_me}")
            wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "form.review button.reject")).click()
            wait.until(lambda d: f"job {reject_me} rejected" in d.find_element(By.CSS_SELECTOR, ".flash.ok").text)
            driver.get(f"{node.url}/jobs/{live}")
            wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "table.feedback-form"))
            assert not driver.find_elements(By.CSS_SELECTOR, "form.review")  # a live job has no review
        finally:
            driver.quit()
        with maker() as s:
            jobs = {j.id: j for j in s.scalars(select(Job))}
            assert (jobs[accept_me].review_state, jobs[accept_me].reviewed_by, jobs[accept_me].review_note) == (
                "accepted", "test", "looks right")
            assert (jobs[reject_me].review_state, jobs[reject_me].reviewed_by) == ("rejected", "test")
            assert s.scalars(select(Delivery).where(Delivery.job_id == reject_me)).all() == []  # never sent
        engine.dispose()
        assert [f["verdict"] for f in node.api("GET", f"/v1/jobs/{accept_me}/feedback").json()] == ["disagree",
                                                                                                     "edited"]
        # a decided job, or one in live mode, is not reviewed again; the form says why
        r = node.api("POST", f"/ui/jobs/{accept_me}/review", data={"decision": "reject", "next": "/"},
                     follow_redirects=False)
        assert r.status_code == 303 and "not+waiting+for+a+review" in r.headers["location"]
        r = node.api("POST", f"/ui/jobs/{live}/review", data={"decision": "maybe"}, follow_redirects=False)
        assert "decision+must+be+accept+or+reject" in r.headers["location"]
        r = node.api("POST", f"/ui/jobs/{live}/review", token=None, data={"decision": "accept"})
        assert r.status_code == 401
        form = {"target_kind": "result", "target": "", "verdict": "agree", "next": f"/jobs/{live}"}
        r = node.api("POST", f"/ui/jobs/{live}/feedback", data=form, headers={"Origin": "http://evil.example"})
        assert r.status_code == 403 and "cross-site" in r.text
        r = node.api("POST", f"/ui/jobs/{live}/feedback", data=form | {"verdict": "edited"}, follow_redirects=False)
        assert "verdict+on+a+result+must+be+one+of+agree%2C+disagree" in r.headers["location"]
        r = node.api("GET", "/monitoring", token=None, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/login?next=%2Fmonitoring"
        assert node.api("GET", f"/v1/jobs/{live}/feedback").json() == []
    finally:
        node.stop()
