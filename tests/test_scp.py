"""The receiving node end to end: real associations (pynetdicom and DCMTK storescu) to `radnode run`,
on SQLite and on PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.filereader import read_preamble
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from node.dicom.files import iter_dicom_files
from node.dispatch.scu import AssociationFailed, echo, send
from tests.conftest import have, need

IMAGE_FOLDERS = [
    "ct_chest_philips_lungdx_a0001",
    "cxr_nema_wg04_rg1",
    "cxr_nih_google_dicom",
    "robustness_pydicom",
    "seg_sr_dcmqi",
    "seg_sr_highdicom",
    "ts_conformance_dcm_qa_ts",
    "us_samples_pydicom",
]


def body_after_meta(raw: bytes) -> bytes:
    """The encoded dataset after the preamble and file meta group (what travels in C-STORE)."""
    fp = BytesIO(raw)
    read_preamble(fp, force=False)
    from pydicom.filereader import _read_file_meta_info

    _read_file_meta_info(fp)
    return raw[fp.tell() :]


def stored_files(node) -> dict[str, Path]:
    """SOP Instance UID -> stored file, for everything under the node's instance store."""
    return {p.stem: p for p in (node.data_dir / "instances").glob("*/*/*.dcm")}


def instance_uids(node) -> set[str]:
    from sqlalchemy import select

    from db.models import Instance
    from db.session import make_engine

    engine = make_engine(node.env["RADNODE_DATABASE_URL"])
    try:
        with engine.connect() as conn:
            return set(conn.execute(select(Instance.sop_instance_uid)).scalars())
    finally:
        engine.dispose()


def check_stored(node, sent: dict[str, Path]) -> None:
    """Every acknowledged instance is on disk byte-identical (after file meta) and has its row."""
    files = stored_files(node)
    rows = instance_uids(node)
    for uid, source in sent.items():
        assert uid in files, f"{source.name} acknowledged but not on disk"
        assert uid in rows, f"{source.name} acknowledged but has no row"
        assert body_after_meta(files[uid].read_bytes()) == body_after_meta(source.read_bytes()), source.name


def test_echo_pynetdicom_and_cli(node):
    assert echo("127.0.0.1", node.port, node.ae_title, "TESTSCU") == 0
    out = node.cli("echo", "127.0.0.1", str(node.port), "--aec", node.ae_title)
    assert "status 0x0000" in out.stdout


def test_every_shared_folder_with_pynetdicom(node, data_root):
    """Send every image folder; accepted instances are byte-identical, broken ones get a status."""
    sent: dict[str, Path] = {}
    failures: list[tuple[str, str]] = []
    for folder in IMAGE_FOLDERS:
        files = list(iter_dicom_files([data_root / folder]))
        assert files, folder
        acked: list[Path] = []

        report = send(
            files, "127.0.0.1", node.port, node.ae_title, "TESTSCU",
            progress=lambda f, code, acked=acked: acked.append(f) if code == 0 else None,
        )
        failures += report.failed
        for f in acked:
            sent[str(dcmread(f, stop_before_pixels=True).SOPInstanceUID)] = f  # last copy of a UID wins
    check_stored(node, sent)
    assert len(sent) > 100
    # deliberately broken files are refused with a status, never a crash; the node keeps serving
    assert all("status 0x" in why or "context" in why for _, why in failures), failures
    assert echo("127.0.0.1", node.port, node.ae_title, "TESTSCU") == 0


def test_every_shared_folder_with_storescu(node, data_root, tmp_path):
    """DCMTK storescu re-encodes what it sends, so the reference for "what was sent" is DCMTK's own
    storescp in bit-preserving mode (+B) receiving the same files: radnode must store the same bytes."""
    need(have("storescu") and have("storescp"), "DCMTK (storescu, storescp) not installed")
    from tests.conftest import free_port

    env = {**os.environ, "TCP_NODELAY": "1"}
    ref_dir, ref_port = tmp_path / "storescp", free_port()
    ref_dir.mkdir()
    ref = subprocess.Popen(["storescp", "+B", "+xa", "-od", str(ref_dir), str(ref_port)], env=env)
    try:
        time.sleep(0.5)
        for folder in IMAGE_FOLDERS:
            files = [str(f) for f in iter_dicom_files([data_root / folder])]
            for port, aec in ((node.port, node.ae_title), (ref_port, "STORESCP")):
                # -nh: do not halt on an unsuccessful store
                res = subprocess.run(
                    ["storescu", "-nh", "-aec", aec, "-aet", "STORESCU", "127.0.0.1", str(port), *files],
                    env=env, capture_output=True, text=True, timeout=300,
                )
                assert "Association Request Failed" not in res.stderr, res.stderr
    finally:
        ref.terminate()
        ref.wait(timeout=10)
    reference = {}
    for f in ref_dir.iterdir():
        reference[str(dcmread(f, stop_before_pixels=True, force=True).SOPInstanceUID)] = f
    ours = stored_files(node)
    assert len(ours) > 100
    # what storescp kept, radnode kept; byte for byte where both negotiated the same transfer syntax
    # (storescu offers several and each acceptor may pick another), else element for element
    # a UID carried by two different source files (e.g. MR_small_bigendian and MR_truncated) is
    # ambiguous: the two acceptors may have refused different copies
    seen: dict[str, int] = {}
    for folder in IMAGE_FOLDERS:
        for f in iter_dicom_files([data_root / folder]):
            try:
                uid = str(dcmread(f, stop_before_pixels=True, force=True).SOPInstanceUID)
            except Exception:
                continue
            seen[uid] = seen.get(uid, 0) + 1
    same_ts = {}
    for uid, ref_file in reference.items():
        if seen.get(uid, 0) > 1:
            continue
        assert uid in ours, f"{ref_file.name} stored by storescp but not by radnode"
        a, b = dcmread(ours[uid]), dcmread(ref_file)
        if a.file_meta.TransferSyntaxUID == b.file_meta.TransferSyntaxUID:
            same_ts[uid] = ref_file
        else:  # same elements; pixel data compared decoded (one side may be compressed)
            pa, pb = a.pop("PixelData", None), b.pop("PixelData", None)
            for ds in (a, b):  # group lengths depend on the encoding
                for tag in [t for t in ds.keys() if t.element == 0]:
                    del ds[tag]
            assert a == b, ref_file.name
            assert (pa is None) == (pb is None), ref_file.name
    assert len(same_ts) >= 10 and len(reference) > 100
    check_stored(node, same_ts)
    assert echo("127.0.0.1", node.port, node.ae_title, "TESTSCU") == 0


def test_parallel_associations_one_complete_series(node, ct_dir):
    """4 storescu associations at once with the 64-slice CT: 64 rows, 64 files, one study, one series, and not
    one ERROR line in the node's log (the receivers' threads once raced to create the metric families)."""
    need(have("storescu"), "DCMTK storescu not installed")
    files = sorted(str(p) for p in ct_dir.glob("*.dcm"))
    env = {**os.environ, "TCP_NODELAY": "1"}
    procs = [
        subprocess.Popen(["storescu", "-aec", node.ae_title, "127.0.0.1", str(node.port), *files[i::4]], env=env)
        for i in range(4)
    ]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0, 0]
    files_on_disk = stored_files(node)
    assert len(files_on_disk) == 64
    studies = node.studies()
    assert len(studies) == 1 and len(studies[0]["series"]) == 1
    series = node.wait_series_state(studies[0]["series"][0]["series_uid"], "complete")
    assert series["instances"] == 64 and series["modality"] == "CT"
    assert node.studies()[0]["state"] in {"complete", "routed"}  # routed: the study-level rules had their say
    errors = [line for line in node.logs().splitlines() if " ERROR " in line or "Traceback" in line]
    assert not errors, "\n".join(errors[:10])


def _ct_copy(src: Path, dst: Path, **changes) -> Path:
    ds = dcmread(src)
    for k, v in changes.items():
        setattr(ds, k, v)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(dst, enforce_file_format=True)
    return dst


def test_duplicate_is_idempotent_and_late_instance_reopens(node, ct_dir, tmp_path):
    files = sorted(ct_dir.glob("*.dcm"))[:3]
    assert send(files, "127.0.0.1", node.port, node.ae_title).sent == 3
    series_uid = str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    node.wait_series_state(series_uid, "complete")
    # the same instances again: still 3 rows, and the series reopens then completes again
    assert send(files, "127.0.0.1", node.port, node.ae_title).sent == 3
    assert len(instance_uids(node)) == 3
    late = _ct_copy(sorted(ct_dir.glob("*.dcm"))[3], tmp_path / "late.dcm")
    assert send([late], "127.0.0.1", node.port, node.ae_title).sent == 1
    series = node.wait_series_state(series_uid, "complete")
    assert series["instances"] == 4
    assert series["reopened_count"] >= 1
    assert node.studies()[0]["reopened_count"] >= 1


def test_invalid_uid_rejected_nothing_outside(node, ct_dir, tmp_path):
    """A traversal 'UID' never reaches a path: refused with a status, nothing written anywhere."""
    bad = _ct_copy(sorted(ct_dir.glob("*.dcm"))[0], tmp_path / "bad.dcm", SeriesInstanceUID="../../x")
    before = set(tmp_path.rglob("*"))
    report = send([bad], "127.0.0.1", node.port, node.ae_title)
    assert report.sent == 0 and "0xC211" in report.failed[0][1]
    after = {p for p in set(tmp_path.rglob("*")) - before if "node-" not in p.name and not p.name.endswith(("-wal", "-shm"))}
    assert not [p for p in after if p.suffix == ".dcm" or p.name == "x"], after
    assert not stored_files(node)
    # a bad SOP Instance UID too (sent with a matching, equally bad, request UID)
    bad2 = _ct_copy(sorted(ct_dir.glob("*.dcm"))[0], tmp_path / "bad2.dcm", SOPInstanceUID="1.2.3.abc")
    report = send([bad2], "127.0.0.1", node.port, node.ae_title)
    assert report.sent == 0
    assert not stored_files(node)
    assert echo("127.0.0.1", node.port, node.ae_title) == 0


def test_instance_over_size_limit(start_node, ct_dir):
    node = start_node(max_instance_bytes="100000")
    report = send(sorted(ct_dir.glob("*.dcm"))[:1], "127.0.0.1", node.port, node.ae_title)
    assert report.sent == 0 and "0xA701" in report.failed[0][1]
    assert not stored_files(node)


def test_allow_list_rejects_unknown_calling_ae(start_node, ct_dir):
    node = start_node(allowed_aes="MODALITY1, PACS")
    with pytest.raises(AssociationFailed, match="rejected"):
        echo("127.0.0.1", node.port, node.ae_title, "INTRUDER")
    assert echo("127.0.0.1", node.port, node.ae_title, "PACS") == 0
    assert send(sorted(ct_dir.glob("*.dcm"))[:1], "127.0.0.1", node.port, node.ae_title, "MODALITY1").sent == 1


def _make_pki(tmp: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all made here."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def key():
        return ec.generate_private_key(ec.SECP256R1())

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = key()
    ca = (
        x509.CertificateBuilder().subject_name(name("radnode test CA")).issuer_name(name("radnode test CA"))
        .public_key(ca_key.public_key()).serial_number(1).not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    out = {"ca": tmp / "ca.pem"}
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for who in ("server", "client"):
        k = key()
        b = (
            x509.CertificateBuilder().subject_name(name(who)).issuer_name(ca.subject).public_key(k.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2))
        )
        if who == "server":
            b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        cert = b.sign(ca_key, hashes.SHA256())
        out[who] = tmp / f"{who}.pem"
        out[who].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        out[f"{who}_key"] = tmp / f"{who}.key"
        out[f"{who}_key"].write_bytes(
            k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
    return out


def test_dicom_tls(start_node, ct_dir, tmp_path):
    import ssl

    from tests.conftest import free_port

    pki = _make_pki(tmp_path)
    tls_port = free_port()
    node = start_node(tls_cert=pki["server"], tls_key=pki["server_key"], tls_ca=pki["ca"], tls_port=str(tls_port))
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca"]))
    ctx.load_cert_chain(str(pki["client"]), str(pki["client_key"]))

    ae = AE(ae_title="TLSSCU")
    ae.add_requested_context(CTImageStorage, dcmread(sorted(ct_dir.glob("*.dcm"))[0]).file_meta.TransferSyntaxUID)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 10
    # plain TCP to the TLS port: no association, and the node is not hurt
    plain = ae.associate("127.0.0.1", tls_port, ae_title=node.ae_title)
    assert not plain.is_established
    # a TLS client without a certificate is refused when a CA is configured
    bare = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca"]))
    assert not ae.associate("127.0.0.1", tls_port, ae_title=node.ae_title, tls_args=(bare, "127.0.0.1")).is_established
    assoc = ae.associate("127.0.0.1", tls_port, ae_title=node.ae_title, tls_args=(ctx, "127.0.0.1"))
    assert assoc.is_established
    f = sorted(ct_dir.glob("*.dcm"))[0]
    status = assoc.send_c_store(f)
    assoc.release()
    assert status.Status == 0
    check_stored(node, {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID): f})


def test_tls_destination_delivers_to_a_tls_node(start_node, ct_dir, tmp_path):
    """dispatch's DICOM destination with TLS: a client certificate the node's CA signed, the peer verified."""
    from node.dispatch.dispatcher import DeliveryError, send_to
    from node.settings import DicomDestination, Settings
    from tests.conftest import free_port

    pki = _make_pki(tmp_path)
    tls_port = free_port()
    node = start_node(tls_cert=pki["server"], tls_key=pki["server_key"], tls_ca=pki["ca"], tls_port=str(tls_port))
    files = sorted(ct_dir.glob("*.dcm"))[:3]
    base = dict(name="pacs", kind="dicom", ae_title=node.ae_title, host="127.0.0.1", port=tls_port, tls=True,
                tls_ca=pki["ca"])
    dest = DicomDestination(**base, tls_cert=pki["client"], tls_key=pki["client_key"])
    assert send_to(dest, files, Settings(ae_title="RADNODE2"), None) == 3
    check_stored(node, {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in files})
    with pytest.raises(DeliveryError, match="failed"):  # no client certificate: refused, an error to retry
        send_to(DicomDestination(**base), files, Settings(), None)
    with pytest.raises(DeliveryError, match="failed"):  # plain TCP to the TLS port
        send_to(DicomDestination(**(base | {"tls": False})), files, Settings(), None)


def test_disk_full_then_recovers(start_node, ct_dir, tmp_path, db_url):
    """A tiny tmpfs as the data dir: 0xA700 when full, never a crash; every instance acknowledged before the
    disk filled stays stored, recorded and readable; accepts again once space returns."""
    need(os.geteuid() == 0, "mounting a tmpfs needs root")
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)], capture_output=True)
    need(res.returncode == 0, f"cannot mount tmpfs: {res.stderr!r}")
    try:
        filler = mnt / "filler"
        filler.write_bytes(b"\0" * (4 * 1024 * 1024 + 512 * 1024))  # room for one or two of the files
        node = start_node(data_dir=mnt / "data", min_free_bytes="0")
        files = sorted(ct_dir.glob("*.dcm"))[:6]  # ~525 kB each
        acked: list[Path] = []
        report = send(files, "127.0.0.1", node.port, node.ae_title,
                      progress=lambda f, code: acked.append(f) if code == 0 else None)
        assert report.failed and all("0xA700" in why for _, why in report.failed), report.failed
        assert 1 <= len(acked) == report.sent < len(files), (len(acked), report.failed)
        # the disk is still full: what was acknowledged before it filled is intact and readable
        check_stored(node, {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in acked})
        for f in acked:
            assert dcmread(stored_files(node)[str(dcmread(f, stop_before_pixels=True).SOPInstanceUID)]).pixel_array.size
        assert not list((mnt / "data").rglob("*.part"))  # refused writes left no partial file
        filler.unlink()  # space returns
        report = send(files, "127.0.0.1", node.port, node.ae_title)
        assert report.sent == 6, report.failed
        check_stored(node, {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in files})
        assert not list((mnt / "data").rglob("*.part"))
        node.stop()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_kill9_during_transfer_keeps_every_acknowledged_instance(start_node, ct_dir, tmp_path):
    """SIGKILL the whole node mid-transfer; after restart every acknowledged instance is there."""
    node = start_node()
    sources = []
    for i in range(3):  # 192 instances with fresh UIDs
        series = generate_uid()
        for f in sorted(ct_dir.glob("*.dcm")):
            sources.append(_ct_copy(f, tmp_path / f"s{i}-{f.name}", SOPInstanceUID=generate_uid(), SeriesInstanceUID=series))
    acked: list[Path] = []
    killed = threading.Event()

    def progress(f: Path, code: int) -> None:
        if code == 0:
            acked.append(f)
        if len(acked) == 40 and not killed.is_set():
            killed.set()
            node.kill9()

    try:
        send(sources, "127.0.0.1", node.port, node.ae_title, progress=progress)
    except AssociationFailed:
        pass
    assert killed.is_set() and 40 <= len(acked) < len(sources)
    node.start()
    check_stored(node, {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in acked})
    for f in list(stored_files(node).values())[:5]:
        assert dcmread(f).pixel_array.shape == (512, 512)  # readable
    assert echo("127.0.0.1", node.port, node.ae_title) == 0


def test_receivers_are_restarted(node, ct_dir):
    import psutil

    children = psutil.Process(node.proc.pid).children()
    assert len(children) >= 2
    children[0].kill()
    time.sleep(3)
    assert len(psutil.Process(node.proc.pid).children()) >= 2
    for _ in range(4):  # every receiver answers
        assert echo("127.0.0.1", node.port, node.ae_title) == 0


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_database_down_is_out_of_resources_then_recovers(start_node, ct_dir, db_url):
    """PostgreSQL refusing connections: 0xA700 (the sender retries), no crash; accepted again after."""
    import psycopg

    from tests.conftest import PG_ADMIN_URL

    node = start_node()
    name = db_url.rsplit("/", 1)[1]
    files = sorted(ct_dir.glob("*.dcm"))[:2]
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
        try:
            report = send(files[:1], "127.0.0.1", node.port, node.ae_title)
            assert report.sent == 0 and "0xA700" in report.failed[0][1], report.failed
        finally:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    report = send(files, "127.0.0.1", node.port, node.ae_title)
    assert report.sent == 2, report.failed
    check_stored(node, {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in files})
