"""Job-table bookkeeping on SQLite and PostgreSQL: idempotent records, completion, reopening, reconcile."""

from __future__ import annotations

from datetime import timedelta

from db.models import utcnow
from db.records import InstanceRecorder, ReceivedInstance, complete_stable, list_studies, record_instance


def rec(sop: str, series: str = "1.2.3.1", study: str = "1.2.3", **kw) -> ReceivedInstance:
    return ReceivedInstance(
        study_uid=study, series_uid=series, sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax_uid="1.2.840.10008.1.2", path=f"{study}/{series}/{sop}.dcm", size_bytes=100,
        calling_ae="CT1", modality="CT", study_description="Chest", **kw,
    )


def test_record_is_idempotent(sessionmaker):
    t0 = utcnow()
    r = InstanceRecorder()
    with sessionmaker.begin() as s:
        assert r.record(s, rec("1.2.3.1.1"), t0) is True
        assert r.record(s, rec("1.2.3.1.2"), t0) is True
    with sessionmaker.begin() as s:
        assert r.record(s, rec("1.2.3.1.1"), t0) is False  # re-sent
        assert record_instance(s, rec("1.2.3.1.2"), t0) is False  # another process, no cache
    with sessionmaker() as s:
        [study] = list_studies(s)
    assert study["study_uid"] == "1.2.3" and study["study_description"] == "Chest"
    [series] = study["series"]
    assert (series["instances"], series["state"], series["modality"], series["calling_ae"]) == (2, "receiving", "CT", "CT1")


def test_completion_waits_for_the_window_and_all_series(sessionmaker):
    t0 = utcnow()
    with sessionmaker.begin() as s:
        record_instance(s, rec("1.2.3.1.1"), t0)
        record_instance(s, rec("1.2.3.2.1", series="1.2.3.2"), t0 + timedelta(seconds=5))
    with sessionmaker.begin() as s:
        assert complete_stable(s, t0 + timedelta(seconds=1), 2) == ([], [])
    with sessionmaker.begin() as s:
        assert complete_stable(s, t0 + timedelta(seconds=3), 2) == (["1.2.3.1"], [])  # study waits for 1.2.3.2
    with sessionmaker.begin() as s:
        assert complete_stable(s, t0 + timedelta(seconds=8), 2) == (["1.2.3.2"], ["1.2.3"])
    with sessionmaker() as s:
        [study] = list_studies(s)
    assert study["state"] == "complete" and [x["instances"] for x in study["series"]] == [1, 1]


def test_late_instance_and_new_series_reopen(sessionmaker):
    t0 = utcnow()
    with sessionmaker.begin() as s:
        record_instance(s, rec("1.2.3.1.1"), t0)
    with sessionmaker.begin() as s:
        complete_stable(s, t0 + timedelta(seconds=3), 2)
    with sessionmaker.begin() as s:  # a late instance for the completed series
        record_instance(s, rec("1.2.3.1.2"), t0 + timedelta(seconds=4))
    with sessionmaker.begin() as s:
        assert complete_stable(s, t0 + timedelta(seconds=5), 2) == ([], [])
    with sessionmaker() as s:
        [study] = list_studies(s)
    assert study["state"] == "receiving" and study["reopened_count"] == 1
    assert study["series"][0]["state"] == "receiving" and study["series"][0]["reopened_count"] == 1
    with sessionmaker.begin() as s:
        assert complete_stable(s, t0 + timedelta(seconds=7), 2) == (["1.2.3.1"], ["1.2.3"])
    with sessionmaker.begin() as s:  # a new series for the completed study reopens the study
        record_instance(s, rec("1.2.3.9.1", series="1.2.3.9"), t0 + timedelta(seconds=8))
    with sessionmaker.begin() as s:
        complete_stable(s, t0 + timedelta(seconds=9), 2)
    with sessionmaker() as s:
        [study] = list_studies(s)
    assert study["state"] == "receiving" and study["reopened_count"] == 2
    assert [x["instances"] for x in study["series"]] == [2, 1]


def test_reconcile_records_orphan_files(sessionmaker, ct_dir, tmp_path):
    from node.dicom.header import read_header
    from node.ingest.storage import InstanceStore
    from node.service import reconcile

    store = InstanceStore(tmp_path / "inst", tmp_path / "tmp")
    files = sorted(ct_dir.glob("*.dcm"))[:3]
    for f in files:  # on disk, as if the node died between the rename and the commit
        data = f.read_bytes()
        store.write(read_header(data), data)
    assert reconcile(store, sessionmaker) == 3
    assert reconcile(store, sessionmaker) == 0
    with sessionmaker() as s:
        [study] = list_studies(s)
    assert study["series"][0]["instances"] == 3


def test_next_stable_at_follows_the_newest_instance_of_the_earliest_series(sessionmaker):
    from datetime import timedelta

    from db.models import utcnow
    from db.records import next_stable_at

    t0 = utcnow() - timedelta(seconds=5)
    with sessionmaker() as s:
        assert next_stable_at(s, 30) is None
    with sessionmaker.begin() as s:
        record_instance(s, rec("1.2.3.1.1", series="1.2.3.1"), t0)
        record_instance(s, rec("1.2.3.1.2", series="1.2.3.1"), t0 + timedelta(seconds=2))
        record_instance(s, rec("1.2.3.2.1", series="1.2.3.2"), t0 + timedelta(seconds=3))
    with sessionmaker() as s:
        due = next_stable_at(s, 30)
    assert abs((due - (t0 + timedelta(seconds=32))).total_seconds()) < 0.01
