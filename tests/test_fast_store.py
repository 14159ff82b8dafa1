"""The receivers' C-STORE fast path (node/ingest/pdata.py, scp._FastStores): its PDU reading and response
encoding against pynetdicom's own, and a real listener (in this process, real sockets, real SQLite) that
stores plain C-STOREs by the fast path and leaves every other message, and anything out of order, to
pynetdicom, answered as before."""

from __future__ import annotations

import io
import socket
import struct
import threading
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.presentation import build_context
from pynetdicom.service_class import StorageServiceClass

from db.migrate import upgrade
from db.session import make_engine, make_sessionmaker
from node.dicom.files import file_meta_prefix
from node.dispatch import scu
from node.ingest import pdata
from node.ingest.ingest import Ingest
from node.ingest.scp import Receiver, start_servers, stop_servers
from node.settings import Settings
from tests.conftest import free_port
from tests.test_listener import (
    CT_STORAGE,
    ECHO_RQ,
    RELEASE_RP,
    RELEASE_RQ,
    VERIFICATION,
    associate_rq,
    item,
    presentation_context,
    read_pdu,
)

EXPLICIT_LE = ExplicitVRLittleEndian
CT_UID = "1.2.840.113619.2.55.3.604688119.969.1268071029.320"


def _pynetdicom_response(status: int, comment: str | None, instance: str, max_pdu: int) -> bytes:
    """What pynetdicom sends for a C-STORE handler's answer: the service class's status handling, then its
    message encoding and fragmentation, as P-DATA-TF PDUs."""
    rsp = C_STORE()
    rsp.MessageID = rsp.MessageIDBeingRespondedTo = 7
    rsp.AffectedSOPInstanceUID, rsp.AffectedSOPClassUID = instance, CT_STORAGE
    if comment is None:
        answer: int | Dataset = status
    else:
        answer = Dataset()
        answer.Status, answer.ErrorComment = status, comment
    rsp = StorageServiceClass.__new__(StorageServiceClass).validate_status(answer, rsp)
    msg = C_STORE_RSP()
    msg.primitive_to_message(rsp)
    out = b""
    for primitive in msg.encode_msg(5, max_pdu):
        tf = P_DATA_TF()
        tf.from_primitive(primitive)
        out += tf.encode()
    return out


@pytest.mark.parametrize(("status", "comment", "instance", "max_pdu"), [
    (0x0000, None, CT_UID, 16384),
    (0x0000, None, CT_UID + "1", 0),  # odd length: padded
    (0xA700, "not stored: disk full", CT_UID, 16384),
    (0xA900, "SOPInstanceUID differs from the C-STORE request", "1.2.3", 16384),
    (0xC211, None, CT_UID, 64),  # a peer with tiny PDUs: the command in fragments
])
def test_response_is_what_pynetdicom_sends(status, comment, instance, max_pdu):
    request = pdata.StoreRequest(5, 7, CT_STORAGE, instance)
    assert pdata.store_response(request, status, comment, max_pdu) == _pynetdicom_response(
        status, comment, instance, max_pdu)


def _command_bytes(msg) -> bytes:
    out = b""
    for primitive in msg.encode_msg(3, 0):
        header_and_data = primitive.presentation_data_value_list[0][1]
        if header_and_data[0] & pdata.COMMAND:
            out += bytes(header_and_data[1:])
    return out


def test_store_request_read_from_pynetdicoms_encoding():
    rq = C_STORE()
    rq.MessageID, rq.Priority = 11, 2
    rq.AffectedSOPClassUID, rq.AffectedSOPInstanceUID = CT_STORAGE, CT_UID
    rq.MoveOriginatorApplicationEntityTitle, rq.MoveOriginatorMessageID = "PACS", 3
    rq.DataSet = io.BytesIO(b"\x08\x00\x16\x00")
    elements = pdata.command_elements(_command_bytes(_msg(rq)))
    assert elements is not None
    assert pdata.store_request(elements, 3) == pdata.StoreRequest(3, 11, CT_STORAGE, CT_UID)

    echo = C_ECHO()
    echo.MessageID, echo.AffectedSOPClassUID = 1, VERIFICATION
    elements = pdata.command_elements(_command_bytes(_msg(echo)))
    assert elements is not None and pdata.has_data_set(elements) is False
    assert pdata.store_request(elements, 1) is None


def _msg(primitive):
    msg = C_STORE_RQ() if isinstance(primitive, C_STORE) else C_ECHO_RQ()
    msg.primitive_to_message(primitive)
    return msg


def _store_command(instance: str = CT_UID, extra: bytes = b"", message_id: int = 2) -> bytes:
    def element(number: int, value: bytes) -> bytes:
        return struct.pack("<HHI", 0, number, len(value)) + value

    def padded(text: str) -> bytes:
        raw = text.encode()
        return raw + b"\0" if len(raw) % 2 else raw

    body = (element(0x0002, padded(CT_STORAGE)) + element(0x0100, b"\x01\x00")
            + element(0x0110, struct.pack("<H", message_id)) + element(0x0700, b"\x00\x00")
            + element(0x0800, b"\x00\x00") + element(0x1000, padded(instance)) + extra)
    return element(0x0000, struct.pack("<I", len(body))) + body


def test_store_request_leaves_the_unusual_to_pynetdicom():
    assert pdata.store_request(pdata.command_elements(_store_command()), 3) is not None
    for command in (
        _store_command(instance="1.2.abc"),  # not a UID
        _store_command(instance="1." + "2" * 70),  # too long
        _store_command(extra=struct.pack("<HHI", 0, 0x0902, 2) + b"xx"),  # an element a request does not carry
    ):
        elements = pdata.command_elements(command)
        assert elements is not None and pdata.store_request(elements, 3) is None
    assert pdata.command_elements(_store_command()[:-3]) is None  # cut short
    assert pdata.command_elements(struct.pack("<HHI", 8, 0x10, 0)) is None  # not group 0000


def test_items_tile_the_pdu_or_nothing():
    one = struct.pack(">IBB", 5, 1, 3) + b"abc"
    two = struct.pack(">IBB", 3, 1, 0) + b"d"
    got = pdata.items(memoryview(one + two))
    assert got is not None and [(i.context_id, i.header, bytes(i.fragment)) for i in got] == [
        (1, 3, b"abc"), (1, 0, b"d")]
    assert bytes(pdata.pdu([i.raw for i in got])) == b"\x04\x00" + struct.pack(">I", len(one + two)) + one + two
    assert pdata.items(memoryview(one[:-1])) is None  # the last item runs past the end
    assert pdata.items(memoryview(struct.pack(">IBB", 1, 1, 3))) is None  # no room for its header
    assert pdata.items(memoryview(struct.pack(">IBB", 3, 1, 0x07) + b"x")) is None  # an undefined header bit
    assert pdata.items(memoryview(b"")) is None


# --- a real listener --------------------------------------------------------------------------------------


class _Counting(Receiver):
    """A receiver that counts the C-STOREs pynetdicom's handler gave it."""

    def __init__(self, ingest: Ingest) -> None:
        super().__init__(ingest)
        self.by_pynetdicom = 0
        self.lock = threading.Lock()

    def handle_store(self, event):
        with self.lock:
            self.by_pynetdicom += 1
        return super().handle_store(event)


@pytest.fixture
def listener(tmp_path: Path):
    port = free_port()
    settings = Settings(data_dir=tmp_path / "data", dicom_host="127.0.0.1", dicom_port=port, ae_title="RADNODE")
    engine = make_engine(settings.db_url)
    upgrade(engine)
    receiver = _Counting(Ingest(settings, make_sessionmaker(engine)))
    ae, servers = start_servers(settings, receiver)
    try:
        yield port, receiver, settings
    finally:
        stop_servers(ae, servers, grace=2)
        engine.dispose()


def _data_set(instance: str) -> bytes:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = CT_STORAGE, instance
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.826.0.1.3680043.2.1", "1.2.826.0.1.3680043.2.1.1"
    ds.PatientID, ds.Modality, ds.InstanceNumber = "FAST1", "CT", 1
    ds.Rows = ds.Columns = 4
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = bytes(range(32))
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    return buffer.getvalue()


def _pdv(cx: int, data: bytes, command: bool, last: bool) -> bytes:
    return struct.pack(">IBB", len(data) + 2, cx, int(command) | (int(last) << 1)) + data


def _tf(*pdvs: bytes) -> bytes:
    body = b"".join(pdvs)
    return struct.pack(">BBI", 4, 0, len(body)) + body


def _associate(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    items = [item(0x10, b"1.2.840.10008.3.1.1.1"), presentation_context(1, VERIFICATION),
             presentation_context(3, CT_STORAGE, EXPLICIT_LE), item(0x50, item(0x51, struct.pack(">L", 16384)))]
    s.sendall(associate_rq(called="RADNODE", calling="FASTTEST", items=items))
    assert read_pdu(s)[0] == 0x02
    return s


def _responses(s: socket.socket, count: int) -> list[tuple[int, int]]:
    """(command field, status) of the next `count` responses."""
    out = []
    while len(out) < count:
        kind, body = read_pdu(s)
        assert kind == 0x04, f"PDU type {kind:#x} instead of a response"
        items = pdata.items(memoryview(body))
        assert items is not None
        elements = pdata.command_elements(b"".join(bytes(i.fragment) for i in items))
        assert elements is not None
        out.append((pdata.us(elements[0x0100]), pdata.us(elements[0x0900])))
    return out


def _stored(settings: Settings, instance: str) -> bytes:
    return next(settings.instances_dir.rglob(f"{instance}*")).read_bytes()


def test_plain_stores_take_the_fast_path_and_the_rest_goes_to_pynetdicom(listener):
    port, receiver, settings = listener
    s = _associate(port)
    try:
        # a plain C-STORE, its data set in three PDUs: stored by the fast path, byte for byte
        first = "1.2.826.0.1.3680043.2.1.1.1"
        data = _data_set(first)
        s.sendall(_tf(_pdv(3, _store_command(first, message_id=2), True, True)))
        s.sendall(_tf(_pdv(3, data[:40], False, False)) + _tf(_pdv(3, data[40:90], False, False)))
        s.sendall(_tf(_pdv(3, data[90:], False, True)))
        assert _responses(s, 1) == [(pdata.C_STORE_RSP, 0x0000)]
        assert receiver.by_pynetdicom == 0
        expected = file_meta_prefix(CT_STORAGE, first, EXPLICIT_LE, PYNETDICOM_IMPLEMENTATION_UID,
                                    PYNETDICOM_IMPLEMENTATION_VERSION) + data
        assert _stored(settings, first) == expected
        assert dcmread(settings.instances_dir.rglob(f"{first}*").__next__()).SOPInstanceUID == first

        # a C-ECHO and a C-STORE in one PDU: pynetdicom answers both, in order
        second = "1.2.826.0.1.3680043.2.1.1.2"
        s.sendall(_tf(_pdv(1, ECHO_RQ, True, True), _pdv(3, _store_command(second, message_id=3), True, True),
                      _pdv(3, _data_set(second), False, True)))
        assert _responses(s, 2) == [(0x8030, 0x0000), (pdata.C_STORE_RSP, 0x0000)]
        assert receiver.by_pynetdicom == 1

        # then plain again: the fast path
        third = "1.2.826.0.1.3680043.2.1.1.3"
        s.sendall(_tf(_pdv(3, _store_command(third, message_id=4), True, True), _pdv(3, _data_set(third), False, True)))
        assert _responses(s, 1) == [(pdata.C_STORE_RSP, 0x0000)]
        assert receiver.by_pynetdicom == 1

        # refusals keep their status and comment: the data set names another instance than the request
        s.sendall(_tf(_pdv(3, _store_command("1.2.826.0.1.3680043.2.1.1.9", message_id=5), True, True),
                      _pdv(3, _data_set(third), False, True)))
        assert _responses(s, 1) == [(pdata.C_STORE_RSP, 0xA900)]
        assert receiver.by_pynetdicom == 1

        s.sendall(RELEASE_RQ)
        assert read_pdu(s) == (0x06, RELEASE_RP[6:])
    finally:
        s.close()


def test_out_of_order_items_go_to_pynetdicom(listener):
    """A data set fragment on another presentation context in mid-store: pynetdicom gets everything held and
    answers as it always did (pynetdicom 3.0.4 takes the fragment and stores the instance), and keeps the
    association: the next plain C-STORE is its too."""
    port, receiver, settings = listener
    s = _associate(port)
    try:
        instance = "1.2.826.0.1.3680043.2.1.1.5"
        data = _data_set(instance)
        s.sendall(_tf(_pdv(3, _store_command(instance), True, True), _pdv(3, data[:50], False, False)))
        s.sendall(_tf(_pdv(1, data[50:], False, True)))
        assert _responses(s, 1) == [(pdata.C_STORE_RSP, 0x0000)]
        assert receiver.by_pynetdicom == 1
        assert _stored(settings, instance).endswith(data)

        after = "1.2.826.0.1.3680043.2.1.1.6"
        s.sendall(_tf(_pdv(3, _store_command(after, message_id=3), True, True), _pdv(3, _data_set(after), False, True)))
        assert _responses(s, 1) == [(pdata.C_STORE_RSP, 0x0000)]
        assert receiver.by_pynetdicom == 2
    finally:
        s.close()


def test_a_response_is_left_for_the_send_that_waits_for_it(listener):
    """radnode's SCU (dispatch, sends, priors): pynetdicom's requestor reactor looks at the DIMSE queue between
    requests, and once took the response to a C-STORE that this fast receiver had answered within the look
    (the send then waited out its DIMSE timeout). A response on the queue now stays there for the send_*."""
    port, _, _ = listener
    assoc = scu.associate("127.0.0.1", port, "RADNODE", "RACE", [build_context(CT_STORAGE, EXPLICIT_LE)])
    try:
        stray = C_STORE()
        stray.MessageIDBeingRespondedTo, stray.Status = 1, 0x0000
        stray.AffectedSOPClassUID, stray.AffectedSOPInstanceUID = CT_STORAGE, CT_UID
        assoc.dimse.msg_queue.put((3, stray))
        time.sleep(0.3)  # the reactor looks every millisecond
        assert assoc.dimse.msg_queue.qsize() == 1
        assert assoc.dimse.get_msg(block=True) == (3, stray)
        instance = "1.2.826.0.1.3680043.2.1.1.7"
        ds = dcmread(io.BytesIO(file_meta_prefix(CT_STORAGE, instance, EXPLICIT_LE, PYNETDICOM_IMPLEMENTATION_UID,
                                                 PYNETDICOM_IMPLEMENTATION_VERSION) + _data_set(instance)))
        assert assoc.send_c_store(ds).Status == 0x0000
    finally:
        assoc.release()
