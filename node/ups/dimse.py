"""Worklist step over DIMSE: the UPS Push and UPS Pull SCP of the receiver processes (N-CREATE, N-ACTION change
state and request cancel, N-GET, N-SET, C-FIND), on the same Worklist and rules as UPS-RS. Every outcome is a
DIMSE status of PS3.4 CC.2 with an Error Comment; nothing raises into pynetdicom."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from pydicom import Dataset
from pynetdicom import evt
from sqlalchemy.exc import SQLAlchemyError

from node.logs import uid_hash
from node.ups.workitem import (
    CHANGE_STATE,
    REQUEST_CANCEL,
    UPS_PULL,
    UPS_PUSH,
    UPS_QUERY,
    UPS_WATCH,
    Status,
    UPSError,
    Worklist,
    select_keys,
)

log = logging.getLogger("radnode.ups")

SOP_CLASSES = (UPS_PUSH, UPS_PULL)  # the UPS SOP classes radnode's receivers accept (Watch and Event: no)
FIND_LIMIT = 1000  # C-FIND answers at most this many matches
CHARSET = "ISO_IR 192"  # workitems are stored as JSON (Unicode): answers are UTF-8


def _status(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds


class UPSProvider:
    """The DIMSE UPS handlers of one receiver process, bound to its database sessions. The installed plugins are
    read once, at the first workitem created here (manifests only, no models)."""

    def __init__(self, sessionmaker: Any) -> None:
        self._plugins: set[str] | None = None
        self.worklist = Worklist(sessionmaker, self.plugins)

    def plugins(self) -> set[str]:
        if self._plugins is None:
            from plugins.registry import discover

            self._plugins = set(discover().manifests)
        return self._plugins

    def _guard(self, what: str, event: evt.Event, run: Callable[[], tuple[Any, Dataset | None]]) -> tuple[Any, Any]:
        """Run one request; a refusal or a failure becomes its status."""
        try:
            return run()
        except UPSError as exc:
            log.info("UPS %s from AE %s refused: 0x%04X %s", what, _calling(event), exc.status, exc.message)
            return _status(exc.status, exc.message), None
        except SQLAlchemyError:
            log.exception("UPS %s: database error", what)
            return _status(Status.PROCESSING_FAILURE, "database unavailable; try again"), None
        except Exception as exc:  # a malformed data set or our own bug: a status, never a dropped association
            log.exception("UPS %s failed", what)
            return _status(Status.PROCESSING_FAILURE, f"processing failure ({type(exc).__name__})"), None

    def handle_n_create(self, event: evt.Event) -> tuple[Any, Dataset | None]:
        """N-CREATE (UPS Push): a new SCHEDULED workitem; 0xB300 when radnode added attributes."""
        def run() -> tuple[Any, Dataset | None]:
            request = event.request
            if request.AffectedSOPClassUID != UPS_PUSH:
                raise UPSError(Status.NO_SUCH_SOP_CLASS, 400, "UPS instances are created as UPS Push SOP Class")
            wanted = str(request.AffectedSOPInstanceUID) if request.AffectedSOPInstanceUID else None
            uid, outcome = self.worklist.create(event.attribute_list, wanted)
            reply = Dataset()
            if wanted is None:
                reply.AffectedSOPInstanceUID = uid  # pynetdicom moves it into the response
            if outcome.warning:
                return _status(outcome.status, outcome.warning), reply
            return outcome.status, reply

        return self._guard("N-CREATE", event, run)

    def handle_n_get(self, event: evt.Event) -> tuple[Any, Dataset | None]:
        """N-GET (UPS Push, Pull): the requested attributes (all when none are named), never the Transaction UID."""
        def run() -> tuple[Any, Dataset | None]:
            ds = self.worklist.retrieve(_requested(event))
            tags = event.request.AttributeIdentifierList or []
            tags = [tags] if not isinstance(tags, list) else tags
            out = Dataset()
            for elem in ds:
                if (not tags or elem.tag in tags) and elem.keyword != "TransactionUID":
                    out.add(elem)
            out.SpecificCharacterSet = CHARSET
            return Status.SUCCESS, out

        return self._guard("N-GET", event, run)

    def handle_n_set(self, event: evt.Event) -> tuple[Any, Dataset | None]:
        """N-SET (UPS Pull): update; an IN PROGRESS workitem only with its Transaction UID in the modification
        list."""
        def run() -> tuple[Any, Dataset | None]:
            changes = Dataset(event.modification_list)
            transaction_uid = str(changes.get("TransactionUID", "") or "") or None
            for keyword in ("TransactionUID", "SpecificCharacterSet"):
                if keyword in changes:
                    del changes[keyword]
            outcome = self.worklist.update(_requested(event), changes, transaction_uid)
            return outcome.status, None

        return self._guard("N-SET", event, run)

    def handle_n_action(self, event: evt.Event) -> tuple[Any, Dataset | None]:
        """N-ACTION: Change UPS State (type 1, UPS Pull) or Request UPS Cancel (type 2, UPS Push)."""
        def run() -> tuple[Any, Dataset | None]:
            uid, info, action = _requested(event), event.action_information, event.action_type
            if action == CHANGE_STATE:
                outcome = self.worklist.change_state(uid, str(info.get("ProcedureStepState", "") or ""),
                                                     str(info.get("TransactionUID", "") or "") or None)
            elif action == REQUEST_CANCEL:
                outcome = self.worklist.request_cancel(uid, info, f"AE {_calling(event)}")
            elif action in (3, 4, 5):
                raise UPSError(Status.NO_EVENT_REPORTS, 501,
                               "radnode does not send UPS event reports: poll the worklist")
            else:
                raise UPSError(Status.NO_SUCH_ACTION, 400, f"no N-ACTION type {action} for UPS")
            if outcome.warning:
                return _status(outcome.status, outcome.warning), None
            return outcome.status, None

        return self._guard("N-ACTION", event, run)

    def handle_c_find(self, event: evt.Event) -> Iterator[tuple[Any, Dataset | None]]:
        """C-FIND (UPS Pull): one pending answer per matching workitem with the requested return keys."""
        status, found = self._guard("C-FIND", event, lambda: (Status.SUCCESS, self._find(event)))
        if status != Status.SUCCESS:
            yield status, None
            return
        for ds in found:  # type: ignore[union-attr]
            if event.is_cancelled:
                yield 0xFE00, None
                return
            yield 0xFF00, ds

    def _find(self, event: evt.Event) -> list[Dataset]:
        if event.request.AffectedSOPClassUID not in (UPS_PULL, UPS_WATCH, UPS_QUERY):
            raise UPSError(Status.IDENTIFIER_MISMATCH, 400, "C-FIND of UPS uses the UPS Pull SOP Class")
        keys = Dataset(event.identifier)
        found, more = self.worklist.search(keys, 0, FIND_LIMIT)
        if more:
            log.warning("UPS C-FIND from AE %s: more than %d matches, the first %d answered", _calling(event),
                        FIND_LIMIT, FIND_LIMIT)
        out = []
        for ds in found:
            match = select_keys(ds, keys)
            match.SpecificCharacterSet = CHARSET
            out.append(match)
        log.info("UPS C-FIND from AE %s: %d match(es)", _calling(event), len(out))
        return out


def _requested(event: evt.Event) -> str:
    uid = event.request.RequestedSOPInstanceUID
    if not uid:
        raise UPSError(Status.NO_SUCH_UPS, 404, "no Requested SOP Instance UID")
    log.debug("UPS request for %s", uid_hash(str(uid)))
    return str(uid)


def _calling(event: evt.Event) -> str:
    return event.assoc.requestor.ae_title.strip() or "?"


def ups_handlers(sessionmaker: Any) -> list[tuple[Any, Callable[..., Any]]]:
    """The (event, handler) pairs of the UPS SCP for a receiver, on its session factory."""
    provider = UPSProvider(sessionmaker)
    return [
        (evt.EVT_N_CREATE, provider.handle_n_create),
        (evt.EVT_N_GET, provider.handle_n_get),
        (evt.EVT_N_SET, provider.handle_n_set),
        (evt.EVT_N_ACTION, provider.handle_n_action),
        (evt.EVT_C_FIND, provider.handle_c_find),
    ]
