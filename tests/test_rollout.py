"""Roll-out modes end to end with a real Orthanc as the PACS: silent results never leave the node, review results
go exactly when a reader accepts them (clicked on the dashboard in Chromium) and never when rejected, a
review past its deadline follows its rule's policy, and an operator's run-time override needs no restart."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pydicom
import pytest

from node.dispatch.scu import send
from tests.conftest import free_port, need
from tests.orthanc import AE as ORTHANC_AE
from tests.orthanc import Orthanc
from tests.synthetic import write_ct_series
from tests.test_dashboard import CHROMEDRIVER, CHROMIUM
from tests.test_pipeline import embedded_stack

pytestmark = pytest.mark.slow

SR = "1.2.840.10008.5.1.4.1.1.88.34"
RULES = """
rules:
  - name: live
    when: {SeriesDescription: LIVE}
    plugins: [test-flag]
  - name: quiet
    when: {SeriesDescription: SILENT}
    plugins: [test-flag]
    rollout: silent
  - name: checked
    when: {SeriesDescription: REVIEW}
    plugins: [test-flag]
    rollout: review
  - name: checked-briefly
    when: {SeriesDescription: TIMEOUT}
    plugins: [test-flag]
    rollout: review
    review_hours: 0.001
    review_timeout: deliver
"""


def accept_in_browser(node, job_id: int, note: str) -> None:
    """Log in to the dashboard in Chromium, open the job and click Accept with a note."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.test_dashboard import chromium

    driver = chromium()
    try:
        wait = WebDriverWait(driver, 30, ignored_exceptions=[StaleElementReferenceException])
        driver.get(f"{node.url}/login?next=/jobs/{job_id}")
        driver.find_element(By.ID, "token").send_keys(node.token)
        driver.find_element(By.CSS_SELECTOR, "section.login button[type=submit]").click()
        form = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "form.review"))
        form.find_element(By.NAME, "note").send_keys(note)
        form.find_element(By.CSS_SELECTOR, "button.accept").click()
        flash = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".flash.ok"))
        assert f"job {job_id} accepted" in flash.text
    finally:
        driver.quit()


def test_silent_review_and_live(tmp_path: Path, monkeypatch):
    need(CHROMIUM.exists() and CHROMEDRIVER.exists(), "chromium and chromedriver are needed")
    monkeypatch.setenv("SE_OFFLINE", "true")
    port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", port).start()
    try:
        with embedded_stack(tmp_path) as stack:
            dest = [{"name": "pacs", "kind": "dicom", "ae_title": ORTHANC_AE, "host": "127.0.0.1",
                     "port": orthanc.dicom_port}]
            node = stack.start(RULES, dicom_port=str(port), destinations=json.dumps(dest))
            api = httpx.Client(base_url=node.url, headers={"Authorization": f"Bearer {node.token}"}, timeout=30)
            studies: dict[str, str] = {}

            def send_series(description: str, key: str) -> None:
                files = write_ct_series(tmp_path / key, slices=4, size=32, series_description=description)
                studies[key] = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
                assert send(files, "127.0.0.1", node.port, node.ae_title, "CT1").sent == 4

            def srs(key: str) -> int:
                return sum(i["SOPClassUID"] == SR for i in orthanc.study_instances(studies[key]))

            def job(key: str) -> dict:
                [row] = [r for r in stack.jobs() if r["study_uid"] == studies[key]]
                return api.get(f"/v1/jobs/{row['id']}").json()

            for key, description in [("live", "LIVE"), ("silent", "SILENT"), ("accept", "REVIEW"),
                                     ("reject", "REVIEW"), ("timeout", "TIMEOUT")]:
                send_series(description, key)
            stack.wait_jobs(lambda rows: len(rows) == 5 and all(r["state"] in ("encoded", "delivered") for r in rows))
            stack.wait_jobs(lambda rows: {r["state"] for r in rows if r["study_uid"] in
                                          (studies["live"], studies["timeout"])} == {"delivered"})
            time.sleep(2)  # many sweeps: nothing held may leave meanwhile

            assert (job("live")["rollout"], srs("live")) == ("live", 1)
            silent = job("silent")
            assert (silent["state"], silent["rollout"], silent["deliveries"], srs("silent")) == ("encoded", "silent",
                                                                                               [], 0)
            assert silent["findings"]["classifications"] and silent["input_stats"]["slices"] == 4  # kept here
            refused = api.post(f"/v1/jobs/{silent['id']}/redeliver", json={"all": True})
            assert refused.status_code == 409 and "silent mode" in refused.json()["detail"]
            assert api.post(f"/v1/jobs/{silent['id']}/review", json={"accept": True}).status_code == 409

            accept, reject = job("accept"), job("reject")
            for held in (accept, reject):
                assert (held["state"], held["rollout"], held["review_state"]) == ("encoded", "review", "pending")
                assert [d["state"] for d in held["deliveries"]] == ["pending"]
            assert srs("accept") == srs("reject") == 0

            answer = api.post(f"/v1/jobs/{reject['id']}/review", json={"accept": False, "note": "wrong side"})
            assert answer.status_code == 202 and "never be sent" in answer.json()["message"]
            assert api.post(f"/v1/jobs/{reject['id']}/review", json={"accept": True}).status_code == 409
            assert api.post(f"/v1/jobs/{reject['id']}/redeliver", json={"all": True}).status_code == 409
            accept_in_browser(node, accept["id"], "fine")  # a reader clicks Accept on the job page
            stack.wait_jobs(lambda rows: next(r for r in rows if r["id"] == accept["id"])["state"] == "delivered")
            time.sleep(1.5)
            assert (srs("accept"), srs("reject")) == (1, 0)
            rejected = job("reject")
            assert (rejected["review_state"], rejected["reviewed_by"], rejected["review_note"]) == (
                "rejected", "test", "wrong side")
            assert rejected["deliveries"] == [] and rejected["state"] == "encoded"
            accepted = job("accept")
            assert (accepted["review_state"], accepted["reviewed_by"], accepted["state"]) == ("accepted", "test",
                                                                                            "delivered")
            timed_out = job("timeout")
            assert (timed_out["review_state"], timed_out["reviewed_by"], srs("timeout")) == ("expired",
                                                                                           "review timeout", 1)

            # an operator silences the plugin at run time: the next series routed by the live rule stays here
            assert api.put("/v1/rollout/plugin/test-flag", json={"mode": "silent"}).status_code == 200
            assert api.put("/v1/rollout/plugin/nope", json={"mode": "silent"}).status_code == 404
            assert api.put("/v1/rollout/rule/live", json={"mode": "live", "review_hours": 2}).status_code == 422
            assert httpx.put(f"{node.url}/v1/rollout/plugin/test-flag", json={"mode": "live"}).status_code == 401
            listed = node.cli("rollout", "list").stdout
            assert "test-flag" in listed and "silent" in listed
            send_series("LIVE", "override")
            stack.wait_jobs(lambda rows: len(rows) == 6 and all(r["state"] in ("encoded", "delivered") for r in rows))
            time.sleep(1.5)
            assert (job("override")["rollout"], srs("override")) == ("silent", 0)
            assert "override removed" in node.cli("rollout", "set", "plugin", "test-flag", "clear").stdout
            assert api.get("/v1/rollout").json() == {"overrides": [], "pending_reviews": 0}
    finally:
        orthanc.stop()
