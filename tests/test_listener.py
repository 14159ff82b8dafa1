"""The DICOM listener under hostile and broken traffic, from outside: raw sockets and hand-made PDUs against a
real `radnode run` (port scans, silent and half-open connections, limits per source address and in total,
protocol errors, and a hypothesis PDU fuzz with C-ECHO / C-STORE / leak checks after each batch)."""

from __future__ import annotations

import re
import select
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import CTImageStorage, Verification

from node.dicom.association import keep_responses_for_their_caller
from tests.test_scp import check_stored

SQLITE = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)  # the listener, not the database

VERIFICATION = "1.2.840.10008.1.1"
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
IMPLICIT_LE = "1.2.840.10008.1.2"
APP_CONTEXT = "1.2.840.10008.3.1.1.1"


# --- PDUs by hand (PS3.8 9.3) ---------------------------------------------------------------------------


def pdu(kind: int, body: bytes, length: int | None = None) -> bytes:
    """A PDU: type, reserved, 4-byte length (the true one unless `length` lies), body."""
    return struct.pack(">BBL", kind, 0, len(body) if length is None else length) + body


def item(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(body)) + body


def presentation_context(cx_id: int, abstract: str, *transfer: str) -> bytes:
    subs = item(0x30, abstract.encode()) + b"".join(item(0x40, ts.encode()) for ts in transfer or (IMPLICIT_LE,))
    return item(0x20, bytes([cx_id, 0, 0, 0]) + subs)


def associate_rq(called: str = "RADNODE", calling: str = "FUZZ", items: list[bytes] | None = None,
                 version: int = 1) -> bytes:
    if items is None:
        items = [item(0x10, APP_CONTEXT.encode()), presentation_context(1, VERIFICATION),
                 presentation_context(3, CT_STORAGE), item(0x50, item(0x51, struct.pack(">L", 16384)))]
    head = struct.pack(">HH", version, 0) + called.ljust(16).encode() + calling.ljust(16).encode() + bytes(32)
    return pdu(0x01, head + b"".join(items))


RELEASE_RQ = pdu(0x05, bytes(4))
RELEASE_RP = pdu(0x06, bytes(4))
ABORT = pdu(0x07, bytes(4))


def command(**elements: object) -> bytes:
    """A DIMSE command set, implicit VR little endian, with its group length."""
    ds = Dataset()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    body = encode(ds, True, True)
    assert body is not None
    return struct.pack("<HHLL", 0, 0, 4, len(body)) + body


ECHO_RQ = command(AffectedSOPClassUID=VERIFICATION, CommandField=0x0030, MessageID=1, CommandDataSetType=0x0101)
STORE_RQ = command(AffectedSOPClassUID=CT_STORAGE, CommandField=0x0001, MessageID=2, Priority=0,
                   CommandDataSetType=0x0000, AffectedSOPInstanceUID="1.2.3.4.5")


def p_data(cx_id: int, data: bytes, is_command: bool, last: bool, length: int | None = None) -> bytes:
    pdv = struct.pack(">LBB", len(data) + 2, cx_id, int(is_command) | (int(last) << 1)) + data
    return pdu(0x04, pdv, length)


# --- raw connections ------------------------------------------------------------------------------------


def connect(node, source: str = "127.0.0.1", timeout: float = 5) -> socket.socket:
    """A TCP connection to the node's DICOM port from `source` (any 127/8 address is this machine)."""
    s = socket.socket()
    s.settimeout(timeout)
    s.bind((source, 0))
    s.connect(("127.0.0.1", node.port))
    return s


def closed_by_peer(s: socket.socket, wait: float) -> bool:
    """True if the node closed (or reset) the connection within `wait` seconds; what it sent is read away."""
    deadline = time.monotonic() + wait
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select([s], [], [], left)
        if not ready:
            return False
        try:
            if not s.recv(65536):
                return True
        except OSError:
            return True
    return False


def closed_within(socks: list[socket.socket], wait: float) -> list[socket.socket]:
    """The connections of `socks` the node closed within `wait` seconds (all watched at once)."""
    deadline, closed = time.monotonic() + wait, []
    open_ = list(socks)
    while open_ and (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select(open_, [], [], left)
        for s in ready:
            if closed_by_peer(s, 0.01):
                closed.append(s)
                open_.remove(s)
    return closed


def read_pdu(s: socket.socket) -> tuple[int, bytes]:
    head = b""
    while len(head) < 6:
        chunk = s.recv(6 - len(head))
        if not chunk:
            raise ConnectionError("closed")
        head += chunk
    kind, _, length = struct.unpack(">BBL", head)
    body = b""
    while len(body) < length:
        chunk = s.recv(length - len(body))
        if not chunk:
            raise ConnectionError("closed")
        body += chunk
    return kind, body


def reset(s: socket.socket) -> None:
    """Close with an RST instead of a FIN."""
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def echo_seconds(node, source: str = "127.0.0.1", timeout: float = 10) -> float:
    """Seconds for a whole C-ECHO association from `source`; raises AssertionError if it fails."""
    ae = AE(ae_title="LISTENTEST")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    start = time.monotonic()
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title, bind_address=(source, 0))
    assert assoc.is_established, f"C-ECHO association from {source} failed"
    status = assoc.send_c_echo()
    assoc.release()
    assert status and status.Status == 0
    return time.monotonic() - start


def raw_echo_seconds(node, source: str = "127.0.0.1") -> float:
    """Seconds for a C-ECHO association done with hand-made PDUs (the node's latency, not a client's)."""
    start = time.monotonic()
    with connect(node, source) as s:
        s.sendall(associate_rq(called=node.ae_title))
        assert read_pdu(s)[0] == 0x02, "association not accepted"
        s.sendall(p_data(1, ECHO_RQ, True, True))
        kind, body = read_pdu(s)
        assert kind == 0x04 and b"\x00\x00\x00\x09\x02\x00\x00\x00\x00\x00" in body, "no C-ECHO success"
        s.sendall(RELEASE_RQ)
        assert read_pdu(s)[0] == 0x06
    return time.monotonic() - start


def store_one(node, ct_file: Path, tmp: Path, procs: list[psutil.Process] = ()) -> int | None:
    """One real C-STORE (a fresh instance UID) that must be stored byte-identically; the pid of the receiver
    among `procs` that took the association (None when not given)."""
    ds = dcmread(ct_file)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    path = tmp / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    ae = AE(ae_title="LISTENTEST")
    ae.add_requested_context(CTImageStorage, ds.file_meta.TransferSyntaxUID)
    ae.acse_timeout = ae.network_timeout = 10
    assoc = ae.associate("127.0.0.1", node.port, ae_title=node.ae_title)
    assert assoc.is_established
    keep_responses_for_their_caller(assoc)  # pynetdicom's requestor race (node/dicom/association.py)
    local_port = assoc.dul.socket.socket.getsockname()[1]
    served = next((p.pid for p in procs for c in p.net_connections(kind="tcp")
                   if c.raddr and c.raddr.port == local_port), None)
    status = assoc.send_c_store(path)
    assoc.release()
    assert status and status.Status == 0
    check_stored(node, {str(ds.SOPInstanceUID): path})
    return served


# --- what the node says ----------------------------------------------------------------------------------


def metric(node, reason: str) -> float:
    text = node.api("GET", "/metrics").text
    found = re.search(rf'^radnode_dicom_rejected_total{{reason="{reason}"}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def bad_lines(node) -> list[str]:
    return [line for line in node.logs().splitlines() if " ERROR " in line or "Traceback" in line
            or line.startswith("Exception in thread")]


def warnings_from(node, source: str) -> list[str]:
    return [line for line in node.logs().splitlines() if " WARNING " in line and f" from {source} " in line]


def receivers(node) -> list[psutil.Process]:
    """The node's receiver processes: the children listening on its DICOM port."""
    out = []
    for child in psutil.Process(node.proc.pid).children():
        try:
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == node.port
                   for c in child.net_connections(kind="tcp")):
                out.append(child)
        except psutil.NoSuchProcess:
            pass
    return out


def usage(procs: list[psutil.Process]) -> dict[int, tuple[int, int, int]]:
    """pid -> (threads, open file descriptors, VmRSS kB), read from /proc."""
    out = {}
    for p in procs:
        status = Path(f"/proc/{p.pid}/status").read_text()
        threads = int(re.search(r"^Threads:\s+(\d+)", status, re.M).group(1))
        rss = int(re.search(r"^VmRSS:\s+(\d+)", status, re.M).group(1))
        out[p.pid] = (threads, len(list(Path(f"/proc/{p.pid}/fd").iterdir())), rss)
    return out


def settled(procs: list[psutil.Process], baseline: dict[int, tuple[int, int, int]], wait: float = 15):
    """Wait until every receiver is back to its baseline thread and fd counts; the last reading."""
    deadline = time.monotonic() + wait
    while True:
        now = usage(procs)
        if all(now[pid][:2] <= baseline[pid][:2] for pid in baseline) or time.monotonic() > deadline:
            return now
        time.sleep(0.2)


def test_pynetdicom_internals_checked_for_this_version():
    """node/ingest/scp.py overrides a few pynetdicom internals (its section "pynetdicom internals"): an upgrade
    of pynetdicom must re-check them, then move PYNETDICOM_CHECKED."""
    import pynetdicom

    from node.ingest import scp

    assert pynetdicom.__version__ == scp.PYNETDICOM_CHECKED


def test_cached_uid_checks_answer_as_before():
    """cache_uid_checks (receiver processes) keeps every answer of pynetdicom's UI validator and of pydicom's
    UID.is_valid, and caches them: run in a process of its own, which it changes for good."""
    script = """
import pynetdicom._config
from pydicom.uid import UID
from pynetdicom.utils import set_uid
from node.ingest.scp import cache_uid_checks
uids = ["1.2.840.10008.1.2.1", "1.2.3", "0.1", "1.02.3", "1.2.3.", ".1.2", "1.2a.3", "", "1." * 31 + "1",
        "1." * 32 + "1", "1.2.840.10008.1.2.1\\0", "1.2 .3", "x" * 70]
def answers():
    out = []
    for u in uids:
        v = UID(u)
        out.append((v.is_valid, pynetdicom._config.VALIDATORS["UI"](v)))
        try:
            out.append(str(set_uid(u, "Transfer Syntax Name")))
        except ValueError as exc:
            out.append(str(exc))
    return out
before = answers()
cache_uid_checks()
after, again = answers(), answers()
assert before == after == again, (before, after)
assert pynetdicom._config.VALIDATORS["UI"].cache_info().hits >= len(uids)
print("ok", sum(a[0] for a in before[::2]), "valid")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ok", "4", "valid"]


# --- port scans, health checks, silent connections --------------------------------------------------------


@SQLITE
def test_closed_and_silent_connections_do_not_lock_out(start_node):
    """500 connections opened and closed (a port scan, a load balancer's health checks) and 50 left open and
    silent: another client's C-ECHO succeeds within 2 s, the scanner's own address can associate once its
    connections are closed, and the node closes the silent ones after the associate timeout."""
    timeout = 6.0
    node = start_node(dicom_associate_timeout=str(timeout))
    t0 = time.monotonic()
    silent = [connect(node, f"127.0.0.{10 + i}") for i in range(50)]
    scan = []
    for _ in range(500):  # in bursts of 100; all of them stay open until about a second after the last
        scan.append(connect(node))
        if len(scan) % 100 == 0:
            time.sleep(0.2)
    during = raw_echo_seconds(node, "127.0.0.2")  # the scan's last connections are still open
    echo_seconds(node, "127.0.0.3")  # and a real client too
    time.sleep(1)
    for s in scan:
        s.close()
    after = raw_echo_seconds(node, "127.0.0.2")
    same_source = raw_echo_seconds(node, "127.0.0.1")  # the scanner's own address: its slots are free again
    # the scanner's address got its share of the slots, no more (its silent ones made room for its newer ones)
    refused = sum(metric(node, reason) for reason in ("per_source_limit", "total_limit", "evicted"))
    print(f"C-ECHO during {during:.3f} s, after {after:.3f} s, from the scanner's address {same_source:.3f} s, "
          f"at t+{time.monotonic() - t0:.1f} s; {refused:.0f} of the 500 refused at once or evicted")
    assert refused >= 500 - 2 * 32
    assert during < 2 and after < 2 and same_source < 2
    assert not any(closed_by_peer(s, 0) for s in silent), "the silent connections were open during the C-ECHOs"
    closed_at = []
    for s in silent:
        assert closed_by_peer(s, timeout + 3 - (time.monotonic() - t0)), "a silent connection outlived the timeout"
        closed_at.append(time.monotonic() - t0)
        s.close()
    print(f"silent connections closed by the node at t+{min(closed_at):.1f} .. {max(closed_at):.1f} s")
    assert min(closed_at) > timeout - 0.5
    assert metric(node, "associate_timeout") == 50
    for i in range(50):  # one WARNING each, with its address
        lines = warnings_from(node, f"127.0.0.{10 + i}")
        assert len(lines) == 1 and "(associate_timeout)" in lines[0], lines
    assert not bad_lines(node), bad_lines(node)[:10]


@SQLITE
def test_limits_per_source_and_in_total(start_node):
    """Over the per-source limit a connection is closed at once with a WARNING naming the address and the
    count, and other addresses still associate; over the total limit likewise. The limits hold per receiver;
    with several, whichever is free first takes a connection (one stalled for a moment leaves all of them to
    another), so the counts are exact with one."""
    node = start_node(receivers="1", dicom_max_per_source="4", dicom_max_associations="6",
                      dicom_associate_timeout="3")
    flood = [connect(node, "127.0.0.2") for _ in range(20)]
    refused = closed_within(flood, 1.0)
    assert len(refused) == 20 - 4
    assert echo_seconds(node, "127.0.0.3") < 2
    lines = warnings_from(node, "127.0.0.2")
    assert len(lines) == 1, lines  # one line per address, limit and 10 s, not one per refused connection
    assert "4 connections open from this address, limit 4 per receiver (per_source_limit)" in lines[0], lines
    assert metric(node, "per_source_limit") == len(refused)
    for s in flood:
        s.close()
    time.sleep(0.5)  # the node sees them closed
    # in total: 6, whatever the addresses
    many = [connect(node, f"127.0.1.{i + 1}") for i in range(20)]
    refused = closed_within(many, 1.0)
    assert len(refused) == 20 - 6
    assert metric(node, "total_limit") == len(refused)
    assert any("limit 6 per receiver (total_limit)" in line for line in node.logs().splitlines())
    for s in many:
        s.close()
    assert echo_seconds(node, "127.0.0.3") < 2  # closed connections free their slots at once
    # silent connections never keep a talking client out: at a limit, one silent for a second makes room
    evicted = metric(node, "evicted")
    quiet = [connect(node, f"127.0.6.{i + 1}") for i in range(30)]  # the receiver full (6)
    assert len(closed_within(quiet, 1.2)) == 30 - 6
    assert echo_seconds(node, "127.0.0.3") < 2
    assert len(closed_within(quiet, 1.0)) == 30 - 6 + 1
    assert metric(node, "evicted") == evicted + 1
    assert any(" closed to make room: it sent nothing for 1 s, 6 connections open, limit 6 per receiver (evicted)"
               in line for line in node.logs().splitlines())
    for s in quiet:
        s.close()
    assert not bad_lines(node), bad_lines(node)[:10]


# --- protocol errors ---------------------------------------------------------------------------------------


def _established(node, source: str) -> socket.socket:
    s = connect(node, source)
    s.sendall(associate_rq(called=node.ae_title))
    kind, _ = read_pdu(s)
    assert kind == 0x02  # A-ASSOCIATE-AC
    return s


PROTOCOL_ERRORS = {
    # name: (what the peer does, the reason counted)
    "junk": (lambda s, n: s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), "unknown_pdu_type"),
    "associate_rq_of_4_gib": (lambda s, n: s.sendall(pdu(0x01, b"", 0xFFFFFFFF)), "oversize_pdu"),
    "p_data_before_association": (lambda s, n: s.sendall(p_data(1, ECHO_RQ, True, True)), "unexpected_pdu"),
    "associate_rq_garbage": (lambda s, n: s.sendall(pdu(0x01, bytes(range(68)))), "malformed_pdu"),
    "associate_rq_cut_short": (lambda s, n: s.sendall(associate_rq(called=n.ae_title)[:40]), "truncated_pdu"),
    "protocol_version_2": (lambda s, n: s.sendall(associate_rq(called=n.ae_title, version=2)), "protocol_version"),
    "second_associate_rq": (lambda s, n: s.sendall(associate_rq(called=n.ae_title)), "unexpected_pdu"),
    "bad_command_set": (lambda s, n: s.sendall(p_data(1, b"\xff" * 40, True, True)), "malformed_dimse"),
}


@SQLITE
def test_protocol_errors_one_warning_each_no_error_lines(start_node):
    """Each broken connection gives one WARNING with its address and reason, never an ERROR line or a
    traceback, and radnode_dicom_rejected_total counts it by reason; the node goes on serving."""
    node = start_node()
    expected: dict[str, int] = {}
    for i, (name, (act, reason)) in enumerate(PROTOCOL_ERRORS.items()):
        source = f"127.0.2.{i + 1}"
        s = _established(node, source) if name in ("second_associate_rq", "bad_command_set") else connect(node, source)
        act(s, node)
        if name in ("associate_rq_cut_short",):
            s.shutdown(socket.SHUT_WR)
        assert closed_by_peer(s, 5), name
        s.close()
        expected[reason] = expected.get(reason, 0) + 1
    time.sleep(0.5)
    for i, (name, (_, reason)) in enumerate(PROTOCOL_ERRORS.items()):
        lines = warnings_from(node, f"127.0.2.{i + 1}")
        assert len(lines) == 1 and f"({reason})" in lines[0], (name, lines)
    for reason, n in expected.items():
        assert metric(node, reason) == n, reason
    assert echo_seconds(node) < 2
    assert not bad_lines(node), bad_lines(node)[:10]


@SQLITE
def test_idle_and_stuck_associations_are_aborted(start_node):
    """An association that goes silent, and one that stops inside a PDU, are aborted after the idle timeout,
    each with one WARNING."""
    node = start_node(dicom_idle_timeout="2")
    idle = _established(node, "127.0.5.1")
    stuck = _established(node, "127.0.5.2")
    stuck.sendall(p_data(1, ECHO_RQ, True, True)[:20])  # the PDU header says more is coming
    t0 = time.monotonic()
    assert len(closed_within([idle, stuck], 8)) == 2
    idle.close()
    stuck.close()
    assert time.monotonic() - t0 > 1.5
    assert "(idle_timeout)" in " ".join(warnings_from(node, "127.0.5.1"))
    for source in ("127.0.5.1", "127.0.5.2"):
        assert len(warnings_from(node, source)) == 1, warnings_from(node, source)
    assert not bad_lines(node), bad_lines(node)[:10]


# --- the fuzz -----------------------------------------------------------------------------------------------

# the states a peer can leave an association in, and how it leaves
PREFIXES = ["none", "rq_sent", "established", "mid_command", "mid_dataset", "release_sent", "rejected"]
ENDINGS = ["abort", "release_rq", "release_rp", "close", "reset", "half_close", "junk_then_close"]


def _prefix(s: socket.socket, node, prefix: str) -> None:
    if prefix == "none":
        return
    if prefix == "rejected":
        s.sendall(associate_rq(called=node.ae_title, items=[item(0x10, APP_CONTEXT.encode())]))  # no contexts
        return
    s.sendall(associate_rq(called=node.ae_title))
    if prefix == "rq_sent":
        return
    kind, _ = read_pdu(s)
    assert kind == 0x02
    if prefix == "mid_command":
        s.sendall(p_data(1, STORE_RQ[:20], True, False))
    elif prefix == "mid_dataset":
        s.sendall(p_data(3, STORE_RQ, True, True) + p_data(3, b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100", False, False))
    elif prefix == "release_sent":
        s.sendall(RELEASE_RQ)


def _ending(s: socket.socket, ending: str) -> None:
    try:
        if ending == "abort":
            s.sendall(ABORT)
        elif ending == "release_rq":
            s.sendall(RELEASE_RQ)
        elif ending == "release_rp":
            s.sendall(RELEASE_RP)
        elif ending == "reset":
            reset(s)
            return
        elif ending == "half_close":
            s.shutdown(socket.SHUT_WR)
            closed_by_peer(s, 0.3)
        elif ending == "junk_then_close":
            s.sendall(b"\x00" * 7)
        closed_by_peer(s, 0.05)
    except OSError:
        pass
    s.close()


ITEM_TYPES = [0x10, 0x20, 0x21, 0x30, 0x40, 0x50, 0x51, 0x52, 0x53, 0x54, 0x55, 0x56, 0x57, 0x58, 0x59, 0xFF]


@st.composite
def fuzz_pdu(draw) -> bytes:
    """One PDU: random or real type; a body of items (in or out of order, oversize, wrong length fields) or
    bytes; and a declared length that is true or lies either way."""
    kind = draw(st.sampled_from([1, 2, 3, 4, 5, 6, 7, 0, 8, 0x41, 0xFF]))
    shape = draw(st.sampled_from(["rq_items", "p_data", "bytes", "fixed"]))
    if shape == "rq_items":
        items = [item(0x10, APP_CONTEXT.encode()), presentation_context(1, VERIFICATION),
                 item(0x50, item(0x51, struct.pack(">L", 16384)))]
        extra = draw(st.lists(st.tuples(st.sampled_from(ITEM_TYPES), st.binary(max_size=64),
                                        st.sampled_from([0, 1, 300, 70000])), max_size=4))
        for t, body, pad in extra:
            items.append(item(t, body + b"\x00" * pad) if pad < 65536 else struct.pack(">BBH", t, 0, 65535) + body)
        items = draw(st.permutations(items))
        version = draw(st.sampled_from([1, 1, 0, 2, 0xFFFF]))
        body = associate_rq(items=list(items), version=version)[6:]
        if draw(st.booleans()):  # an item length field that lies
            at = draw(st.integers(74, max(74, len(body) - 2)))
            body = body[:at] + draw(st.binary(min_size=2, max_size=2)) + body[at + 2:]
    elif shape == "p_data":
        data = draw(st.sampled_from([ECHO_RQ, STORE_RQ, b"", b"\xff" * 10])) + draw(st.binary(max_size=32))
        body = p_data(draw(st.sampled_from([1, 3, 2, 255])), data, draw(st.booleans()), draw(st.booleans()))[6:]
        if draw(st.booleans()):  # a PDV length that lies
            body = struct.pack(">L", draw(st.sampled_from([0, 1, 5, 0xFFFFFFFF]))) + body[4:]
    elif shape == "bytes":
        body = draw(st.binary(max_size=200))
    else:
        body = draw(st.sampled_from([bytes(4), b"", bytes(2), bytes(100)]))
    lie = draw(st.sampled_from(["true", "true", "short", "long", "huge", "zero"]))
    length = {"true": len(body), "short": max(0, len(body) - draw(st.integers(1, 16))),
              "long": len(body) + draw(st.integers(1, 64)), "huge": 0xFFFFFFF0, "zero": 0}[lie]
    return struct.pack(">BBL", kind, 0, length) + body


SESSION = st.tuples(st.sampled_from(PREFIXES), st.lists(fuzz_pdu(), max_size=3), st.sampled_from(ENDINGS))
BATCH_SIZE, BATCHES = 40, 10


def _session(node, source: str, prefix: str, pdus: list[bytes], ending: str) -> None:
    s = connect(node, source)
    try:
        _prefix(s, node, prefix)
        for raw in pdus:
            s.sendall(raw)
    except (OSError, ConnectionError):
        s.close()
        return
    _ending(s, ending)


@SQLITE
def test_pdu_fuzz(start_node, ct_dir, tmp_path):
    """Every prefix state x every ending, then BATCHES x BATCH_SIZE generated sessions (derandomized, so CI
    runs the same cases); after each batch the node answers C-ECHO within 1 s, stores a real C-STORE
    byte-identically, and its receivers are back to their thread and fd counts; RSS stays bounded."""
    node = start_node(dicom_associate_timeout="2")
    ct_file = sorted(ct_dir.glob("*.dcm"))[0]
    procs = receivers(node)
    assert len(procs) == 2
    # warm up both receivers (imports, database connections, metrics) with 4 C-STOREs each: whichever receiver
    # accepts first takes a connection, so a fixed number of stores once left one receiver cold and its fds grew
    # after the baseline
    served = {p.pid: 0 for p in procs}
    for _ in range(64):
        if min(served.values()) >= 4:
            break
        served[store_one(node, ct_file, tmp_path, procs)] += 1
    assert min(served.values()) >= 4, served
    baseline = usage(procs)
    counter = {"sessions": 0, "batches": 0}
    echo_times: list[float] = []
    started = time.monotonic()

    def source() -> str:
        n = counter["sessions"]
        counter["sessions"] += 1
        return f"127.3.{n // 250}.{n % 250 + 1}"  # one address per session: its warnings are its own

    def after_batch() -> None:
        counter["batches"] += 1
        echo_times.append(raw_echo_seconds(node))
        assert echo_times[-1] < 1
        store_one(node, ct_file, tmp_path)
        now = settled(procs, baseline)
        assert all(now[pid][:2] <= baseline[pid][:2] for pid in baseline), (baseline, now)
        assert not bad_lines(node), bad_lines(node)[:20]

    for prefix in PREFIXES:  # abort / release / close at every state
        for ending in ENDINGS:
            _session(node, source(), prefix, [], ending)
    after_batch()
    rss = settled(procs, baseline)  # memory from here: the first malformed cases allocate once

    @settings(max_examples=BATCHES, derandomize=True, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(st.lists(SESSION, min_size=BATCH_SIZE, max_size=BATCH_SIZE))
    def batches(sessions):
        for prefix, pdus, ending in sessions:
            _session(node, source(), prefix, pdus, ending)
        after_batch()

    batches()
    end = settled(procs, baseline)
    per_source = {}
    for line in node.logs().splitlines():
        found = re.search(r" from (127\.3\.\d+\.\d+) ", line)
        if found and " WARNING " in line:
            per_source[found.group(1)] = per_source.get(found.group(1), 0) + 1
    print(f"fuzz: {counter['sessions']} sessions in {counter['batches']} batches, {time.monotonic() - started:.1f} s; "
          f"C-ECHO after each batch {min(echo_times):.3f} .. {max(echo_times):.3f} s; "
          f"{len(per_source)} warned; receivers (threads, fds, VmRSS kB) before {baseline}, after the first batch "
          f"{rss}, at the end {end}")
    assert counter["sessions"] == len(PREFIXES) * len(ENDINGS) + BATCHES * BATCH_SIZE
    assert max(per_source.values()) == 1  # one WARNING per connection at most
    for pid in baseline:
        assert end[pid][:2] <= baseline[pid][:2]
        assert end[pid][2] - rss[pid][2] < 16 * 1024, (rss, end)  # kB: no growth with the number of cases


@SQLITE
def test_tls_handshakes_never_hold_the_accept_loop(start_node, tmp_path):
    """Silent connections and a handshake that stops half-way on the TLS port: a TLS C-ECHO still associates
    at once (the handshake once ran in the accept loop, so one silent peer held every TLS client for 30 s),
    and the node closes them after the associate timeout."""
    import ssl

    from tests.conftest import free_port
    from tests.test_scp import _make_pki

    pki = _make_pki(tmp_path)
    tls_port = free_port()
    node = start_node(tls_cert=pki["server"], tls_key=pki["server_key"], tls_ca=pki["ca"], tls_port=str(tls_port),
                      dicom_associate_timeout="3")
    stuck = []
    for i in range(5):
        s = socket.create_connection(("127.0.0.1", tls_port), source_address=(f"127.0.4.{i + 1}", 0))
        if i == 0:
            s.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # the start of a ClientHello, then nothing
        stuck.append(s)
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca"]))
    ctx.load_cert_chain(str(pki["client"]), str(pki["client_key"]))
    ae = AE(ae_title="TLSSCU")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 10
    start = time.monotonic()
    assoc = ae.associate("127.0.0.1", tls_port, ae_title=node.ae_title, tls_args=(ctx, "127.0.0.1"))
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assoc.release()
    assert time.monotonic() - start < 2
    assert len(closed_within(stuck, 6)) == 5
    for s in stuck:
        s.close()
    for i in range(5):  # the half-way handshake may time out in its read first
        lines = warnings_from(node, f"127.0.4.{i + 1}")
        reasons = ("(associate_timeout)", "(tls_handshake)") if i == 0 else ("(associate_timeout)",)
        assert len(lines) == 1 and any(r in lines[0] for r in reasons), lines
    assert not bad_lines(node), bad_lines(node)[:10]
