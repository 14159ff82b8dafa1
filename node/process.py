"""Child processes that never outlive the node: the parent-death signal set in the child itself, a watchdog
that bounds a graceful stop, and the process tree below a pid (Linux /proc)."""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path

log = logging.getLogger("radnode.process")

PR_SET_PDEATHSIG = 1
WATCH_SECONDS = 0.5


def set_parent_death_signal(sig: int) -> bool:
    """Ask Linux to send `sig` to this process when the thread that started it ends (the node's main thread,
    its process gone, kill -9 included). False where prctl is not available (not Linux)."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def die_with_parent(parent: int, sig: int = signal.SIGTERM, grace: float | None = None, what: str = "process") -> None:
    """In a child of the node, first thing: `sig` arrives when the node `parent` dies however it dies, and at
    once if it died already. With `grace`, a watchdog thread also ends this process `grace` seconds after the
    node is gone, should the graceful stop that `sig` starts hang (a slow client, a stuck association)."""
    set_parent_death_signal(sig)
    if os.getppid() != parent:  # the node died before the signal was armed
        os.kill(os.getpid(), sig)
    if grace is None:
        return

    def watch() -> None:
        while os.getppid() == parent:
            threading.Event().wait(WATCH_SECONDS)
        threading.Event().wait(grace)
        log.error("node process gone and %s still running after %g s: exiting", what, grace)
        os._exit(70)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def descendants(pid: int) -> list[int]:
    """The pids of every process below `pid` (children, their children...), read from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process ended while we looked
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        out.append(child)
        todo.extend(children.get(child, []))
    return out
