"""Prometheus metrics in the node's processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# A fresh interpreter (the metric families are created once per process): 8 threads record their first
# instance at the same moment, as a receiver's threads do when parallel associations open together.
FIRST_EVENTS_AT_ONCE = """
import sys, tempfile, threading
from pathlib import Path
from node import metrics
metrics.enable_multiprocess(Path(tempfile.mkdtemp()) / "metrics")
errors, barrier = [], threading.Barrier(8)
def first_event(i):
    barrier.wait()
    try:
        metrics.instance_received("dimse", f"AE{i % 2}", 0, 10)
    except Exception as exc:
        errors.append(repr(exc))
threads = [threading.Thread(target=first_event, args=(i,)) for i in range(8)]
for t in threads: t.start()
for t in threads: t.join()
print(errors[:1])
sys.exit(1 if errors else 0)
"""


def test_first_events_from_many_threads_at_once():
    for _ in range(3):
        done = subprocess.run([sys.executable, "-c", FIRST_EVENTS_AT_ONCE], cwd=REPO, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
