"""Receive step: the DICOM SCP (C-ECHO, C-STORE), durable write then acknowledge, in N processes."""

from __future__ import annotations

import copy
import ctypes
import functools
import gc
import logging
import multiprocessing as mp
import os
import queue
import select
import selectors
import signal
import socket
import ssl
import threading
import time
from typing import Any

import pydicom.config
import pydicom.uid
import pynetdicom._config
import pynetdicom.dul
from pydicom.dataset import Dataset
from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    PYNETDICOM_IMPLEMENTATION_UID,
    PYNETDICOM_IMPLEMENTATION_VERSION,
    AllStoragePresentationContexts,
    evt,
)
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from db.session import make_engine, make_sessionmaker
from node import metrics
from node.dicom.files import file_meta_prefix
from node.dicom.status import Status
from node.ingest import pdata
from node.ingest.ingest import Ingest
from node.ingest.storage import InstanceStore
from node.logs import setup_logging
from node.process import die_with_parent
from node.settings import Settings
from node.ups.dimse import SOP_CLASSES as UPS_SOP_CLASSES
from node.ups.dimse import ups_handlers

log = logging.getLogger("radnode.scp")

STOP_GRACE_SECONDS = 10.0  # running associations get this long to finish when the receiver stops


def _status(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds


class Receiver:
    """The C-STORE / C-ECHO handlers of one receiver process: Ingest.store (file, row), then the status."""

    def __init__(self, ingest: Ingest) -> None:
        self.ingest = ingest

    def handle_echo(self, event: evt.Event) -> int:
        return Status.SUCCESS

    def handle_store(self, event: evt.Event) -> int | Dataset:
        """Store one instance durably and record it; never raises (errors become statuses). pynetdicom's way
        in; plain C-STORE requests mostly come by _FastStores, which calls store() itself."""
        try:
            request = event.request
            parts = [request.DataSet.getbuffer()]
            sop_class, sop_instance = request.AffectedSOPClassUID, request.AffectedSOPInstanceUID
        except Exception:
            log.exception("C-STORE: could not read the received data set")
            calling = event.assoc.requestor.ae_title.strip() or None
            stored = self.ingest.refused("dimse", calling, Status.CANNOT_UNDERSTAND, "cannot read data set", 0)
            return _status(stored.status, stored.reason)
        code, comment = self.store(event.assoc, sop_class, sop_instance, event.context.transfer_syntax, parts)
        return code if comment is None else _status(code, comment)

    def store(self, assoc: Association, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str,
              parts: list[Any]) -> tuple[int, str | None]:
        """Store the data set `parts` (buffers, joined in order) of a C-STORE request on `assoc`: the status,
        and the error comment of a refusal (None on success). Never raises."""
        calling = assoc.requestor.ae_title.strip() or None
        try:
            # as event.encoded_dataset(include_meta=True) would give, without building a file meta data set
            prefix = file_meta_prefix(sop_class_uid, sop_instance_uid, transfer_syntax,
                                      PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION)
            data = b"".join((prefix, *parts))
        except Exception:
            log.exception("C-STORE: could not read the received data set")
            stored = self.ingest.refused("dimse", calling, Status.CANNOT_UNDERSTAND, "cannot read data set", 0)
        else:
            stored = self.ingest.store(data, calling, source="dimse", sop_class_uid=sop_class_uid,
                                       sop_instance_uid=sop_instance_uid, called_ae=_called(assoc))
        return (stored.status, None) if stored.ok else (stored.status, stored.reason[:64])

    def handle_association(self, event: evt.Event) -> None:
        event.assoc.dul._run_loop_delay = _ShortSleeps.POLL_SECONDS  # see tighten_polling
        log.info("association from AE %s (%s)", event.assoc.requestor.ae_title, event.assoc.requestor.address)


def _called(assoc: Association) -> str | None:
    """The AE title the sender called (A-ASSOCIATE-RQ), e.g. RADNODE_STAT for urgent studies."""
    primitive = assoc.requestor.primitive
    title = getattr(primitive, "called_ae_title", None) if primitive is not None else None
    return (title.strip() or None) if isinstance(title, str) else None


#: short reasons for what a receiver refuses or drops (`radnode_dicom_rejected_total{reason}`)
REASONS = {
    "per_source_limit": "too many connections from this address",
    "total_limit": "too many connections",
    "associate_timeout": "no complete association request in time",
    "idle_timeout": "association idle too long",
    "tls_handshake": "TLS handshake failed",
    "oversize_pdu": "PDU longer than allowed",
    "truncated_pdu": "connection closed inside a PDU",
    "unknown_pdu_type": "unknown PDU type",
    "malformed_pdu": "PDU cannot be decoded",
    "unexpected_pdu": "PDU not allowed in this state",
    "protocol_version": "unsupported protocol version",
    "malformed_dimse": "DIMSE message cannot be decoded",
    "association_rejected": "association request rejected",
    "evicted": "sent nothing, closed to make room at a limit",
    "protocol_error": "protocol error",
}
# pynetdicom's ERROR lines about what a peer sent (checked against pynetdicom 3.0.4: dul.py, fsm.py, dimse.py,
# association.py) -> our reason; anything else said in a connection's threads is a "protocol_error"
_PYNETDICOM_FAULTS = (
    ("Unknown PDU type", "unknown_pdu_type"),
    ("The received PDU is shorter", "truncated_pdu"),
    ("Connection closed before the entire PDU", "truncated_pdu"),
    ("Unable to decode the received PDU", "malformed_pdu"),
    ("Invalid event", "unexpected_pdu"),
    ("A-ASSOCIATE-RQ: Unsupported protocol version", "protocol_version"),
    ("Received an invalid DIMSE message", "malformed_dimse"),
    ("the action 'DT-2'", "malformed_dimse"),  # P-DATA whose command set cannot be read
    ("Invalid", "malformed_pdu"),  # a field of a PDU or item (AE title, UID, item type...)
    ("codec can't decode", "malformed_pdu"),  # text that is not ASCII where DICOM wants it
    ("Network timeout reached", "idle_timeout"),
)
GC_SECONDS = 30.0  # pynetdicom's listener collects garbage (association threads) at most this often
EVICT_SECONDS = 1.0  # at a limit, a connection silent this long since it was accepted makes room for a new one
REAP_SECONDS = 0.2  # how often a listener looks for finished, silent or stuck connections
LIMIT_LOG_SECONDS = 10.0  # one WARNING per source address and limit in this time; the metric counts every one
FAULT_CLOSE_SECONDS = 1.0  # a connection with a fault is closed this long after it (the peer may read the A-ABORT)
CONTROL_PDU_MAX = 1024**2  # longest A-ASSOCIATE / A-RELEASE / A-ABORT PDU we read; real ones are a few kB


class _Connection:
    """One accepted TCP connection of a listener: its peer address, socket, age and how it went."""

    def __init__(self, host: str, sock: socket.socket) -> None:
        self.host, self.sock = host, sock
        self.accepted = time.monotonic()
        self.assoc: Association | None = None
        self.requested = False  # a complete A-ASSOCIATE-RQ arrived
        self.waiting = False  # admitted, waiting for its first bytes (no thread yet)
        self.faulted = 0.0
        self.woken = False
        self.reason: str | None = None
        self._lock = threading.Lock()

    @property
    def over(self) -> bool:
        """The connection is closed, evicted, or its upper layer has stopped (it frees its slot at once)."""
        if self.sock.fileno() == -1 or self.reason == "evicted":
            return True
        dul = self.assoc.dul if self.assoc is not None else None
        return dul is not None and dul.ident is not None and not dul.is_alive()

    def fault(self, reason: str) -> None:
        """Record why this connection is refused or dropped: one WARNING and one count per connection."""
        with self._lock:
            if self.reason is not None:
                return
            self.reason, self.faulted = reason, time.monotonic()
        log.warning("DICOM connection from %s dropped: %s (%s)", self.host, REASONS[reason], reason)
        metrics.dicom_rejected(reason)


def _hang_up(sock: socket.socket) -> None:
    """End a connection another thread may be reading from: shutdown wakes that read (close would not)."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


_connections: dict[Association, _Connection] = {}  # this process's acceptor associations -> their connection


def _current_connection() -> _Connection | None:
    thread = threading.current_thread()
    assoc = thread if isinstance(thread, Association) else getattr(thread, "assoc", None)
    return _connections.get(assoc) if assoc is not None else None


class _PeerFaults(logging.Filter):
    """On pynetdicom's loggers in a receiver: an ERROR inside a connection's threads is about what the peer
    sent (or failed to send): it becomes that connection's one WARNING, and the line and its traceback are
    dropped; a WARNING there (a quirk worked around) becomes a DEBUG line. Failures of our own event handlers
    stay ERROR lines with their traceback."""

    def __init__(self) -> None:
        super().__init__()
        self._ours = threading.local()  # a handler failed: its traceback (the next record) passes too

    def filter(self, record: logging.LogRecord) -> bool:
        conn = _current_connection()
        if conn is None:
            return True
        text = record.getMessage()
        if "handler" in text:
            self._ours.traceback_next = True
            return True
        if record.exc_info and getattr(self._ours, "traceback_next", False):
            self._ours.traceback_next = False
            return True
        if record.levelno < logging.ERROR:  # a quirk pynetdicom works around (a VM, a name): not a fault
            log.debug("DICOM connection from %s: pynetdicom: %s", conn.host, _printable(text))
            return False
        if conn.reason is None:
            reason = next((r for words, r in _PYNETDICOM_FAULTS if words in text), "protocol_error")
            conn.fault(reason)
            log.debug("DICOM connection from %s: pynetdicom: %s", conn.host, _printable(text))
        return False


def _printable(text: str) -> str:
    """The first line of a message about peer data, short and without control characters."""
    return (text.splitlines() or [""])[0][:200].encode("ascii", "backslashreplace").decode()


def _thread_died(args: Any) -> None:
    """threading.excepthook: pynetdicom 3.0.4 re-raises an exception of a state machine action (e.g. a command
    set it cannot read, fsm.StateMachine.do_action), which ends the connection's DUL thread; that is the
    peer's fault like the line logged before it. Exceptions in other threads go to the default hook."""
    thread = args.thread
    conn = _connections.get(thread if isinstance(thread, Association) else getattr(thread, "assoc", None))
    if conn is None:
        _default_excepthook(args)
        return
    conn.fault("protocol_error")
    log.debug("DICOM connection from %s: its %s thread ended: %s: %s", conn.host, type(thread).__name__,
              args.exc_type.__name__, _printable(str(args.exc_value)))


_default_excepthook = threading.excepthook


def quiet_peer_faults() -> None:
    """Install _PeerFaults on every pynetdicom logger and _thread_died as the thread exception hook of this
    process (receiver processes only)."""
    peer_faults = _PeerFaults()
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if name.startswith("pynetdicom") and isinstance(logger, logging.Logger):
            logger.addFilter(peer_faults)
    threading.excepthook = _thread_died
    # pynetdicom's "standard" handlers only write DEBUG lines that quiet_pynetdicom drops, and in 3.0.4 the one
    # for received PDUs raises on an A-ASSOCIATE-RQ without a User Information item: bind none
    pynetdicom._config.LOG_HANDLER_LEVEL = "none"


# --- pynetdicom internals -----------------------------------------------------------------------------------
# Every use of pynetdicom's internals is in this section and in _WakingDUL / _FastStores (the C-STORE fast
# path) / _ShortSleeps below (the reactors' sleeps), besides the log texts in _PYNETDICOM_FAULTS and the state
# machine's re-raise that _thread_died expects; checked against PYNETDICOM_CHECKED, which
# tests/test_listener.py compares with the installed version so that an upgrade re-checks them.
PYNETDICOM_CHECKED = "3.0.4"


class _BoundedReads(AssociationSocket):
    """An AssociationSocket that refuses to read a PDU longer than its type allows, instead of buffering
    whatever length the peer declares (up to 4 GiB), and reads a PDU body into one buffer with as few
    system calls as the kernel allows. Checked against pynetdicom 3.0.4, where
    DULServiceProvider._read_pdu_data reads the 6-byte PDU header with recv(6), then the body with
    recv(length); an OSError from the second read closes the connection (Evt17); a short result (the peer
    closed) is its "shorter than expected" case. pynetdicom's own recv reads 4096 bytes per call, each after
    a poll (the socket has a timeout) and an extend: ~250 system calls for a 512x512 CT slice."""

    pdata_max = 0  # set per listener
    _pdu_type = 0

    def recv(self, nr_bytes: int) -> bytearray:
        if nr_bytes == 6:
            data = super().recv(6)
            self._pdu_type = data[0] if data else 0
            return data
        limit = self.pdata_max if self._pdu_type == 0x04 else CONTROL_PDU_MAX
        if nr_bytes > limit:
            conn = _connections.get(self.assoc)
            if conn is not None:
                conn.fault("oversize_pdu")
            raise OSError(f"PDU of {nr_bytes} bytes, limit {limit}")
        sock = self.socket
        if sock is None:
            return super().recv(nr_bytes)
        buffer = bytearray(nr_bytes)
        view = memoryview(buffer)
        got = 0
        try:
            while got < nr_bytes:
                n = sock.recv_into(view[got:], nr_bytes - got)
                if not n:  # the peer closed: what was read, as pynetdicom's recv returns it
                    break
                got += n
        finally:
            view.release()
        if got < nr_bytes:
            del buffer[got:]
        return buffer


class _Contexts(list):
    """The listener's supported presentation contexts. pynetdicom 3.0.4 deep-copies them for every connection
    (RequestHandler._create_association): ~0.1 s of CPU for every storage class x every transfer syntax, spent
    on every connection that sends a byte. The UIDs are immutable strings: a copy needs new context objects
    and new transfer syntax lists only."""

    def __deepcopy__(self, memo: dict) -> list[PresentationContext]:
        out = []
        for cx in self:
            twin = copy.copy(cx)
            twin._transfer_syntax = list(cx._transfer_syntax)
            out.append(twin)
        return out


class _Handler(RequestHandler):
    """pynetdicom's request handler; each association reads through _BoundedReads and is linked to its
    connection before it starts."""

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        assoc.dul.socket.__class__ = _BoundedReads  # type: ignore[union-attr]
        assoc.dul.__class__ = _WakingDUL
        assoc.dul._fast = _FastStores(assoc.dul, self.server.receiver)  # type: ignore[attr-defined]
        assoc.dul.socket.pdata_max = self.server.pdata_max  # type: ignore[union-attr,attr-defined]
        self.server.attach(assoc)  # type: ignore[attr-defined]
        return assoc


def _end_wait_for_request(assoc: Association) -> None:
    """pynetdicom's acceptor waits for the A-ASSOCIATE indication for the whole ACSE timeout, even once the
    connection is gone (Association.run_reactor; the state machine's AA-5 gives it nothing): an empty
    indication ends that wait the way the timeout does."""
    assoc.dul.to_user_queue.put(None)  # type: ignore[arg-type]


# --- the listener ----------------------------------------------------------------------------------------


class _SharedPortServer(ThreadedAssociationServer):
    """pynetdicom's server on a listening socket the node opened and every receiver process accepts from
    (open_listeners; without one, it binds its own with SO_REUSEPORT), TCP_NODELAY on every accepted socket,
    and defences against hostile and broken traffic:

    - limits of connections per source address and in total, checked in the accept loop (over a limit: closed
      at once, a WARNING per address and limit every LIMIT_LOG_SECONDS);
    - a watcher thread that holds admitted connections until their first byte (no thread, no association for
      a scan or a silent peer), closes them after the associate timeout, and reaps (_reap);
    - the TLS handshake in the connection's own thread, bounded by the associate timeout;
    - a socket timeout (the idle timeout), so that a peer silent inside a PDU cannot hold a thread;
    - one WARNING and one count per connection for what the peer got wrong (_PeerFaults, _on_transition)."""

    request_queue_size = 256  # the accept backlog (socketserver's default, 5, drops bursts of connections)

    def __init__(self, *args: Any, settings: Settings, listener: socket.socket | None = None, **kwargs: Any) -> None:
        self.limits = settings
        self._listener = listener
        # a P-DATA-TF PDU is at most what we announced (with some slack: pynetdicom never enforced it, and some
        # senders round up), or with no limit announced, the largest instance
        self.pdata_max = settings.max_pdu + 65536 if settings.max_pdu else settings.max_instance_bytes + CONTROL_PDU_MAX
        self._conns: dict[socket.socket, _Connection] = {}
        self._conns_lock = threading.Lock()
        self._local = threading.local()
        self._refusals: dict[tuple[str, str], tuple[float, int]] = {}
        self._stopped = threading.Event()
        self._next_gc = time.monotonic() + GC_SECONDS
        self._arrivals: queue.SimpleQueue[tuple[socket.socket, Any]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        super().__init__(*args, request_handler=_Handler, **kwargs)
        self.contexts = _Contexts(self.contexts)
        self.bind(evt.EVT_REQUESTED, self._on_requested)
        self.bind(evt.EVT_FSM_TRANSITION, self._on_transition)
        threading.Thread(target=self._watch, name=f"scp-watch-{self.server_address[1]}", daemon=True).start()

    def server_bind(self) -> None:
        if self._listener is None:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            super().server_bind()
            return
        # The node's listening socket, shared by the receivers: every receiver waits on it and whichever is
        # first to run takes a connection, so a busy receiver (its threads hold the interpreter) leaves new
        # associations to the others. With SO_REUSEPORT the kernel hashed each connection to one receiver: in
        # one measured run all 4 associations of a sender went to one receiver (384 img/s, 509-565 when 2/2).
        self.socket.close()
        self.socket = self._listener
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        if self._listener is None:
            super().server_activate()

    def server_close(self) -> None:
        if self._listener is None:
            super().server_close()
        else:  # this process's copy only: a shutdown() would stop the listening of every receiver
            self.socket.close()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client, address = self.socket.accept()  # BlockingIOError where another receiver took it: ignored
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.settimeout(self.limits.dicom_idle_timeout)  # no recv/send blocks longer than this
        return client, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Admit a connection within the limits (per source address, total), else close it at once. At a limit,
        a connection that has sent nothing for EVICT_SECONDS makes room first (the oldest one of the address
        holding the most connections): silent connections never keep a talking client out."""
        host = client_address[0]
        with self._conns_lock:
            live = [c for c in self._conns.values() if not c.over]
            same = [c for c in live if c.host == host]
            if len(live) >= self.limits.dicom_max_associations:
                full, reason, limit = live, "total_limit", self.limits.dicom_max_associations
            elif len(same) >= self.limits.dicom_max_per_source:
                full, reason, limit = same, "per_source_limit", self.limits.dicom_max_per_source
            else:
                full = []
            victim = self._victim(full) if full else None
            if not full or victim is not None:
                self._conns[request] = _Connection(host, request)
        if not full:
            return True
        if victim is not None:
            victim.reason = "evicted"
            _hang_up(victim.sock)  # the watcher sees its end and closes it
            self._refused(victim.host, "evicted", len(full), limit)
            return True
        self._refused(host, reason, len(full), limit)
        return False

    def _victim(self, conns: list[_Connection]) -> _Connection | None:
        """The connection to close to make room: silent for EVICT_SECONDS, of the busiest address, oldest."""
        now = time.monotonic()
        silent = [c for c in conns if c.waiting and c.reason is None and now - c.accepted >= EVICT_SECONDS]
        if not silent:
            return None
        per_host: dict[str, int] = {}
        for c in conns:
            per_host[c.host] = per_host.get(c.host, 0) + 1
        return min(silent, key=lambda c: (-per_host[c.host], c.accepted))

    def _refused(self, host: str, reason: str, count: int, limit: int) -> None:
        """Count a connection refused (or evicted) at a limit; log it once per address, reason and
        LIMIT_LOG_SECONDS, with how many more there were in between."""
        metrics.dicom_rejected(reason)
        now = time.monotonic()
        last, more = self._refusals.get((host, reason), (0.0, 0))
        if now - last < LIMIT_LOG_SECONDS:
            self._refusals[(host, reason)] = (last, more + 1)
            return
        self._refusals[(host, reason)] = (now, 0)
        since = f"; {more} more since the last line" if more else ""
        if reason == "evicted":
            log.warning("DICOM connection from %s closed to make room: it sent nothing for %.0f s, %d connections "
                        "open, limit %d per receiver (evicted)%s", host, EVICT_SECONDS, count, limit, since)
            return
        where = "from this address" if reason == "per_source_limit" else "in all"
        log.warning("DICOM connection from %s refused: %d connections open %s, limit %d per receiver (%s)%s",
                    host, count, where, limit, reason, since)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Hand an admitted connection to the watcher: no thread and no association until its first bytes."""
        self._arrivals.put((request, client_address))
        self._wake_w.send(b"\0")

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        conn_key = request
        with self._conns_lock:
            conn = self._conns.get(conn_key)
        self._local.conn = conn
        try:
            if self.ssl_context and conn is not None:
                request = self._handshake(request, conn)
                if request is None:
                    return
            super().process_request_thread(request, client_address)
        finally:
            self._local.conn = None
            if conn is not None and (conn.assoc is None or conn.assoc.ident is None):  # no association started
                with self._conns_lock:
                    self._conns.pop(conn_key, None)
                _connections.pop(conn.assoc, None)  # type: ignore[arg-type]

    def _handshake(self, request: socket.socket, conn: _Connection) -> ssl.SSLSocket | None:
        """TLS in the connection's own thread (never in the accept loop), bounded by the associate timeout."""
        assert self.ssl_context is not None
        request.settimeout(self.limits.dicom_associate_timeout)
        try:
            tls = self.ssl_context.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
            conn.sock = tls
            tls.do_handshake()
        except (OSError, ssl.SSLError):
            conn.fault("tls_handshake")
            self.shutdown_request(conn.sock)
            return None
        tls.settimeout(self.limits.dicom_idle_timeout)
        return tls

    def attach(self, assoc: Association) -> None:
        """Link a new acceptor association to its connection (in the connection's thread, before it starts)."""
        conn = self._local.conn
        if conn is not None:
            conn.assoc = assoc
            _connections[assoc] = conn

    def _on_requested(self, event: evt.Event) -> None:
        conn = _connections.get(event.assoc)
        if conn is not None:
            conn.requested = True

    def _on_transition(self, event: evt.Event) -> None:
        """Client faults pynetdicom handles without a log line: a PDU other than A-ASSOCIATE-RQ on a new
        connection (AA-1 from Sta2), a PDU not allowed in the state (AA-8), no A-ASSOCIATE-RQ before the
        ARTIM timer (AA-2 on Evt18 in Sta2), and the association rejected (AE-8)."""
        action = event.action
        if action not in ("AA-1", "AA-2", "AA-8", "AE-8"):
            return
        conn = _connections.get(event.assoc)
        if conn is None:
            return
        if action == "AE-8":
            conn.fault("association_rejected")
        elif action == "AA-2":
            if event.current_state == "Sta2" and event.fsm_event == "Evt18":
                conn.fault("associate_timeout")
        elif action == "AA-8" or event.current_state == "Sta2":
            conn.fault("unexpected_pdu")

    def _watch(self) -> None:
        """The listener's watcher thread: waits for the first bytes of admitted connections (a port scan or a
        health check that closes without sending anything never gets a thread or an association; a silent
        connection costs no thread), then starts the connection's thread; and reaps (see _reap)."""
        waiting = selectors.DefaultSelector()
        waiting.register(self._wake_r, selectors.EVENT_READ)
        next_reap = 0.0
        while not self._stopped.is_set():
            try:
                next_reap = self._watch_once(waiting, next_reap)
            except Exception:  # the watcher must outlive any one connection
                log.exception("DICOM listener: watching connections failed")
                self._stopped.wait(REAP_SECONDS)
        for key in list(waiting.get_map().values()):
            if key.fileobj is not self._wake_r:
                self.shutdown_request(key.fileobj)
        waiting.close()

    def _watch_once(self, waiting: selectors.BaseSelector, next_reap: float) -> float:
        """One round: start threads for connections whose first bytes came, take new arrivals, reap."""
        for key, _ in waiting.select(REAP_SECONDS):
            if key.fileobj is self._wake_r:
                self._wake_r.recv(4096)
                continue
            waiting.unregister(key.fileobj)
            with self._conns_lock:
                self._conns[key.fileobj].waiting = False
            self._first_bytes(key.fileobj, key.data)
        while not self._arrivals.empty():
            request, client_address = self._arrivals.get()
            with self._conns_lock:
                self._conns[request].waiting = True
            waiting.register(request, selectors.EVENT_READ, client_address)
        if time.monotonic() >= next_reap:
            next_reap = time.monotonic() + REAP_SECONDS
            self._reap(waiting)
        return next_reap

    def _first_bytes(self, request: socket.socket, client_address: Any) -> None:
        """A waiting connection became readable: bytes (start its thread) or its end (close it)."""
        try:
            closed = not request.recv(1, socket.MSG_PEEK)
        except OSError:
            closed = True
        if closed:
            log.debug("DICOM connection from %s closed before sending anything", client_address[0])
            self.shutdown_request(request)
            with self._conns_lock:
                self._conns.pop(request, None)
            return
        super().process_request(request, client_address)  # socketserver.ThreadingMixIn: a thread for it

    def _reap(self, waiting: selectors.BaseSelector) -> None:
        """Close connections without a complete A-ASSOCIATE-RQ after the associate timeout, let the threads of
        closed connections go, and forget connections whose threads have ended."""
        now = time.monotonic()
        with self._conns_lock:
            conns = list(self._conns.items())
        for key, conn in conns:
            assoc = conn.assoc
            if conn.waiting and now - conn.accepted > self.limits.dicom_associate_timeout:
                conn.waiting = False
                waiting.unregister(key)
                conn.fault("associate_timeout")
                self.shutdown_request(key)
                with self._conns_lock:
                    self._conns.pop(key, None)
            elif conn.over:
                if assoc is not None and not conn.requested and not conn.woken and assoc.is_alive():
                    conn.woken = True
                    _end_wait_for_request(assoc)
            elif conn.reason is not None and now - conn.faulted > FAULT_CLOSE_SECONDS:
                # after a fault pynetdicom sends an A-ABORT and may then wait inside a read for the rest of a
                # PDU that never comes (the ARTIM timer cannot fire there): end it
                _hang_up(conn.sock)
            elif not conn.requested and now - conn.accepted > self.limits.dicom_associate_timeout:
                conn.fault("associate_timeout")
                _hang_up(conn.sock)
            if assoc is not None and assoc.ident is not None and not assoc.is_alive():
                if conn.sock.fileno() != -1:  # pynetdicom closes it; this is the backstop against a leak
                    self.shutdown_request(conn.sock)
                with self._conns_lock:
                    self._conns.pop(key, None)
                _connections.pop(assoc, None)
        for key, (last, _) in list(self._refusals.items()):
            if now - last >= LIMIT_LOG_SECONDS:
                del self._refusals[key]

    def service_actions(self) -> None:
        """Called by serve_forever every round. pynetdicom 3.0.4 runs gc.collect() every 60 rounds, which in
        a flood of connections is every 60 connections: here at most every GC_SECONDS."""
        if time.monotonic() >= self._next_gc:
            self._next_gc = time.monotonic() + GC_SECONDS
            gc.collect()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.exception("DICOM connection from %s: unexpected error", client_address[0])

    def shutdown(self) -> None:
        self._stopped.set()
        self._wake_w.send(b"\0")
        super().shutdown()


def tls_context(settings: Settings) -> ssl.SSLContext:
    """Server-side TLS context from the settings; peers must present a certificate when a CA is set."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(settings.tls_cert), str(settings.tls_key))
    if settings.tls_ca is not None:
        ctx.load_verify_locations(str(settings.tls_ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class _WakingDUL(DULServiceProvider):
    """A DUL reactor that, where pynetdicom 3.0.4 sleeps between looks at its socket and its queues
    (run_reactor: time.sleep(_run_loop_delay) after a round without events), waits for its socket to become
    readable or for a primitive to send (send_pdu, a stop), at most _ShortSleeps.WAIT_SECONDS. The eventfd that
    wakes it lives while its thread runs."""

    _wake_fd: int | None = None
    _fast: _FastStores | None = None  # set by _Handler
    _wake_lock = threading.Lock()  # guards _wake_fd across the threads that wake it (one lock: short holds)

    def run(self) -> None:
        try:
            super().run()
        finally:
            if self._fast is not None:  # what a store cut short held: freed now, not when the cycles are collected
                self._fast.close()
            with self._wake_lock:
                if self._wake_fd is not None:
                    os.close(self._wake_fd)
                    self._wake_fd = None

    def _wake(self) -> None:
        with self._wake_lock:
            if self._wake_fd is not None:
                os.eventfd_write(self._wake_fd, 1)

    def send_pdu(self, primitive: Any) -> None:
        super().send_pdu(primitive)
        self._wake()

    def kill_dul(self) -> None:
        super().kill_dul()
        self._wake()

    def stop_dul(self) -> bool:
        if self.state_machine.current_state == "Sta1":
            self._kill_thread = True
            self._wake()
        return super().stop_dul()

    def _is_transport_event(self) -> bool:
        try:
            return super()._is_transport_event()
        except _Taken:
            return True

    def _decode_pdu(self, bytestream: bytearray) -> tuple[Any, str]:
        fast = self._fast
        if (fast is not None and bytestream[:1] == b"\x04" and self.state_machine.current_state == "Sta6"
                and fast.take(memoryview(bytestream)[6:])):
            raise _Taken
        return super()._decode_pdu(bytestream)

    def deliver(self, bytestream: bytes) -> None:
        """Decode a PDU and queue its event, as the end of pynetdicom's _read_pdu_data does."""
        try:
            pdu, event = super()._decode_pdu(bytearray(bytestream))
        except Exception as exc:
            pynetdicom.dul.LOGGER.error("Unable to decode the received PDU data")
            pynetdicom.dul.LOGGER.exception(exc)
            self.event_queue.put("Evt19")
            return
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)

    def wait(self, timeout: float) -> None:
        """In this DUL's thread: until the socket is readable, a primitive is queued or `timeout` passes."""
        if self._wake_fd is None:
            with self._wake_lock:
                self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        sock = self.socket.socket if self.socket is not None else None
        if (sock is None or sock.fileno() == -1 or not self.to_provider_queue.empty()
                or (isinstance(sock, ssl.SSLSocket) and sock.pending())):
            time.sleep(_ShortSleeps.POLL_SECONDS)
            return
        try:
            select.select([sock, self._wake_fd], [], [], timeout)
            os.eventfd_read(self._wake_fd)
        except (BlockingIOError, OSError, ValueError):  # no wake-up pending; or the socket closed meanwhile
            pass


class _Taken(BaseException):
    """Raised by _WakingDUL._decode_pdu when _FastStores took a P-DATA-TF PDU: it passes pynetdicom's
    `except Exception` in _read_pdu_data and ends in _WakingDUL._is_transport_event (a PDU was read)."""


class _FastStores:
    """The C-STORE fast path of one acceptor association, in its DUL thread. pynetdicom 3.0.4 hands every
    P-DATA-TF PDU through its state machine, its DIMSE message assembly and a queue to the association's
    thread, which runs the handler and sends the response back through the DUL's queue: ~1.5 ms of CPU and
    two thread hand-offs per instance. Here the PDU's items are read as they come (node/ingest/pdata.py); a
    plain C-STORE request, on its accepted presentation context, while pynetdicom has nothing in hand, is
    stored by Receiver.store and answered from this thread. Every other message (C-ECHO, the UPS services, a
    command this reader does not take as is) is handed to pynetdicom whole, in order, as a P-DATA-TF PDU of
    its items; anything out of order (a data set without a command, another context in mid-message, an item
    that does not parse) hands pynetdicom everything still held and turns the fast path off for the
    association, so pynetdicom answers it as it always did."""

    IDLE, COMMAND, STORE, OTHER, OFF = range(5)

    def __init__(self, dul: _WakingDUL, receiver: Receiver) -> None:
        self.dul, self.receiver = dul, receiver
        self.mode = self.IDLE
        self.held: list[memoryview] = []  # the current message's items, whole, not yet handed to pynetdicom
        self.command: list[memoryview] = []
        self.data: list[memoryview] = []
        self.context_id = 0
        self.request: pdata.StoreRequest | None = None

    def take(self, body: memoryview) -> bool:
        """Take the items of a P-DATA-TF PDU body; False: pynetdicom decodes the whole PDU itself."""
        if self.mode == self.OFF:
            return False
        items = pdata.items(body)
        if items is None:  # pynetdicom says what is wrong with it, after what is held
            self._off([])
            return False
        forward: list[memoryview] = []  # items of this PDU for pynetdicom, handed over in order
        for item in items:
            command, last = item.header & pdata.COMMAND, item.header & pdata.LAST
            if self.mode == self.OFF:
                forward.append(item.raw)
            elif self.mode == self.OTHER:
                if command:
                    self._off(forward)
                    forward = [item.raw]
                    continue
                forward.append(item.raw)
                if last:
                    self.mode = self.IDLE
            elif self.mode == self.IDLE:
                if not command:
                    self._off(forward)
                    forward = [item.raw]
                    continue
                self.mode, self.context_id = self.COMMAND, item.context_id
                self.held, self.command = [item.raw], [item.fragment]
                if last:
                    forward = self._decide(forward)
            elif item.context_id != self.context_id or (self.mode == self.COMMAND) != bool(command):
                self._off(forward)
                forward = [item.raw]
            elif self.mode == self.COMMAND:
                self.held.append(item.raw)
                self.command.append(item.fragment)
                if last:
                    forward = self._decide(forward)
            else:  # STORE: a fragment of the request's data set
                self.held.append(item.raw)
                self.data.append(item.fragment)
                if last:
                    self._store()
        if forward:
            self._hand(forward)
        return True

    def _decide(self, forward: list[memoryview]) -> list[memoryview]:
        """The command set is complete: a C-STORE this path stores, or a message for pynetdicom."""
        if forward:  # pynetdicom's messages first; it then has one in hand, and takes this one too
            self._hand(forward)
        elements = pdata.command_elements(b"".join(self.command))
        self.command = []
        more = pdata.has_data_set(elements) if elements is not None else None
        if more is None:  # pynetdicom says what is wrong with it
            self._off([])
            return []
        request = pdata.store_request(elements, self.context_id)
        context = self.dul.assoc._accepted_cx.get(self.context_id)
        if request is not None and context is not None and context.abstract_syntax == request.sop_class_uid \
                and self._pynetdicom_idle():
            self.mode, self.request, self.data = self.STORE, request, []
            return []
        self.mode = self.OTHER if more else self.IDLE
        held, self.held = self.held, []
        return held

    def _pynetdicom_idle(self) -> bool:
        """pynetdicom holds no PDU, message or primitive of this association: a response sent from here does
        not overtake one of its own (a peer that waits for each response, as one without asynchronous
        operations negotiated must, never has a request with pynetdicom when it sends the next)."""
        dul, assoc = self.dul, self.dul.assoc
        return (dul.event_queue.empty() and dul._recv_pdu.empty() and dul.to_provider_queue.empty()
                and assoc.dimse.message is None and assoc.dimse.msg_queue.empty()
                and not assoc._sent_release and assoc.is_established)

    def _store(self) -> None:
        request, data = self.request, self.data
        self.mode, self.request, self.data, self.held = self.IDLE, None, [], []
        assert request is not None
        assoc = self.dul.assoc
        context = assoc._accepted_cx[request.context_id]
        try:
            status, comment = self.receiver.store(assoc, request.sop_class_uid, request.sop_instance_uid,
                                                  context.transfer_syntax[0], data)
        except Exception:  # as pynetdicom answers a handler that raises
            log.exception("C-STORE: the store failed")
            status, comment = 0xC211, None
        data.clear()
        self.dul.socket.send(pdata.store_response(request, status, comment, assoc.requestor.maximum_length))

    def close(self) -> None:
        """The association is over: drop what is held."""
        self.mode, self.held, self.command, self.data, self.request = self.OFF, [], [], [], None

    def _off(self, forward: list[memoryview]) -> None:
        """Hand pynetdicom what is held and `forward`, and leave it every later PDU."""
        pending = self.held + forward
        self.mode, self.held, self.command, self.data, self.request = self.OFF, [], [], [], None
        if pending:
            self._hand(pending)

    def _hand(self, raw_items: list[memoryview]) -> None:
        """Hand items to pynetdicom as one P-DATA-TF PDU, as its _read_pdu_data hands a PDU it read."""
        self.dul.deliver(pdata.pdu(raw_items))


class _ShortSleeps:
    """pynetdicom polls: the association reactor looks at its DIMSE queue every 1 ms, the DUL reactor at its
    socket and queues every `_run_loop_delay`; short sleeps cut the latency of every C-STORE round trip, but
    at 0.2 ms they cost ~20 % of a core per association, idle or not. In the receivers both threads wait for
    what they poll for instead, at most WAIT_SECONDS (then they look at their timers, release and abort as
    before): the association reactor (its 1 ms sleep) for a message on its DIMSE queue, an acceptor's DUL for
    its socket or a primitive to send (_WakingDUL). Other sleeps are capped at POLL_SECONDS."""

    POLL_SECONDS = 0.0002
    WAIT_SECONDS = 0.005

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        thread = threading.current_thread()
        if isinstance(thread, _WakingDUL):
            thread.wait(self.WAIT_SECONDS)
        elif isinstance(thread, Association) and seconds == 0.001 and thread.dimse is not None:  # its reactor
            waiting = thread.dimse.msg_queue
            with waiting.not_empty:  # holds the queue's mutex: its _qsize, not qsize
                if not waiting._qsize():
                    waiting.not_empty.wait(self.WAIT_SECONDS)
                if waiting._qsize():  # put() wakes one waiter: pass it on in case a get() waits too
                    waiting.not_empty.notify()
        else:
            time.sleep(min(seconds, self.POLL_SECONDS))


def tighten_polling() -> None:
    """Replace pynetdicom's polling sleeps in this process (receiver processes only): see _ShortSleeps."""
    import pynetdicom.association
    import pynetdicom.dul

    pynetdicom.association.time = _ShortSleeps()  # type: ignore[assignment]
    pynetdicom.dul.time = _ShortSleeps()  # type: ignore[assignment]


def cache_uid_checks() -> None:
    """Cache the answers of pynetdicom's UI validator and of pydicom's UID.is_valid in this process (receiver
    processes only). An association's negotiation checks every proposed abstract and transfer syntax several
    times over, a regex each time: for storescu's 128 proposed contexts some 3,500 checks, a third of the ~20 ms
    of CPU an association cost a receiver. The same few hundred UIDs come back with every association; the
    answers are the same, only cached."""
    if not hasattr(pynetdicom._config.VALIDATORS["UI"], "cache_info"):  # cached already
        pynetdicom._config.VALIDATORS["UI"] = functools.lru_cache(maxsize=4096)(pynetdicom._config.VALIDATORS["UI"])
    pydicom.uid.UID.is_valid = property(_uid_is_valid)  # type: ignore[method-assign,assignment]


@functools.lru_cache(maxsize=4096)
def _uid_is_valid(uid: str) -> bool:
    """pydicom's UID.is_valid (pydicom 3.0), cached."""
    return len(uid) <= 64 and pydicom.uid.RE_VALID_UID.match(uid) is not None


def build_ae(settings: Settings) -> AE:
    """The acceptor AE: every storage SOP class with every transfer syntax, plus Verification and the UPS worklist
    (Push, Pull; node/ups/dimse.py)."""
    ae = AE(ae_title=settings.ae_title)
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
    for sop_class in UPS_SOP_CLASSES:
        ae.add_supported_context(sop_class)
    # our listener enforces the limits (per source, total) before a thread starts; pynetdicom's own count of
    # association threads includes those finishing, so it only backs ours up
    ae.maximum_associations = 2 * settings.dicom_max_associations
    ae.maximum_pdu_size = settings.max_pdu
    ae.network_timeout = settings.dicom_idle_timeout  # an association with no PDU this long is aborted
    ae.dimse_timeout = settings.dicom_idle_timeout
    ae.acse_timeout = settings.dicom_associate_timeout  # ARTIM: the A-ASSOCIATE-RQ must come within this
    if settings.allowed_aes:
        ae.require_calling_aet = list(settings.allowed_aes)
    return ae


def listen_addresses(settings: Settings) -> list[tuple[str, int, bool]]:
    """(host, port, tls) for every listener the settings ask for."""
    out = []
    if settings.dicom_port:
        out.append((settings.dicom_host, settings.dicom_port, False))
    if settings.tls_enabled:
        out.append((settings.dicom_host, settings.tls_port, True))
    return out


def open_listeners(settings: Settings) -> list[socket.socket]:
    """The listening sockets of listen_addresses, in the node process, for its receivers to share (non-blocking:
    a receiver woken for a connection another took goes back to waiting). Raises OSError."""
    out = []
    try:
        for host, port, _ in listen_addresses(settings):
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
            out.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(_SharedPortServer.request_queue_size)
            sock.setblocking(False)
    except OSError:
        for sock in out:
            sock.close()
        raise
    return out


def start_servers(settings: Settings, receiver: Receiver, listeners: list[socket.socket] | None = None,
                  ) -> tuple[AE, list[ThreadedAssociationServer]]:
    """Start the listeners of this process (non-blocking), on `listeners` (open_listeners, in the order of
    listen_addresses) or on sockets of their own. Raises OSError if a port cannot be bound."""
    ae = build_ae(settings)
    handlers = [
        (evt.EVT_C_STORE, receiver.handle_store),
        (evt.EVT_C_ECHO, receiver.handle_echo),
        *ups_handlers(receiver.ingest.sessionmaker),
        (evt.EVT_ESTABLISHED, receiver.handle_association),
    ]
    servers = []
    for i, (host, port, tls) in enumerate(listen_addresses(settings)):
        server = ae.make_server(
            (host, port),
            evt_handlers=handlers,
            ssl_context=tls_context(settings) if tls else None,
            server_class=_SharedPortServer,
            settings=settings,
            listener=listeners[i] if listeners else None,
        )
        server.receiver = receiver  # type: ignore[attr-defined]
        thread = threading.Thread(target=server.serve_forever, name=f"scp-{port}", daemon=True)
        thread.start()
        ae._servers.append(server)
        servers.append(server)
    return ae, servers


def stop_servers(ae: AE, servers: list[ThreadedAssociationServer], grace: float = STOP_GRACE_SECONDS) -> None:
    """Stop accepting and release the port (pynetdicom's shutdown closes the listening socket), then give
    running associations `grace` seconds to finish."""
    for server in servers:
        server.shutdown()
    deadline = time.monotonic() + grace
    # connections that never sent an association request (port probes) are not waited for
    while any(a.is_established for a in ae.active_associations) and time.monotonic() < deadline:
        time.sleep(0.05)


def _few_malloc_arenas() -> None:
    """glibc gives each thread that allocates under contention an arena of its own (up to 8 per core) and
    rarely hands their free pages back: a receiver's threads come and go with the associations, and its
    resident memory crept up by the arenas they left (a PDU fuzz of 1,600 sessions: +20 MB against +12 MB
    with two arenas). Two arenas, set before the listener starts its threads."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-8, 2)  # M_ARENA_MAX
    except (OSError, AttributeError):  # not glibc: its own allocator's business
        pass


def receiver_main(settings_data: dict[str, Any], index: int, ready: Any, node_pid: int,
                  listeners: list[socket.socket] | None = None) -> None:
    """Entry point of one receiver process (spawned by the node); runs until SIGTERM/SIGINT, which also
    comes when the node dies, however it dies."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    die_with_parent(node_pid, signal.SIGTERM, grace=STOP_GRACE_SECONDS + 5, what=f"receiver {index}")
    settings = Settings(**settings_data)
    setup_logging(settings.log_level, settings.log_json, settings.uid_hash_salt.get_secret_value())
    _few_malloc_arenas()
    # pydicom checks every UID pynetdicom builds (several per C-STORE) against its regex and only warns: the
    # receiver checks the UIDs it uses itself (node.dicom.header.check_uid), so that is CPU spent for nothing
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    tighten_polling()
    cache_uid_checks()
    quiet_peer_faults()
    store = InstanceStore(settings.instances_dir, settings.tmp_dir, settings.min_free_bytes)
    engine = make_engine(settings.db_url)
    receiver = Receiver(Ingest(settings, make_sessionmaker(engine), store))
    try:
        ae, servers = start_servers(settings, receiver, listeners)
    except OSError as exc:
        ready.put((index, f"cannot listen: {exc}"))
        return
    ready.put((index, None))
    stop.wait()
    if os.getppid() != node_pid:
        log.error("node process gone; receiver %d stopping", index)
    stop_servers(ae, servers)
    engine.dispose()


def spawn_receiver(settings: Settings, index: int, ready: Any, listeners: list[socket.socket] | None = None,
                   ) -> mp.process.BaseProcess:
    ctx = mp.get_context("spawn")
    proc = ctx.Process(
        target=receiver_main,
        args=(settings.model_dump(), index, ready, os.getpid(), listeners),
        name=f"radnode-receiver-{index}",
        daemon=False,
    )
    proc.start()
    return proc
