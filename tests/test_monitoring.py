"""Monitoring: drift check (PSI, KS) on a job table filled with synthetic jobs (SQLite and PostgreSQL): quiet on an
unchanged last window, warning on exactly the statistics shifted; weekly aggregates and agreement from feedback;
the drift gauges on /metrics; the monitoring page in Chromium; and end to end, CT series sent by C-STORE through
a real node whose last series come with another kernel, slice thickness and HU."""

from __future__ import annotations

import math
import os
import re
import shutil
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml
from sqlalchemy import func, select, update

from db.feedback import add_feedback
from db.models import Feedback, Job, JobState, Series, Study, utcnow
from node.monitor import report
from node.monitor.drift import DriftConfig, check, psi
from node.monitor.stats import confusion, iso_week, weekly
from node.settings import Settings
from tests.conftest import REPO, NodeProcess, need

FINDING = {"value": "233604007", "scheme": "SCT", "meaning": "Pneumonia"}
VOLUME = {"value": "118565006", "scheme": "SCT", "meaning": "Volume"}
EDGES = [-1100.0 + 160.0 * i for i in range(17)]  # 16 bins of 160 HU
SHIFTED = {"kernel", "slice_thickness", "intensity_histogram", "intensity_mean", "positive_rate:SCT:233604007",
           "probability:SCT:233604007"}


def _histogram(mean: float, sd: float = 300.0) -> dict:
    cdf = [0.5 * (1 + math.erf((e - mean) / (sd * math.sqrt(2)))) for e in EDGES]
    return {"edges": EDGES, "counts": [round(100_000 * (b - a)) for a, b in zip(cdf, cdf[1:], strict=False)]}


def synthetic(rng: np.random.Generator, shifted: bool = False) -> tuple[dict, dict]:
    """input_stats and findings of one CT job; `shifted`: 5 mm slices, kernel LUNG, HU +200, positives x3."""
    scanner = rng.random() < 0.7
    mean = rng.normal(-300.0, 30.0) + (200.0 if shifted else 0.0)
    stats = {"manufacturer": "ACME", "model": "Scanner A" if scanner else "Scanner B",
             "station": "CT1" if scanner else "CT2", "modality": "CT",
             "slice_thickness": 5.0 if shifted else (1.0 if rng.random() < 0.7 else 2.5),
             "kernel": "LUNG" if shifted else ("STANDARD" if rng.random() < 0.8 else "BONE"),
             "pixel_spacing": [0.78, 0.78], "slices": 200, "rows": 512, "columns": 512,
             "intensity": {"mean": mean, "std": rng.normal(450.0, 20.0), "p01": -1000.0, "p50": mean, "p99": 900.0},
             "histogram": _histogram(mean)}
    positive = rng.random() < (0.3 if shifted else 0.1)
    probability = rng.uniform(0.82, 0.98) if positive else rng.uniform(0.02, 0.18)
    findings = {"not_applicable": None, "summary": "", "warnings": [], "heatmaps": [],
                "classifications": [{"concept": FINDING, "probability": probability, "threshold": 0.5,
                                     "positive": positive}],
                "measurements": [{"concept": VOLUME, "value": rng.normal(500.0, 50.0), "unit": "mL",
                                  "segment": "lung", "frame": None}],
                "segmentations": [{"segment": "lung", "voxels": 1000}]}
    return stats, findings


def add_jobs(maker, plugin: str, count: int, days: tuple[float, float], now: datetime, seed: int,
             shifted: bool = False) -> list[int]:
    """`count` encoded jobs of `plugin` created evenly between days[0] and days[1] days before `now`."""
    rng = np.random.default_rng(seed)
    ids = []
    with maker.begin() as s:
        study = Study(study_uid=f"1.2.826.0.1.3680043.8.498.{seed}", first_received_at=now, last_received_at=now)
        s.add(study)
        s.flush()
        for i in range(count):
            created = now - timedelta(days=days[0] + (days[1] - days[0]) * i / max(count - 1, 1))
            series = Series(series_uid=f"{study.study_uid}.{i + 1}", study_id=study.id, first_received_at=created,
                            last_received_at=created, modality="CT")
            s.add(series)
            s.flush()
            stats, findings = synthetic(rng, shifted)
            job = Job(series_id=series.id, plugin=plugin, plugin_version="1.0", queue="cpu",
                      state=JobState.ENCODED, findings=findings, input_stats=stats, created_at=created,
                      updated_at=created)
            s.add(job)
            s.flush()
            ids.append(job.id)
    return ids


def settings(**values) -> Settings:
    return Settings(data_dir=Path("/nonexistent"), **values)


def warned(result: dict) -> dict[str, set[str]]:
    return {p["plugin"]: {d["statistic"] for d in p["drift"] if d["warning"]} for p in result["plugins"]}


# --- the drift check on the job table --------------------------------------------------------------------------


def test_drift_quiet_on_unchanged_data_then_warns_on_exactly_the_shifted_statistics(sessionmaker):
    now = utcnow()
    add_jobs(sessionmaker, "chest-ai", 200, (34, 8), now, seed=1)
    add_jobs(sessionmaker, "other-ai", 200, (34, 8), now, seed=2)
    unchanged = add_jobs(sessionmaker, "chest-ai", 60, (6.5, 0.1), now, seed=3)
    add_jobs(sessionmaker, "other-ai", 60, (6.5, 0.1), now, seed=4)
    with sessionmaker() as s:
        quiet = report(s, settings(), now)
    assert quiet["warnings"] == 0 and warned(quiet) == {"chest-ai": set(), "other-ai": set()}, [
        (d["statistic"], d["score"], d["p_value"]) for p in quiet["plugins"] for d in p["drift"]]
    chest = {d["statistic"]: d for d in quiet["plugins"][0]["drift"]}
    assert {"kernel", "model", "station", "slice_thickness", "pixel_spacing", "intensity_histogram", "intensity_mean",
            "intensity_std", "positive_rate:SCT:233604007", "probability:SCT:233604007",
            "measurement:SCT:118565006/lung"} == chest.keys()
    assert (chest["kernel"]["reference_n"], chest["kernel"]["recent_n"]) == (200, 60)
    assert chest["intensity_mean"]["kind"] == "ks" and chest["kernel"]["kind"] == "psi"

    add_jobs(sessionmaker, "chest-ai", 60, (6.4, 0.2), now, seed=5, shifted=True)  # now 60 unchanged + 60 shifted
    with sessionmaker() as s:
        s.execute(update(Job).where(Job.id.in_(unchanged))
                  .values(state=JobState.FAILED))  # failed jobs do not count: the last window is the shifted one
        s.commit()
        shifted = report(s, settings(), now)
    assert warned(shifted) == {"chest-ai": SHIFTED, "other-ai": set()}, [
        (d["statistic"], d["score"], d["p_value"]) for p in shifted["plugins"] for d in p["drift"]]
    chest = {d["statistic"]: d for d in shifted["plugins"][0]["drift"]}
    assert chest["kernel"]["detail"]["labels"] == ["BONE", "LUNG", "STANDARD"]
    assert chest["kernel"]["detail"]["recent"] == [0.0, 1.0, 0.0]
    assert chest["slice_thickness"]["score"] > 2 and chest["intensity_mean"]["p_value"] < 1e-6

    # too few samples: the same shift is reported, without a warning
    with sessionmaker() as s:
        few = report(s, settings(monitoring_min_samples=61), now)
    assert warned(few)["chest-ai"] == set()
    assert all("too few samples (200 reference, 60 recent; 61 needed)" == d["note"]
               for d in few["plugins"][0]["drift"])
    # a pinned reference period: the first half of the old window only; the shift is still seen
    with sessionmaker() as s:
        pinned = report(s, settings(monitoring_reference_from=now - timedelta(days=35),
                                    monitoring_reference_to=now - timedelta(days=20)), now)
    assert pinned["reference"]["pinned"] and 180 < pinned["reference"]["jobs"] < 240  # two plugins, 14 of 26 days
    assert warned(pinned)["chest-ai"] == SHIFTED


def test_weekly_aggregates_and_agreement_from_feedback(sessionmaker):
    now = datetime(2026, 12, 3, 12, tzinfo=UTC)
    ids = add_jobs(sessionmaker, "chest-ai", 14, (13, 0.5), now, seed=7)
    with sessionmaker.begin() as s:
        jobs = {j.id: j.findings["classifications"][0]["positive"] for j in s.scalars(select(Job))}
        pos = [i for i in ids if jobs[i]][:1] or ids[:0]
        neg = [i for i in ids if not jobs[i]]
        verdicts = [(pos[0], "agree")] if pos else []
        verdicts += [(neg[0], "agree"), (neg[1], "agree"), (neg[2], "disagree")]
        for job_id, verdict in verdicts:
            add_feedback(s, job_id, "dr-a", "finding", "SCT:233604007", verdict, None, now)
        # dr-a changes her mind on neg[2]: the latest verdict counts, the history keeps both
        add_feedback(s, neg[2], "dr-a", "finding", "SCT:233604007", "agree", "second look", now)
        add_feedback(s, neg[3], "dr-b", "finding", "SCT:233604007", "disagree", None, now)
        add_feedback(s, ids[0], "dr-b", "segment", "lung", "edited", None, now)
        add_feedback(s, ids[1], "dr-b", "result", "", "agree", None, now)
        assert s.scalar(select(func.count()).select_from(Feedback)) == len(verdicts) + 4
    with sessionmaker() as s:
        result = report(s, settings(monitoring_min_samples=2), now)
    [plugin] = result["plugins"]
    a = plugin["agreement"]
    finding = a["SCT:233604007"]
    assert (finding["tp"], finding["fp"], finding["tn"], finding["fn"]) == (len(pos), 0, 3, 1)
    assert finding["specificity"] == 1.0 and finding["sensitivity"] == pytest.approx(len(pos) / (len(pos) + 1))
    assert finding["agreement"] == pytest.approx((len(pos) + 3) / (len(pos) + 4))
    assert (a["segment:lung"]["verdicts"], a["segment:lung"]["agreement"]) == (1, 0.0)
    assert a["result"]["agreement"] == 1.0
    weeks = plugin["weeks"]
    assert sum(w["series"] for w in weeks) == 14
    assert {w["week"] for w in weeks} == {iso_week(now - timedelta(days=d)) for d in (0.5, 6.5, 13)}
    assert {(w["model"], w["station"]) for w in weeks} <= {("Scanner A", "CT1"), ("Scanner B", "CT2")}
    a_week = weeks[0]
    assert set(a_week["positive_rate"]) == {"SCT:233604007"} and a_week["pixel_spacing"] == pytest.approx(0.78)
    assert set(a_week["measurements"]) == {"SCT:118565006/lung"}


def test_the_statistics_by_hand():
    """PSI, the confusion table and the weeks on rows made by hand."""
    assert psi([0.5, 0.5], [0.5, 0.5]) == 0.0
    assert psi([0.25, 0.75], [0.75, 0.25]) == pytest.approx(0.5 * math.log(3) * 2)
    t0 = datetime(2026, 11, 30, tzinfo=UTC)  # a Monday: week 49

    def row(positive: bool, *verdicts: tuple[str, str]) -> dict:
        return {"id": 1, "plugin": "p", "created_at": t0, "input_stats": None,
                "findings": {"classifications": [{"concept": FINDING, "probability": 0.9 if positive else 0.1,
                                                  "threshold": 0.5, "positive": positive}]},
                "feedback": [{"reader": r, "target_kind": "finding", "target": "SCT:233604007", "verdict": v}
                             for r, v in verdicts]}

    rows = [row(True, ("a", "agree")), row(True, ("a", "disagree")), row(False, ("a", "agree"), ("b", "agree")),
            row(False, ("a", "agree"), ("a", "disagree"))]
    c = confusion(rows)["SCT:233604007"]
    assert (c["tp"], c["fp"], c["tn"], c["fn"]) == (1, 1, 2, 1)
    assert (c["sensitivity"], c["specificity"], c["agreement"]) == (0.5, pytest.approx(2 / 3), 0.6)
    [w] = weekly(rows)
    assert (w["week"], w["series"], w["positive_rate"], w["model"]) == ("2026-W49", 4, {"SCT:233604007": 0.5},
                                                                       "unknown")
    # statistics missing in one window are not compared; a window with too few jobs never warns
    cfg = DriftConfig(min_samples=2)
    assert check(rows[:1], [], cfg) == []
    [d] = check(rows[:1], rows[1:], DriftConfig(min_samples=2))[:1]
    assert d["note"].startswith("too few samples") and not d["warning"]


def test_charts_are_well_formed_svg_with_escaped_labels():
    import xml.etree.ElementTree as ET

    from node.monitor.charts import HEIGHT, bars, lines

    ns = "{http://www.w3.org/2000/svg}"
    svg = ET.fromstring(bars("kernel <b>", ["<script>", "B"], [0.75, 0.25], [0.0, 1.0], warning=True))
    assert svg.find(f"{ns}title").text == "kernel <b>"
    assert [t.text for t in svg.iter(f"{ns}text")][-2:] == ["reference", "last window"]
    rects = [r for r in svg.iter(f"{ns}rect") if float(r.get("height")) > 8]
    assert len(rects) == 3 and {r.get("fill") for r in rects} == {"#9aa5b1", "#dc2626"}  # no bar for 0
    svg = ET.fromstring(lines("mean HU", ["W1", "W2", "W3"], {"mean": [-300.0, None, -100.0]}))
    [line] = svg.iter(f"{ns}polyline")
    ys = [float(p.split(",")[1]) for p in line.get("points").split()]
    assert len(ys) == 2 and all(0 < y < HEIGHT for y in ys) and ys[0] > ys[1]  # -300 drawn below -100
    assert "style=" not in bars("x", ["a"], [1.0], [1.0])  # the page's CSP refuses inline styles


def test_monitoring_settings_are_validated():
    with pytest.raises(ValueError, match="set together"):
        settings(monitoring_reference_from="2026-11-01T00:00:00Z")
    with pytest.raises(ValueError, match="time zone"):
        settings(monitoring_reference_from="2026-11-01T00:00:00", monitoring_reference_to="2026-11-20T00:00:00Z")
    with pytest.raises(ValueError, match="before"):
        settings(monitoring_reference_from="2026-12-01T00:00:00Z", monitoring_reference_to="2026-11-20T00:00:00Z")
    with pytest.raises(ValueError):
        settings(monitoring_ks_alpha=1.5)
    cfg = DriftConfig(window_days=7, reference_days=28)
    now = datetime(2026, 12, 3, tzinfo=UTC)
    assert cfg.windows(now) == ((now - timedelta(days=35), now - timedelta(days=7)), (now - timedelta(days=7), now))


# --- the node: /v1/monitoring, /metrics and the page in Chromium ------------------------------------------------


def _shifted_node_db(tmp_path: Path) -> str:
    from db.migrate import upgrade
    from db.session import make_engine, make_sessionmaker

    url = f"sqlite:///{tmp_path / 'radnode.db'}"
    engine = make_engine(url)
    upgrade(engine)
    maker = make_sessionmaker(engine)
    now = utcnow()
    add_jobs(maker, "chest-ai", 120, (34, 8), now, seed=11)
    add_jobs(maker, "other-ai", 120, (34, 8), now, seed=12)
    ids = add_jobs(maker, "chest-ai", 40, (6.5, 0.1), now, seed=13, shifted=True)
    add_jobs(maker, "other-ai", 40, (6.5, 0.1), now, seed=14)
    with maker.begin() as s:
        for i, job_id in enumerate(ids[:12]):
            add_feedback(s, job_id, "dr-a", "finding", "SCT:233604007", "agree" if i % 4 else "disagree", None, now)
    engine.dispose()
    return url


@pytest.mark.slow
def test_node_reports_drift_on_the_api_metrics_and_the_page(tmp_path: Path, monkeypatch):
    node = NodeProcess(tmp_path / "data", _shifted_node_db(tmp_path))
    try:
        node.start()
        body = node.api("GET", "/v1/monitoring").json()
        assert warned(body) == {"chest-ai": SHIFTED, "other-ai": set()}
        assert node.api("GET", "/v1/monitoring", token=None).status_code == 401
        only = node.api("GET", "/v1/monitoring?plugin=other-ai").json()
        assert [p["plugin"] for p in only["plugins"]] == ["other-ai"]

        metrics = node.api("GET", "/metrics").text
        lines = [line for line in metrics.splitlines() if line.startswith("radnode_drift")]
        print("\n".join(lines))
        assert 'radnode_drift_warning{plugin="chest-ai",statistic="kernel"} 1.0' in lines
        assert 'radnode_drift_warning{plugin="other-ai",statistic="kernel"} 0.0' in lines
        assert any(line.startswith('radnode_drift_score{kind="psi",plugin="chest-ai",statistic="slice_thickness"}')
                   or line.startswith('radnode_drift_score{plugin="chest-ai",statistic="slice_thickness",kind="psi"}')
                   for line in lines), lines
        assert sum(1 for line in lines if line.startswith("radnode_drift_warning") and line.endswith(" 1.0")) == 6
        rules = yaml.safe_load((REPO / "deploy" / "prometheus" / "radnode-alerts.yml").read_text())
        for rule in (r for g in rules["groups"] for r in g["rules"]):
            names = set(re.findall(r"\b(radnode_[a-z_]+)\b", rule["expr"]))
            assert names and all(any(line.startswith(n + "{") for line in lines) for n in names), rule

        from tests.test_dashboard import CHROMEDRIVER, CHROMIUM, chromium

        need(CHROMIUM.exists() and CHROMEDRIVER.exists(), "chromium and chromedriver are needed")
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        monkeypatch.setenv("SE_OFFLINE", "true")
        driver = chromium()
        try:
            wait = WebDriverWait(driver, 30)
            driver.get(f"{node.url}/login?next=/monitoring")
            driver.find_element(By.ID, "token").send_keys(node.token)
            driver.find_element(By.CSS_SELECTOR, "section.login button[type=submit]").click()
            alert = wait.until(lambda d: d.find_element(By.ID, "drift-alert"))
            assert "chest-ai" in alert.text and "slice_thickness" in alert.text and "other-ai" not in alert.text
            rows = driver.find_elements(By.CSS_SELECTOR, "#plugin-chest-ai tr.drift-warning")
            assert {r.find_element(By.TAG_NAME, "td").text for r in rows} == SHIFTED
            assert not driver.find_elements(By.CSS_SELECTOR, "#plugin-other-ai tr.drift-warning")
            assert len(driver.find_elements(By.CSS_SELECTOR, "#plugin-chest-ai svg.chart")) >= 6
            driver.find_element(By.LINK_TEXT, "Monitoring")  # in every page's header
            driver.set_window_size(1400, 2400)
            shot = tmp_path / "monitoring.png"
            assert driver.save_screenshot(str(shot))
            if os.environ.get("RADNODE_SCREENSHOT_DIR"):
                shutil.copy(shot, Path(os.environ["RADNODE_SCREENSHOT_DIR"]) / "monitoring.png")
        finally:
            driver.quit()
    finally:
        node.stop()


# --- end to end: CT series by C-STORE, input statistics from the worker ----------------------------------------

FLAG_RULES = "rules:\n  - name: ct-flag\n    when: {Modality: CT}\n    plugins: [test-flag]\n"


def _series(folder: Path, kernel: str = "STANDARD", thickness: float = 2.5, hu_shift: float = 0.0) -> list[Path]:
    """A synthetic chest CT (12 slices of 64 x 64) with this kernel, slice thickness and HU shift."""
    from tests.synthetic import write_ct_series

    files = write_ct_series(folder, kind="chest", slices=12, size=64, spacing=thickness)
    for path in files:
        ds = pydicom.dcmread(path)
        ds.ConvolutionKernel = kernel
        ds.RescaleIntercept = float(ds.RescaleIntercept) + hu_shift  # every HU moves by hu_shift
        ds.save_as(path)
    return files


@pytest.mark.slow
def test_ct_resent_with_another_kernel_thickness_and_hu_fires_the_drift_warning(tmp_path: Path):
    from node.dispatch.scu import send
    from tests.test_pipeline import embedded_stack

    def send_three(name: str, **changes) -> None:
        for k in range(3):
            files = _series(tmp_path / f"{name}-{k}", **changes)
            assert send(files, "127.0.0.1", stack.node.port, stack.node.ae_title, "CT1").sent == len(files)
        stack.wait_jobs(lambda rows: len(rows) == expected and all(r["state"] in {"encoded", "delivered", "failed",
                                                                                  "skipped"} for r in rows))

    def backdate() -> None:
        with stack.maker.begin() as s:
            for job in s.scalars(select(Job).where(Job.created_at > utcnow() - timedelta(days=1))):
                job.created_at = job.created_at - timedelta(days=10)

    with embedded_stack(tmp_path) as stack:
        stack.start(FLAG_RULES, stable_seconds="1", monitoring_min_samples="3")
        t0 = time.monotonic()
        expected = 3
        send_three("reference")
        rows = stack.jobs()
        assert {r["state"] for r in rows} == {"encoded"}, rows
        with stack.maker() as s:
            stats = [j.input_stats for j in s.scalars(select(Job))]
        assert all(st and st["kernel"] == "STANDARD" and st["slice_thickness"] == 2.5 for st in stats), stats
        backdate()
        expected = 6
        send_three("unchanged")
        quiet = stack.node.api("GET", "/v1/monitoring").json()
        assert quiet["window"]["jobs"] == 3 and quiet["reference"]["jobs"] == 3
        assert warned(quiet) == {"test-flag": set()}, quiet["plugins"][0]["drift"]
        backdate()  # the unchanged ones join the reference
        expected = 9
        send_three("changed", kernel="LUNG", thickness=5.0, hu_shift=200.0)
        loud = stack.node.api("GET", "/v1/monitoring").json()
        assert loud["window"]["jobs"] == 3 and loud["reference"]["jobs"] == 6
        assert warned(loud) == {"test-flag": {"kernel", "slice_thickness", "intensity_histogram"}}, [
            (d["statistic"], d["score"], d["p_value"]) for d in loud["plugins"][0]["drift"]]
        lines = [line for line in stack.node.api("GET", "/metrics").text.splitlines()
                 if line.startswith("radnode_drift_warning") and line.endswith(" 1.0")]
        assert len(lines) == 3 and all('plugin="test-flag"' in line for line in lines), lines
        print(f"end to end in {time.monotonic() - t0:.1f} s")
