"""Administrator's SCU: C-ECHO and C-STORE of files to a peer (TCP_NODELAY, one association)."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification

from node.dicom.association import keep_responses_for_their_caller

log = logging.getLogger("radnode.scu")

# Send a file's stored bytes as they are (no decode/re-encode that could drop or alter elements).
_config.STORE_SEND_CHUNKED_DATASET = True


class AssociationFailed(RuntimeError):
    """The peer rejected, aborted or did not answer the association request."""


@dataclass
class SendReport:
    sent: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _nodelay(assoc: Association) -> None:
    sock = assoc.dul.socket.socket if assoc.dul.socket else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def associate(
    host: str, port: int, called_ae: str, calling_ae: str, contexts: list, tls: object | None = None
) -> Association:
    """Open an association; raises AssociationFailed with the reason when it is not established."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.requested_contexts = contexts
    tls_args = (tls, host) if tls is not None else None
    assoc = ae.associate(host, port, ae_title=called_ae, tls_args=tls_args)
    if not assoc.is_established:
        reason = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "no answer"
        raise AssociationFailed(f"association with {called_ae}@{host}:{port} failed: {reason}")
    keep_responses_for_their_caller(assoc)
    _nodelay(assoc)
    return assoc


def echo(host: str, port: int, called_ae: str = "ANY-SCP", calling_ae: str = "RADNODE") -> int:
    """C-ECHO; returns the DIMSE status. Raises AssociationFailed."""
    assoc = associate(host, port, called_ae, calling_ae, [build_context(Verification)])
    try:
        status = assoc.send_c_echo()
        return int(status.Status) if "Status" in status else -1
    finally:
        assoc.release()


def send(
    files: list[Path],
    host: str,
    port: int,
    called_ae: str = "ANY-SCP",
    calling_ae: str = "RADNODE",
    progress: Callable[[Path, int], None] | None = None,
    tls: object | None = None,
) -> SendReport:
    """C-STORE every file over one association, proposing each file's own SOP class and transfer
    syntax (stored bytes are sent as they are). Raises AssociationFailed."""
    report = SendReport()
    readable = []
    pairs: dict[str, set[str]] = {}
    for f in files:
        try:
            ds = dcmread(f, stop_before_pixels=True)
            sop_class, ts = str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)
        except (InvalidDicomError, AttributeError, OSError, ValueError, EOFError, KeyError) as exc:
            report.skipped.append((str(f), f"not a DICOM file: {type(exc).__name__}"))
            continue
        pairs.setdefault(sop_class, set()).add(ts)
        readable.append(f)
    if not readable:
        return report
    # one context per (SOP class, transfer syntax) so each is accepted or refused on its own
    contexts = [build_context(sc, [ts]) for sc, syntaxes in pairs.items() for ts in sorted(syntaxes)]
    if len(contexts) > 128:
        raise ValueError("more than 128 SOP class/transfer syntax pairs: send them in smaller groups")
    assoc = associate(host, port, called_ae, calling_ae, contexts, tls=tls)
    try:
        for i, f in enumerate(readable):
            if not assoc.is_established:
                report.failed.extend((str(g), "association lost") for g in readable[i:])
                break
            try:
                # a path is sent as its stored bytes, without decoding and re-encoding
                status = assoc.send_c_store(f)
            except ValueError as exc:  # no accepted presentation context for this file
                report.failed.append((str(f), str(exc)))
                continue
            except Exception as exc:  # pynetdicom cannot prepare this file (e.g. malformed file meta)
                log.warning("cannot send %s", f.name, exc_info=True)
                report.failed.append((str(f), f"cannot send: {type(exc).__name__}"))
                continue
            code = int(status.Status) if "Status" in status else -1
            if code in (0x0000, 0xB000, 0xB006, 0xB007):
                report.sent += 1
            elif code < 0:
                report.failed.append((str(f), "no response"))
            else:
                comment = str(status.get("ErrorComment", "")).strip()
                report.failed.append((str(f), f"status 0x{code:04X} {comment}".strip()))
            if progress:
                progress(f, code)
    finally:
        if assoc.is_established:
            assoc.release()
    return report
