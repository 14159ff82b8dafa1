"""Requestor associations (radnode's SCU: dispatch, sends, prior retrieval): a guard around pynetdicom."""

from __future__ import annotations

from typing import Any

from pynetdicom.association import Association


def keep_responses_for_their_caller(assoc: Association) -> None:
    """pynetdicom 3.0.4's requestor runs a reactor thread that looks at the DIMSE queue between requests
    (get_msg(block=False)); send_c_store and the other send_* pause it, but do not wait for a look already
    under way to end. A response that arrives within that look is taken by the reactor ("Received
    unexpected C-STORE service message") and the send_* waits out the DIMSE timeout: seen once in a test's
    64-file send to radnode's own receiver (which answers in ~3 ms) on a loaded CI machine. Here the
    reactor's look takes requests only (N-EVENT-REPORT and the like); a response stays on the queue for the
    send_* that waits for it."""
    dimse = assoc.dimse
    blocking_get = dimse.get_msg
    waiting = dimse.msg_queue

    def get_msg(block: bool = False) -> tuple[Any, Any]:
        if block:
            return blocking_get(block=True)
        with waiting.mutex:  # the look and the take at once: Queue.get without its wait
            if not waiting.queue or not getattr(waiting.queue[0][1], "is_valid_request", False):
                return None, None
            item = waiting._get()  # type: ignore[attr-defined]
            waiting.not_full.notify()
            return item

    dimse.get_msg = get_msg  # type: ignore[method-assign]
