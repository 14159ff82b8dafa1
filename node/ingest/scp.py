"""Receive step: the DICOM SCP (C-ECHO, C-STORE), durable write then acknowledge, in N processes."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import socket
import ssl
import threading
import time
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from db.session import make_engine, make_sessionmaker
from node.dicom.status import Status
from node.ingest.ingest import Ingest
from node.ingest.storage import InstanceStore
from node.logs import setup_logging
from node.process import die_with_parent
from node.settings import Settings

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
        """Store one instance durably and record it; never raises (errors become statuses)."""
        calling = event.assoc.requestor.ae_title.strip() or None
        try:
            data = event.encoded_dataset(include_meta=True)
        except Exception:
            log.exception("C-STORE: could not read the received data set")
            stored = self.ingest.refused("dimse", calling, Status.CANNOT_UNDERSTAND, "cannot read data set", 0)
        else:
            request = event.request
            stored = self.ingest.store(data, calling, source="dimse", sop_class_uid=request.AffectedSOPClassUID,
                                       sop_instance_uid=request.AffectedSOPInstanceUID)
        return stored.status if stored.ok else _status(stored.status, stored.reason)

    def handle_association(self, event: evt.Event) -> None:
        event.assoc.dul._run_loop_delay = _ShortSleeps.POLL_SECONDS  # see tighten_polling
        log.info("association from AE %s (%s)", event.assoc.requestor.ae_title, event.assoc.requestor.address)


class _SharedPortServer(ThreadedAssociationServer):
    """pynetdicom's server with SO_REUSEPORT (several receiver processes share one port),
    TCP_NODELAY on every accepted socket, and a bounded TLS handshake."""

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client, address = self.socket.accept()
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.ssl_context:
            client.settimeout(30)
            try:
                client = self.ssl_context.wrap_socket(client, server_side=True)
            except (OSError, ssl.SSLError):
                log.warning("TLS handshake failed from %s", address[0])
                client.close()
                raise
            client.settimeout(None)
        return client, address


def tls_context(settings: Settings) -> ssl.SSLContext:
    """Server-side TLS context from the settings; peers must present a certificate when a CA is set."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(settings.tls_cert), str(settings.tls_key))
    if settings.tls_ca is not None:
        ctx.load_verify_locations(str(settings.tls_ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class _ShortSleeps:
    """pynetdicom's association reactor polls its queues with 1 ms sleeps, which adds up to ~2 ms of
    idle latency to every C-STORE round trip. Cap its sleeps at POLL_SECONDS in the receivers."""

    POLL_SECONDS = 0.0002

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self.POLL_SECONDS))


def tighten_polling() -> None:
    """Shorten pynetdicom's polling sleeps in this process (receiver processes only)."""
    import pynetdicom.association

    pynetdicom.association.time = _ShortSleeps()  # type: ignore[assignment]


def build_ae(settings: Settings) -> AE:
    """The acceptor AE: every storage SOP class with every transfer syntax, plus Verification."""
    ae = AE(ae_title=settings.ae_title)
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
    ae.maximum_associations = 64
    ae.maximum_pdu_size = settings.max_pdu
    ae.network_timeout = 60
    ae.dimse_timeout = 60
    ae.acse_timeout = 30
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


def start_servers(settings: Settings, receiver: Receiver) -> tuple[AE, list[ThreadedAssociationServer]]:
    """Start the listeners of this process (non-blocking). Raises OSError if a port cannot be bound."""
    ae = build_ae(settings)
    handlers = [
        (evt.EVT_C_STORE, receiver.handle_store),
        (evt.EVT_C_ECHO, receiver.handle_echo),
        (evt.EVT_ESTABLISHED, receiver.handle_association),
    ]
    servers = []
    for host, port, tls in listen_addresses(settings):
        server = ae.make_server(
            (host, port),
            evt_handlers=handlers,
            ssl_context=tls_context(settings) if tls else None,
            server_class=_SharedPortServer,
        )
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


def receiver_main(settings_data: dict[str, Any], index: int, ready: Any, node_pid: int) -> None:
    """Entry point of one receiver process (spawned by the node); runs until SIGTERM/SIGINT, which also
    comes when the node dies, however it dies."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    die_with_parent(node_pid, signal.SIGTERM, grace=STOP_GRACE_SECONDS + 5, what=f"receiver {index}")
    settings = Settings(**settings_data)
    setup_logging(settings.log_level, settings.log_json, settings.uid_hash_salt.get_secret_value())
    tighten_polling()
    store = InstanceStore(settings.instances_dir, settings.tmp_dir, settings.min_free_bytes)
    engine = make_engine(settings.db_url)
    receiver = Receiver(Ingest(settings, make_sessionmaker(engine), store))
    try:
        ae, servers = start_servers(settings, receiver)
    except OSError as exc:
        ready.put((index, f"cannot listen: {exc}"))
        return
    ready.put((index, None))
    stop.wait()
    if os.getppid() != node_pid:
        log.error("node process gone; receiver %d stopping", index)
    stop_servers(ae, servers)
    engine.dispose()


def spawn_receiver(settings: Settings, index: int, ready: Any) -> mp.process.BaseProcess:
    ctx = mp.get_context("spawn")
    proc = ctx.Process(
        target=receiver_main,
        args=(settings.model_dump(), index, ready, os.getpid()),
        name=f"radnode-receiver-{index}",
        daemon=False,
    )
    proc.start()
    return proc
