"""Storage: UID validation, durable idempotent writes, header parsing, disk-full errors."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from pydicom import dcmread

from node.dicom.header import InvalidUID, UndecodableDataset, is_valid_uid, read_header
from node.ingest.storage import InstanceStore, StorageFull


@pytest.mark.parametrize(
    "uid, ok",
    [
        ("1.2.840.10008.5.1.4.1.1.2", True),
        ("0", True),
        ("1." + "2" * 62, True),
        ("1." + "2" * 63, False),  # 65 characters
        ("", False),
        ("../../x", False),
        ("1.2..3", False),
        (".1.2", False),
        ("1.2.", False),
        ("1.2.3a", False),
        ("1.2/3", False),
        ("1.2.3\x00", False),
        (None, False),
        (123, False),
    ],
)
def test_uid_validation(uid, ok):
    assert is_valid_uid(uid) is ok


@pytest.fixture
def ct_file(ct_dir) -> Path:
    return sorted(ct_dir.glob("*.dcm"))[0]


def test_header_of_a_real_ct(ct_file):
    h = read_header(ct_file.read_bytes())
    assert h.modality == "CT" and h.sop_class_uid == "1.2.840.10008.5.1.4.1.1.2"
    assert h.study_description == "Chest" and h.body_part_examined is None
    assert h.slice_thickness == 5.0
    assert read_header(ct_file) == h


@pytest.mark.parametrize(
    "data, error",
    [
        (b"", UndecodableDataset),
        (b"not dicom at all" * 10, UndecodableDataset),
        (b"\0" * 128 + b"DICM" + b"\xff" * 50, InvalidUID),  # parses, but carries no UIDs
    ],
)
def test_undecodable(data, error):
    with pytest.raises(error):
        read_header(data)


def test_bad_uid_in_header(ct_file, tmp_path):
    ds = dcmread(ct_file)
    ds.StudyInstanceUID = "../../etc"
    out = tmp_path / "x.dcm"
    ds.save_as(out)
    with pytest.raises(InvalidUID, match="StudyInstanceUID"):
        read_header(out.read_bytes())


def test_write_is_atomic_and_idempotent(ct_file, tmp_path):
    store = InstanceStore(tmp_path / "inst", tmp_path / "tmp")
    data = ct_file.read_bytes()
    h = read_header(data)
    rel = store.write(h, data)
    assert rel == f"{h.study_uid}/{h.series_uid}/{h.sop_instance_uid}.dcm"
    assert store.path(rel).read_bytes() == data
    rel2 = store.write(h, data[:-2] + b"\0\0")  # a re-send replaces the file
    assert rel2 == rel and store.path(rel).read_bytes()[-2:] == b"\0\0"
    assert list(store.iter_files()) == [rel]
    assert not list(tmp_path.rglob("*.part"))


def test_reserve_and_enospc_are_storage_full(ct_file, tmp_path, monkeypatch):
    data = ct_file.read_bytes()
    h = read_header(data)
    store = InstanceStore(tmp_path / "inst", tmp_path / "tmp", min_free_bytes=1 << 62)
    with pytest.raises(StorageFull, match="reserve"):
        store.write(h, data)
    store = InstanceStore(tmp_path / "inst", tmp_path / "tmp")
    real_write = os.write

    def full(fd, b):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(StorageFull, match="disk full"):
        store.write(h, data)
    monkeypatch.setattr(os, "write", real_write)
    assert not list(tmp_path.rglob("*.part")), "partial file left behind"
    assert not list(store.iter_files())


def test_clean_tmp(tmp_path):
    store = InstanceStore(tmp_path / "inst", tmp_path / "tmp")
    (tmp_path / "tmp" / "abc.part").write_bytes(b"partial")
    series = tmp_path / "inst" / "1.2.3" / "1.2.3.4"
    series.mkdir(parents=True)
    (series / "1.2.3.4.5.dcm.0123456789abcdef.part").write_bytes(b"partial")  # beside the instances
    (series / "1.2.3.4.6.dcm").write_bytes(b"kept")
    assert store.clean_tmp() == 2 and not list((tmp_path / "tmp").iterdir())
    assert [p.name for p in series.iterdir()] == ["1.2.3.4.6.dcm"]


@pytest.mark.parametrize("sop_instance", ["1.2.3.4", "1.2.3.45", "2.25." + "9" * 59])
@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.90"])
def test_file_meta_prefix_is_what_pynetdicom_and_pydicom_write(sop_instance: str, syntax: str):
    """The receiver stores a data set behind `file_meta_prefix`: the same bytes as
    `event.encoded_dataset(include_meta=True)` puts before it, for odd and even UID lengths."""
    from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
    from pynetdicom.dsutils import create_file_meta, encode_file_meta

    from node.dicom.files import file_meta_prefix

    ct = "1.2.840.10008.5.1.4.1.1.2"
    expected = b"\0" * 128 + b"DICM" + encode_file_meta(
        create_file_meta(sop_class_uid=ct, sop_instance_uid=sop_instance, transfer_syntax=syntax))
    ours = file_meta_prefix(ct, sop_instance, syntax, PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION)
    assert ours == expected
    assert file_meta_prefix(ct, sop_instance, syntax, "1.2.3", "ODD") != expected  # the values are in it
