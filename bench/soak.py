"""Soak run: mixed studies sent continuously to a production-shaped node while faults are injected; at the
end every acknowledged instance, job and delivery is checked.

What it does
    * starts a private stack on loopback: PostgreSQL (a throw-away cluster of its own when run as root,
      otherwise a new database on ``--pg-admin``), a private ``redis-server`` (no persistence), Orthanc as
      the PACS that receives the results, ``radnode run`` without an embedded worker and ``--workers``
      external ``radnode worker --queues gpu,cpu,dispatch`` processes;
    * routes with the test plugins of ``tests/fixtures/plugin_site`` (no weights, quick on a CPU, real
      DICOM results): CT -> ``test-slow`` (the reference HU-threshold segmenter after a sleep of
      ``--slow-seconds``: SR + SEG + up to 3 SC), CR/DX -> ``test-bright`` (a brightness "classifier": SR);
      US matches no rule (routed, no job);
    * for ``--minutes``, ``--associations`` sender threads (pynetdicom) each send one study after another,
      one association per study, every study with new UIDs: synthetic chest/head CT (``tests/synthetic.py``,
      one or two series), a slice range of the shared Philips chest CT, the shared CR and DX chest
      radiographs, a series of shared US images. Each C-STORE status is recorded; an instance not answered
      0x0000 (0xA700 while PostgreSQL is down, no answer after an abort) is sent again in a new
      association until it is, as a modality would;
    * injects faults at seeded random times (``--faults``, ``--fault-every``, ``--seed``): ``worker``
      (kill -9 of a worker and its pool, restarted), ``redis`` (kill -9 of redis-server, restarted empty),
      ``postgres`` (private cluster stopped for a few seconds, then started; root only), ``orthanc`` (the
      PACS stopped for 10-30 s, then started), ``abort`` (a sender's association aborted mid-study);
    * samples every ``--sample`` seconds the resident memory (RSS) of the ``radnode run`` process tree
      (receivers, HTTP service) and of the workers;
    * then waits (at most ``--drain`` s) for every series to be routed and every job and delivery to end,
      and checks: every acknowledged instance has its row and its file; every series has exactly the jobs
      its modality calls for, each ``delivered``; each job has exactly one delivery, ``sent``; every result
      object of those jobs (SR/SEG/SC, by SOP Instance UID) is in Orthanc exactly once, and Orthanc holds
      nothing else except the objects of earlier revisions that the job table lists as superseded (a series
      that got instances after its results were made is run again; the new objects supersede the old).

What it prints
    sent / acknowledged / lost instances, non-0x0000 statuses by code, series and jobs expected vs done,
    deliveries, result objects missing / extra / duplicated in Orthanc, re-sends Orthanc received (an
    idempotent re-delivery after a fault, same UIDs: counted, not an error), p50/p95 time-to-result (the
    series' last instance received -> delivery sent, from the job table; includes the stability window
    ``--stable``), the faults injected, and the node's and workers' RSS over time with the growth from the
    first to the last quarter of the run. Exits 1 when anything is lost, missing, duplicated or not drained.

Caveats
    Everything shares the machine's cores (senders, node, workers, PostgreSQL, Redis, Orthanc); keep
    ``--associations`` and ``--workers`` moderate on a small machine, and ``--pause`` above zero. RSS of the
    process tree counts pages shared between forked children once per process. Not root: PostgreSQL is
    the shared server and the ``postgres`` fault is left out (said at start). The test plugins stand in for
    real models: the figures measure radnode's plumbing, not inference. The node's timers are shortened so
    that faults heal within the run: stability window 4 s, lost task resent after 20 s (production default
    600 s: there a Redis restart or a task that met PostgreSQL down waits that long), worker lost after
    10 s, delivery backoff 2-15 s, 5 runs per job. Workers restarted by a fault start from zero, so the
    workers' RSS is a sawtooth; the node's is the figure to watch. After an abort the sender waits out its
    30 s DIMSE timeout before re-sending, longer than the stability window, so the series is usually
    reopened and its results superseded by a new revision. Workers restarted mid-run load the code as it
    is then: do not edit the tree during a run (or run from a copy).

Usage
    .venv/bin/python bench/soak.py [--minutes 10] [--associations 4] [--workers 2] [--seed 1]
                                   [--faults worker,redis,postgres,orthanc,abort | none] [--json FILE]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(REPO))
from ingest import (  # noqa: E402  (the sibling benchmark's helpers)
    ORTHANC_BIN,
    BenchError,
    Processes,
    SeriesFactory,
    dicom_echo,
    free_port,
    load_templates,
    radnode_command,
    tail,
    wait_until,
)

from node.dicom.association import keep_responses_for_their_caller  # noqa: E402

FIXTURE_SITE = REPO / "tests" / "fixtures" / "plugin_site"
RADNODE_AE = "RADNODE"
ORTHANC_AE = "ORTHANC"
FAULTS = ("worker", "redis", "postgres", "orthanc", "abort")
RULES = """rules:
  - name: soak-ct
    when: {Modality: CT}
    plugins: [test-slow]
  - name: soak-xray
    when: {Modality: [CR, DX]}
    plugins: [test-bright]
"""
EXPECTED_PLUGINS = {"CT": ("test-slow",), "CR": ("test-bright",), "DX": ("test-bright",), "US": ()}
# Study kinds and their share of the studies sent.
MIX = (("ct-synthetic", 0.35), ("ct-shared", 0.10), ("cr", 0.20), ("dx", 0.15), ("us", 0.20))
SHARED = {
    "ct": "ct_chest_philips_lungdx_a0001",
    "cr": "cxr_nema_wg04_rg1/RG1_UNCR.dcm",
    "dx": "cxr_nih_google_dicom/nih_cxr_google_sc_dx.dcm",
    "us": ("us_samples_pydicom/US1_UNCR.dcm", "us_samples_pydicom/gdcm-US-ALOKA-16.dcm",
           "us_samples_pydicom/OBXXXX1A.dcm"),
}
MAX_TRIES = 60  # associations a study may take before its sender gives up on an instance (reported)
STUCK_SECONDS = 45.0  # a C-STORE still not answered after this (DIMSE timeout 30 s) with its association gone


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


# --- the private stack ----------------------------------------------------------------------------------


class Postgres:
    """The job table's server: a private cluster (root: it can be restarted) or a database on a shared one."""

    def __init__(self, admin_url: str, private: bool) -> None:
        self.private = private
        self.admin_url = admin_url
        self.root: Path | None = None
        self.db_name = f"radnode_soak_{uuid.uuid4().hex[:10]}"
        if private:
            found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
            if not found:
                raise BenchError("PostgreSQL server binaries not found under /usr/lib/postgresql")
            self.bin = found[-1].parent
            # outside the work folder: the server runs as the postgres user and needs to reach its directory
            self.root = Path(tempfile.mkdtemp(prefix="radnode-soak-pg-"))
            self.dir, self.port = self.root / "pgdata", free_port()
            self.dir.mkdir()
            import pwd

            entry = pwd.getpwnam("postgres")
            for p in (self.root, self.dir):
                os.chown(p, entry.pw_uid, entry.pw_gid)
            self._ctl("initdb", "-D", str(self.dir), "-U", "postgres", "--auth=trust")
            self.start()
            self.admin_url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        import psycopg

        with psycopg.connect(self.admin_url, autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'CREATE DATABASE "{self.db_name}"')
        self.created = True

    def _ctl(self, tool: str, *args: str) -> None:
        cmd = ["runuser", "-u", "postgres", "--", str(self.bin / tool), *args]
        # no pipes: the server that pg_ctl starts would inherit them and hold them open
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)

    @property
    def url(self) -> str:
        return self.dsn.replace("postgresql://", "postgresql+psycopg://", 1)

    @property
    def dsn(self) -> str:
        return self.admin_url.rsplit("/", 1)[0] + "/" + self.db_name

    def start(self) -> None:
        self._ctl("pg_ctl", "-D", str(self.dir), "-o", f"-p {self.port} -k /tmp -c listen_addresses=127.0.0.1",
                  "-l", str(self.dir / "log"), "-w", "start")

    def stop(self) -> None:
        self._ctl("pg_ctl", "-D", str(self.dir), "-m", "fast", "-w", "stop")

    def close(self) -> None:
        """Remove the private cluster, or drop the database from the shared server."""
        if self.private:
            try:
                self._ctl("pg_ctl", "-D", str(self.dir), "-m", "immediate", "-w", "stop")
            except (subprocess.SubprocessError, OSError):
                pass
            if self.root:
                shutil.rmtree(self.root, ignore_errors=True)
            return
        import psycopg

        with psycopg.connect(self.admin_url, autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')


@dataclass
class Stack:
    """Every server of the run and how to (re)start each one."""

    work: Path
    procs: Processes
    pg: Postgres
    args: argparse.Namespace
    env: dict[str, str] = field(default_factory=dict)
    node: subprocess.Popen[bytes] | None = None
    node_port: int = 0
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    worker_starts: int = 0
    redis: subprocess.Popen[bytes] | None = None
    redis_port: int = 0
    orthanc: subprocess.Popen[bytes] | None = None
    orthanc_http: int = 0
    orthanc_dicom: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def logs(self) -> Path:
        return self.work / "logs"

    # redis
    def start_redis(self) -> None:
        if not self.redis_port:
            self.redis_port = free_port()
        cmd = ["redis-server", "--bind", "127.0.0.1", "--port", str(self.redis_port), "--save", "",
               "--appendonly", "no", "--dir", str(self.work)]
        self.redis = self.procs.start(cmd, dict(os.environ), self.logs / "redis.log")
        wait_until("redis", lambda: _port_open(self.redis_port), self.redis, self.logs / "redis.log", 20)

    def kill_redis(self) -> None:
        assert self.redis is not None
        self.redis.kill()
        self.redis.wait(timeout=10)
        self.procs.forget(self.redis)

    # orthanc
    def start_orthanc(self) -> None:
        root = self.work / "orthanc"
        config_path = root / "orthanc.json"
        if not config_path.exists():
            self.orthanc_http, self.orthanc_dicom = free_port(), free_port()
            while self.orthanc_dicom == self.orthanc_http:
                self.orthanc_dicom = free_port()
            root.mkdir(parents=True)
            lua = root / "receipts.lua"  # one line per object received, re-sends included
            lua.write_text(
                "function ReceivedInstanceFilter(dicom, origin, info)\n"
                f"  local f = io.open({json.dumps(str(root / 'receipts.txt'))}, 'a')\n"
                "  f:write(tostring(dicom.SOPInstanceUID) .. '\\n')\n"
                "  f:close()\n"
                "  return true\n"
                "end\n"
            )
            config = {
                "Name": "radnode-soak", "StorageDirectory": str(root / "storage"),
                "IndexDirectory": str(root / "index"), "HttpPort": self.orthanc_http,
                "DicomPort": self.orthanc_dicom, "DicomAet": ORTHANC_AE, "RemoteAccessAllowed": False,
                "AuthenticationEnabled": False, "DicomAlwaysAllowStore": True, "DicomCheckCalledAet": False,
                "OverwriteInstances": True, "Plugins": [], "StorageCompression": False,
                "LuaScripts": [str(lua)],
            }
            config_path.write_text(json.dumps(config, indent=2))
        log_path = self.logs / "orthanc.log"
        self.orthanc = self.procs.start([ORTHANC_BIN, str(config_path)], {**os.environ, "TCP_NODELAY": "1"}, log_path)
        wait_until("Orthanc REST", self.orthanc_up, self.orthanc, log_path, 60)
        wait_until("Orthanc C-ECHO", lambda: dicom_echo(ORTHANC_AE, self.orthanc_dicom), self.orthanc, log_path, 30)

    def orthanc_up(self) -> bool:
        try:
            self.orthanc_get("/system")
            return True
        except (OSError, ValueError):
            return False

    def orthanc_get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.orthanc_http}{path}", timeout=60) as r:
            return json.load(r)

    def stop_orthanc(self) -> None:
        assert self.orthanc is not None
        self.orthanc.terminate()
        try:
            self.orthanc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.orthanc.kill()
            self.orthanc.wait(timeout=10)
        self.procs.forget(self.orthanc)

    # radnode
    def node_env(self) -> dict[str, str]:
        a = self.args
        env = {k: v for k, v in os.environ.items() if not k.startswith("RADNODE_")}  # hermetic settings
        rules = self.work / "rules.yaml"
        rules.write_text(RULES)
        self.node_port = free_port()
        env.update(
            PYTHONPATH=os.pathsep.join([str(FIXTURE_SITE), str(REPO), os.environ.get("PYTHONPATH", "")]),
            TESTPLUGIN_SLOW_SECONDS=str(a.slow_seconds),
            TESTPLUGIN_SLOW_MARKER=str(self.work / "test-slow-runs.txt"),
            RADNODE_DATA_DIR=str(self.work / "radnode-data"),
            RADNODE_DATABASE_URL=self.pg.url,
            RADNODE_BROKER_URL=f"redis://127.0.0.1:{self.redis_port}/0",
            RADNODE_EMBEDDED_WORKER="false",
            RADNODE_DICOM_HOST="127.0.0.1",
            RADNODE_DICOM_PORT=str(self.node_port),
            RADNODE_HTTP_PORT=str(free_port()),
            RADNODE_AE_TITLE=RADNODE_AE,
            RADNODE_RECEIVERS=str(a.receivers),
            RADNODE_RULES_FILE=str(rules),
            RADNODE_STABLE_SECONDS=str(a.stable),
            RADNODE_JOB_HEARTBEAT_SECONDS="2",
            RADNODE_JOB_LOST_SECONDS="10",
            RADNODE_JOB_RESEND_SECONDS="20",
            RADNODE_JOB_MAX_ATTEMPTS="5",
            RADNODE_DELIVERY_BACKOFF_SECONDS="2",
            RADNODE_DELIVERY_BACKOFF_MAX_SECONDS="15",
            RADNODE_DELIVERY_MAX_ATTEMPTS="40",
            RADNODE_DESTINATIONS=json.dumps([{"name": "pacs", "kind": "dicom", "ae_title": ORTHANC_AE,
                                              "host": "127.0.0.1", "port": self.orthanc_dicom}]),
            RADNODE_LOG_LEVEL="INFO",
            TCP_NODELAY="1",
        )
        return env

    def start_node(self) -> None:
        self.env = self.node_env()
        command = radnode_command()
        done = subprocess.run([*command, "db", "upgrade"], env=self.env, capture_output=True, text=True,
                              timeout=120, check=False)
        if done.returncode != 0:
            raise BenchError(f"radnode db upgrade exited {done.returncode}: {done.stderr[-2000:]}")
        log_path = self.logs / "radnode.log"
        self.node = self.procs.start([*command, "run"], self.env, log_path)

        def running() -> bool:
            return any(line.rstrip().endswith("running") for line in log_path.read_text(errors="replace").splitlines())

        wait_until("radnode start", running, self.node, log_path, 120)
        wait_until("radnode C-ECHO", lambda: dicom_echo(RADNODE_AE, self.node_port), self.node, log_path, 30)

    # workers
    def start_worker(self) -> subprocess.Popen[bytes]:
        self.worker_starts += 1
        cmd = [*radnode_command(), "worker", "--queues", "gpu,cpu,dispatch", "--concurrency", "1"]
        proc = self.procs.start(cmd, self.env, self.logs / f"worker-{self.worker_starts}.log")
        with self.lock:
            self.workers.append(proc)
        return proc

    def kill_worker(self, rng: random.Random) -> int:
        """kill -9 one worker and its pool processes at once; returns the pid."""
        with self.lock:
            alive = [w for w in self.workers if w.poll() is None]
            victim = rng.choice(alive)
            self.workers.remove(victim)
        try:
            tree = [psutil.Process(victim.pid), *psutil.Process(victim.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        for p in tree:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        victim.wait(timeout=10)
        self.procs.forget(victim)
        return victim.pid

    def worker_pids(self) -> list[int]:
        with self.lock:
            roots = [w.pid for w in self.workers if w.poll() is None]
        return roots


def _port_open(port: int) -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), 0.5).close()
        return True
    except OSError:
        return False


# --- studies ----------------------------------------------------------------------------------------------


@dataclass
class SeriesPlan:
    series_uid: str
    modality: str
    sops: list[str]


@dataclass
class StudyPlan:
    kind: str
    study_uid: str
    series: list[SeriesPlan]
    files: list[Path]


class StudyMaker:
    """New studies with fresh UIDs from the shared data and tests/synthetic.py, written under `folder`."""

    def __init__(self, data: Path, folder: Path, rng: random.Random) -> None:
        from tests.synthetic import write_ct_series

        self.write_ct_series = write_ct_series
        self.folder = folder
        self.rng = rng
        self.ct = SeriesFactory(load_templates(data / SHARED["ct"]))
        self.single = {key: pydicom.dcmread(data / SHARED[key]) for key in ("cr", "dx")}
        self.us = [pydicom.dcmread(data / name) for name in SHARED["us"]]
        self.lock = threading.Lock()
        self.count = 0

    def make(self) -> StudyPlan:
        with self.lock:  # the templates are shared and rewritten in place
            self.count += 1
            folder = self.folder / f"study-{self.count:06d}"
            kind = self.rng.choices([k for k, _ in MIX], [w for _, w in MIX])[0]
            if kind == "ct-synthetic":
                study_uid = generate_uid()
                files: list[Path] = []
                for n in range(1 if self.rng.random() < 0.7 else 2):
                    files += self.write_ct_series(
                        folder / f"s{n}", kind=self.rng.choice(["chest", "head"]), slices=self.rng.randint(8, 24),
                        size=self.rng.choice([64, 96, 128]), study_uid=study_uid, series_number=n + 2,
                        seed=self.rng.randrange(1 << 30))
            elif kind == "ct-shared":
                count = self.rng.randint(16, len(self.ct.templates))
                made = self.ct.make(folder, count, "SOAK CHEST")
                files, study_uid = made.files, made.study_uid
            else:
                if kind in self.single:
                    templates = [self.single[kind]]
                else:
                    templates = self.rng.sample(self.us, self.rng.randint(1, 3))
                study_uid, series_uid = generate_uid(), generate_uid()
                folder.mkdir(parents=True)
                files = []
                for i, ds in enumerate(templates):
                    files.append(self._reuid(ds, folder / f"{i + 1:03d}.dcm", study_uid, series_uid, i + 1))
            return StudyPlan(kind, study_uid, self._series_of(files), files)

    @staticmethod
    def _reuid(ds: Dataset, path: Path, study_uid: str, series_uid: str, number: int) -> Path:
        sop = generate_uid()
        ds.SOPInstanceUID = sop
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        if "FrameOfReferenceUID" in ds:
            ds.FrameOfReferenceUID = generate_uid()
        ds.InstanceNumber = number
        ds.save_as(path, enforce_file_format=True)
        return path

    @staticmethod
    def _series_of(files: list[Path]) -> list[SeriesPlan]:
        out: dict[str, SeriesPlan] = {}
        for f in files:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            uid = str(ds.SeriesInstanceUID)
            plan = out.setdefault(uid, SeriesPlan(uid, str(ds.Modality), []))
            plan.sops.append(str(ds.SOPInstanceUID))
        return list(out.values())


# --- senders ---------------------------------------------------------------------------------------------


@dataclass
class Ledger:
    """What the senders did: every instance tried and every answer the node gave."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    studies: list[StudyPlan] = field(default_factory=list)
    tried: set[str] = field(default_factory=set)
    acked: dict[str, float] = field(default_factory=dict)  # SOP Instance UID -> first 0x0000
    statuses: collections.Counter[str] = field(default_factory=collections.Counter)
    send_exceptions: collections.Counter[str] = field(default_factory=collections.Counter)
    unanswered: int = 0  # C-STOREs without an answer (association aborted or dropped)
    associations: int = 0
    association_failures: int = 0
    gave_up: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class Sender(threading.Thread):
    """One modality: sends a study per association, again and again, until `stop`; re-sends what was not
    acknowledged in a new association."""

    def __init__(self, index: int, maker: StudyMaker, ledger: Ledger, port: int, stop: threading.Event,
                 pause: float) -> None:
        super().__init__(name=f"sender-{index}", daemon=True)
        self.index, self.maker, self.ledger, self.port = index, maker, ledger, port
        self.stop_event, self.pause = stop, pause
        self.assoc: Any = None  # the association in progress (the abort fault reaches it here)
        self.assoc_lock = threading.Lock()

    def run(self) -> None:
        try:
            while not self.stop_event.is_set():
                plan = self.maker.make()
                with self.ledger.lock:
                    self.ledger.studies.append(plan)
                self.send_study(plan)
                shutil.rmtree(plan.files[0].parent if plan.kind != "ct-synthetic" else plan.files[0].parent.parent,
                              ignore_errors=True)
                self.stop_event.wait(self.pause)
        except Exception:  # a bug in the soak itself: record it, fail the run
            self.ledger.errors.append(f"{self.name}: {traceback.format_exc()}")

    def send_study(self, plan: StudyPlan) -> None:
        from pynetdicom import AE

        sops = {str(f): pydicom.dcmread(f, stop_before_pixels=True) for f in plan.files}
        pending = list(plan.files)
        contexts = sorted({(str(d.SOPClassUID), str(d.file_meta.TransferSyntaxUID)) for d in sops.values()})
        ae = AE(ae_title=f"SOAK{self.index}")
        # after an abort pynetdicom waits out the DIMSE timeout for the answer in flight: the modality's
        # re-send comes this much later (longer than the stability window: the series may be reopened)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        for sop_class, ts in contexts:
            syntaxes = list(dict.fromkeys([ts, ExplicitVRLittleEndian, ImplicitVRLittleEndian]))
            ae.add_requested_context(sop_class, syntaxes)
        tries = 0
        while pending:
            tries += 1
            if tries > MAX_TRIES:
                with self.ledger.lock:
                    self.ledger.gave_up += [str(sops[str(f)].SOPInstanceUID) for f in pending]
                return
            if tries > 1:
                time.sleep(1.0)  # as a modality's retry: not too eager while the node refuses
            assoc = ae.associate("127.0.0.1", self.port, ae_title=RADNODE_AE)
            with self.ledger.lock:
                self.ledger.associations += 1
            if not assoc.is_established:
                with self.ledger.lock:
                    self.ledger.association_failures += 1
                continue
            keep_responses_for_their_caller(assoc)  # pynetdicom's requestor race (node/dicom/association.py)
            with self.assoc_lock:
                self.assoc = assoc
            left = []
            for f in pending:
                sop = str(sops[str(f)].SOPInstanceUID)
                with self.ledger.lock:
                    self.ledger.tried.add(sop)
                if not assoc.is_established or not assoc.is_alive():
                    left.append(f)
                    continue
                # pynetdicom's send_c_store spins for ever when the association's reactor thread ends just
                # before it pauses it (a race with an abort or a closed connection): unblock it, the C-STORE
                # then times out unanswered and is sent again
                watchdog = threading.Timer(STUCK_SECONDS, self._unstick, (assoc,))
                watchdog.daemon = True
                watchdog.start()
                try:
                    status = assoc.send_c_store(f)
                except Exception as exc:  # the association went away in the middle (abort, node restart)
                    status = None
                    with self.ledger.lock:
                        self.ledger.send_exceptions[type(exc).__name__] += 1
                finally:
                    watchdog.cancel()
                code = int(status.Status) if status is not None and "Status" in status else None
                with self.ledger.lock:
                    if code is None:
                        self.ledger.unanswered += 1
                    else:
                        self.ledger.statuses[f"0x{code:04X}"] += 1
                    if code == 0:
                        self.ledger.acked.setdefault(sop, time.time())
                if code != 0:
                    left.append(f)
            with self.assoc_lock:
                self.assoc = None
            if assoc.is_established:
                assoc.release()
            pending = left

    def _unstick(self, assoc: Any) -> None:
        if not assoc.is_alive() and not getattr(assoc, "_is_paused", True):
            assoc._is_paused = True  # pynetdicom private: what its ended reactor thread would have set
            with self.ledger.lock:
                self.ledger.send_exceptions["stuck send_c_store released"] += 1

    def abort(self) -> bool:
        """Abort the association in progress, if there is one (the fault)."""
        with self.assoc_lock:
            assoc = self.assoc
        if assoc is None or not assoc.is_established:
            return False
        assoc.abort()
        return True


# --- faults ----------------------------------------------------------------------------------------------


@dataclass
class FaultEvent:
    at: float  # seconds since the start of sending
    kind: str
    detail: str


def schedule(kinds: Sequence[str], seconds: float, every: float, rng: random.Random) -> list[tuple[float, str]]:
    """Fault times in [10 s, seconds - 5 s): gaps of 0.5-1.5 x `every`, kinds in shuffled rounds."""
    out: list[tuple[float, str]] = []
    t = 10.0 + rng.uniform(0, every / 2)
    round_: list[str] = []
    while t < seconds - 5 and kinds:
        if not round_:
            round_ = list(kinds)
            rng.shuffle(round_)
        out.append((t, round_.pop()))
        t += every * rng.uniform(0.5, 1.5)
    return out


class Injector(threading.Thread):
    """Runs the fault schedule; each fault is healed (restarted) before the next one starts."""

    def __init__(self, stack: Stack, senders: list[Sender], plan: list[tuple[float, str]], rng: random.Random,
                 t0: float, stop: threading.Event) -> None:
        super().__init__(name="faults", daemon=True)
        self.stack, self.senders, self.plan, self.rng, self.t0, self.stop_event = stack, senders, plan, rng, t0, stop
        self.events: list[FaultEvent] = []
        self.errors: list[str] = []

    def run(self) -> None:
        for at, kind in self.plan:
            if self.stop_event.wait(max(0.0, self.t0 + at - time.time())):
                return
            try:
                detail = getattr(self, f"_{kind}")()
            except Exception:
                self.errors.append(f"fault {kind}: {traceback.format_exc()}")
                return
            self.events.append(FaultEvent(round(time.time() - self.t0, 1), kind, detail))
            log(f"fault {kind}: {detail}")

    def _worker(self) -> str:
        pid = self.stack.kill_worker(self.rng)
        time.sleep(self.rng.uniform(1, 3))
        new = self.stack.start_worker()
        return f"kill -9 worker pid {pid} (and its pool); started pid {new.pid}"

    def _redis(self) -> str:
        self.stack.kill_redis()
        down = self.rng.uniform(1, 4)
        time.sleep(down)
        self.stack.start_redis()
        return f"kill -9 redis-server, restarted empty after {down:.1f} s"

    def _postgres(self) -> str:
        self.stack.pg.stop()
        down = self.rng.uniform(2, 8)
        time.sleep(down)
        self.stack.pg.start()
        return f"PostgreSQL stopped (fast), started again after {down:.1f} s"

    def _orthanc(self) -> str:
        self.stack.stop_orthanc()
        down = self.rng.uniform(10, 30)
        time.sleep(down)
        self.stack.start_orthanc()
        return f"Orthanc stopped, started again after {down:.1f} s"

    def _abort(self) -> str:
        deadline = time.time() + 20
        while time.time() < deadline:
            busy = [s for s in self.senders if s.assoc is not None]
            if busy:
                sender = self.rng.choice(busy)
                time.sleep(self.rng.uniform(0, 0.3))  # somewhere in the middle of its study
                if sender.abort():
                    return f"{sender.name}: association aborted mid-study"
            time.sleep(0.05)
        return "no association in progress within 20 s: none aborted"


# --- memory ----------------------------------------------------------------------------------------------


def tree_rss(pids: Sequence[int]) -> dict[str, float]:
    """RSS in MiB of these processes and all their children, by "pid role" (main, tracker, child)."""
    out: dict[str, float] = {}
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for p in procs:
            try:
                cmdline = " ".join(p.cmdline())
                role = "main" if p is root else "tracker" if "resource_tracker" in cmdline else "child"
                out[f"{p.pid} {role}"] = p.memory_info().rss / 2**20
            except psutil.NoSuchProcess:
                pass
    return out


class Sampler(threading.Thread):
    def __init__(self, stack: Stack, every: float, t0: float, stop: threading.Event) -> None:
        super().__init__(name="rss", daemon=True)
        self.stack, self.every, self.t0, self.stop_event = stack, every, t0, stop
        self.samples: list[dict[str, float]] = []

    def run(self) -> None:
        while True:
            assert self.stack.node is not None
            node = tree_rss([self.stack.node.pid])
            workers = tree_rss(self.stack.worker_pids())
            self.samples.append({"t": round(time.time() - self.t0, 1), "node_mib": sum(node.values()),
                                 "node_procs": len(node), "workers_mib": sum(workers.values()),
                                 "worker_procs": len(workers), "node_by_process": node})
            if self.stop_event.wait(self.every):
                return


def memory_summary(samples: list[dict[str, float]]) -> dict[str, Any]:
    if len(samples) < 4:
        return {"samples": len(samples)}
    q = len(samples) // 4
    first, last = samples[:q], samples[-q:]
    out: dict[str, Any] = {"samples": len(samples)}
    begin, end = samples[0]["node_by_process"], samples[-1]["node_by_process"]
    out["node_by_process"] = {k: {"first": begin[k], "last": end[k]} for k in begin if k in end}
    for key in ("node_mib", "workers_mib"):
        a, b = statistics.mean(s[key] for s in first), statistics.mean(s[key] for s in last)
        out[key] = {"first_quarter": a, "last_quarter": b, "growth_mib": b - a,
                    "growth_pct": 100 * (b - a) / a if a else 0.0, "max": max(s[key] for s in samples)}
    return out


def memory_table(samples: list[dict[str, float]], rows: int = 12) -> list[str]:
    step = max(1, len(samples) // rows)
    picked = samples[::step]
    if picked[-1] is not samples[-1]:
        picked.append(samples[-1])
    lines = [f"  {'t (s)':>7} {'node RSS MiB':>13} {'procs':>6} {'workers RSS MiB':>16} {'procs':>6}"]
    for s in picked:
        lines.append(f"  {s['t']:>7.0f} {s['node_mib']:>13.1f} {s['node_procs']:>6.0f} {s['workers_mib']:>16.1f} "
                     f"{s['worker_procs']:>6.0f}")
    return lines


# --- the checks ------------------------------------------------------------------------------------------


def query(dsn: str, sql: str) -> list[tuple[Any, ...]]:
    import psycopg

    with psycopg.connect(dsn, connect_timeout=10) as conn:
        return list(conn.execute(sql).fetchall())


def drained(stack: Stack, ledger: Ledger) -> tuple[bool, str]:
    """Every series we sent is routed, no job or delivery is still moving."""
    series = dict(query(stack.pg.dsn, "SELECT series_uid, state FROM series"))
    ours = [s.series_uid for st in ledger.studies for s in st.series]
    not_routed = sum(1 for uid in ours if series.get(uid) != "routed")
    moving = query(stack.pg.dsn, "SELECT count(*) FROM job WHERE state IN ('queued', 'running', 'encoded')")[0][0]
    pending = query(stack.pg.dsn, "SELECT count(*) FROM delivery WHERE state = 'pending'")[0][0]
    return not_routed == 0 and moving == 0 and pending == 0, (
        f"{not_routed} series not routed, {moving} jobs and {pending} deliveries in flight")


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    k = (len(values) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def check(stack: Stack, ledger: Ledger) -> dict[str, Any]:
    dsn = stack.pg.dsn
    data = stack.work / "radnode-data" / "instances"
    rows = dict(query(dsn, "SELECT sop_instance_uid, path FROM instance"))
    lost_rows = [sop for sop in ledger.acked if sop not in rows]
    lost_files = [sop for sop in ledger.acked if sop in rows and not (data / rows[sop]).is_file()]
    planned = {sop for st in ledger.studies for s in st.series for sop in s.sops}

    series = {r[0]: r for r in query(dsn, "SELECT series_uid, state, reopened_count, last_received_at, modality, "
                                          "instance_count FROM series")}
    jobs = query(dsn, "SELECT j.id, s.series_uid, j.plugin, j.state, j.attempts, j.outputs, j.reason, "
                      "j.fail_stage FROM job j JOIN series s ON s.id = j.series_id")
    deliveries = query(dsn, "SELECT job_id, state, attempts, sent_at, instances, last_error FROM delivery")
    jobs_by_series: dict[str, list[tuple[Any, ...]]] = collections.defaultdict(list)
    for j in jobs:
        jobs_by_series[j[1]].append(j)
    expected_jobs, missing_jobs, extra_jobs = 0, [], []
    ours = {s.series_uid: s for st in ledger.studies for s in st.series}
    for uid, plan in ours.items():
        want = collections.Counter(EXPECTED_PLUGINS.get(plan.modality, ()))
        have = collections.Counter(j[2] for j in jobs_by_series.get(uid, []))
        expected_jobs += sum(want.values())
        missing_jobs += [f"{uid} {p}" for p in want - have]
        extra_jobs += [f"{uid} {p}" for p in have - want]
    foreign = [j for j in jobs if j[1] not in ours]
    states = collections.Counter(j[3] for j in jobs)
    not_delivered = [f"job {j[0]} ({j[2]}): {j[3]} {j[7] or ''} {(j[6] or '')[:200]}"
                     for j in jobs if j[3] != "delivered"]
    series_states = collections.Counter(series[u][1] if u in series else "absent" for u in ours)

    by_job: dict[int, list[tuple[Any, ...]]] = collections.defaultdict(list)
    for d in deliveries:
        by_job[d[0]].append(d)
    delivered_jobs = [j for j in jobs if j[3] == "delivered"]
    bad_deliveries = [f"job {j[0]}: {[(d[1], d[2]) for d in by_job.get(j[0], [])]}" for j in delivered_jobs
                      if [d[1] for d in by_job.get(j[0], [])] != ["sent"]]
    delivery_attempts = collections.Counter(d[2] for d in deliveries)

    # result objects: what the delivered jobs wrote, against what Orthanc holds
    from node.results import object_kind

    expected_objects: dict[str, int] = {}  # SOP Instance UID -> job id
    unreadable = []
    for j in delivered_jobs:
        for p in j[5] or []:
            if object_kind(p) is None:
                continue
            try:
                ds = pydicom.dcmread(p, stop_before_pixels=True)
            except (OSError, pydicom.errors.InvalidDicomError) as exc:
                unreadable.append(f"job {j[0]}: {p}: {exc}")
                continue
            expected_objects[str(ds.SOPInstanceUID)] = j[0]
    series_of = {s["ID"]: s["MainDicomTags"].get("SeriesInstanceUID") for s in stack.orthanc_get("/series?expand")}
    held = [(i["MainDicomTags"].get("SOPInstanceUID"), series_of.get(i["ParentSeries"]))
            for i in stack.orthanc_get("/instances?expand")]
    in_orthanc = collections.Counter(uid for uid, _ in held)
    duplicates = {uid: n for uid, n in in_orthanc.items() if n > 1}
    missing_objects = sorted(set(expected_objects) - set(in_orthanc))
    extra_objects = sorted(set(in_orthanc) - set(expected_objects))
    # Objects of a revision that new instances superseded stay in the PACS by design (the new SR names the old
    # one as its predecessor); the job table lists them in job.history (when this radnode version has it).
    superseded: dict[str, int] = {}
    revised = 0
    columns = {r[0] for r in query(dsn, "SELECT column_name FROM information_schema.columns WHERE table_name = 'job'")}
    if "history" in columns:
        for job_id, history, revision in query(dsn, "SELECT id, history, revision FROM job"):
            revised += 1 if revision else 0
            for entry in history or []:
                for obj in entry.get("objects") or []:
                    superseded[obj["sop_instance_uid"]] = job_id
    stale = sorted(uid for uid in extra_objects if uid in superseded)
    odd = set(extra_objects) - set(stale)
    unexplained = [f"{uid} (series {series_uid})" for uid, series_uid in held if uid in odd]
    receipts_file = stack.work / "orthanc" / "receipts.txt"
    receipts = collections.Counter(receipts_file.read_text().split() if receipts_file.exists() else [])
    resent = {uid: n for uid, n in receipts.items() if n > 1}

    # time to result: the series' last instance received -> its delivery sent
    ttr: list[float] = []
    ttr_by_plugin: dict[str, list[float]] = collections.defaultdict(list)
    for j in delivered_jobs:
        sent = [d[3] for d in by_job.get(j[0], []) if d[3] is not None]
        last = series[j[1]][3] if j[1] in series else None
        if sent and last is not None:
            value = (max(sent) - last).total_seconds()
            ttr.append(value)
            ttr_by_plugin[j[2]].append(value)
    runs_file = stack.work / "test-slow-runs.txt"
    slow_runs = len(runs_file.read_text().split()) if runs_file.exists() else 0

    return {
        "instances": {
            "planned": len(planned), "sent": len(ledger.tried), "acknowledged": len(ledger.acked),
            "never_acknowledged": len(planned - set(ledger.acked)), "gave_up": len(ledger.gave_up),
            "lost_rows": len(lost_rows), "lost_files": len(lost_files), "lost": len(lost_rows) + len(lost_files),
            "lost_examples": (lost_rows + lost_files)[:10], "statuses": dict(ledger.statuses),
            "unanswered": ledger.unanswered, "send_exceptions": dict(ledger.send_exceptions),
            "associations": ledger.associations,
            "association_failures": ledger.association_failures, "rows_in_table": len(rows),
        },
        "studies": {"sent": len(ledger.studies),
                    "by_kind": dict(collections.Counter(st.kind for st in ledger.studies))},
        "series": {"sent": len(ours), "states": dict(series_states),
                   "reopened": sum(1 for u in ours if u in series and series[u][2])},
        "jobs": {"expected": expected_jobs, "in_table": len(jobs), "states": dict(states),
                 "delivered": len(delivered_jobs), "missing": missing_jobs[:20], "missing_count": len(missing_jobs),
                 "extra": extra_jobs[:20], "extra_count": len(extra_jobs), "foreign": len(foreign),
                 "not_delivered": not_delivered[:20], "not_delivered_count": len(not_delivered),
                 "attempts": dict(collections.Counter(j[4] for j in jobs)), "test_slow_runs": slow_runs},
        "deliveries": {"expected": len(delivered_jobs), "rows": len(deliveries),
                       "sent": sum(1 for d in deliveries if d[1] == "sent"), "bad": bad_deliveries[:20],
                       "bad_count": len(bad_deliveries), "attempts": dict(delivery_attempts)},
        "orthanc": {"expected_objects": len(expected_objects), "objects": sum(in_orthanc.values()),
                    "missing": missing_objects[:20], "missing_count": len(missing_objects),
                    "extra": extra_objects[:20], "extra_count": len(extra_objects),
                    "superseded_count": len(stale), "unexplained": unexplained[:20],
                    "unexplained_count": len(unexplained), "jobs_revised": revised,
                    "duplicates": dict(list(duplicates.items())[:20]), "duplicate_count": len(duplicates),
                    "unreadable_outputs": unreadable[:20], "receipts": sum(receipts.values()),
                    "resent_objects": len(resent)},
        "time_to_result_s": {
            "count": len(ttr), "p50": percentile(ttr, 50), "p95": percentile(ttr, 95),
            "max": max(ttr) if ttr else float("nan"),
            "by_plugin": {p: {"count": len(v), "p50": percentile(v, 50), "p95": percentile(v, 95)}
                          for p, v in sorted(ttr_by_plugin.items())},
        },
    }


def problems_of(result: dict[str, Any]) -> list[str]:
    i, j, d, o = result["instances"], result["jobs"], result["deliveries"], result["orthanc"]
    out = []
    if i["lost"]:
        out.append(f"{i['lost']} acknowledged instance(s) lost: {i['lost_examples']}")
    if i["never_acknowledged"]:
        out.append(f"{i['never_acknowledged']} instance(s) never acknowledged")
    if j["missing_count"] or j["extra_count"] or j["foreign"]:
        out.append(f"jobs missing {j['missing']}, extra {j['extra']}, for series not sent {j['foreign']}")
    if j["not_delivered_count"]:
        out.append(f"{j['not_delivered_count']} job(s) not delivered: {j['not_delivered']}")
    if d["bad_count"]:
        out.append(f"{d['bad_count']} delivered job(s) without exactly one sent delivery: {d['bad']}")
    if o["missing_count"] or o["unexplained_count"] or o["duplicate_count"] or o["unreadable_outputs"]:
        out.append(f"Orthanc: missing {o['missing']}, not from a delivered job or earlier revision "
                   f"{o['unexplained']}, duplicated {o['duplicates']}, unreadable outputs {o['unreadable_outputs']}")
    if result["series"]["states"].get("routed", 0) != result["series"]["sent"]:
        out.append(f"series not all routed: {result['series']['states']}")
    return out


def render(result: dict[str, Any], args: argparse.Namespace) -> str:
    i, st, se, j, d, o, t = (result[k] for k in ("instances", "studies", "series", "jobs", "deliveries", "orthanc",
                                                 "time_to_result_s"))
    lines = [
        f"soak: {args.minutes:g} min of sending over {args.associations} association(s), {args.workers} worker(s), "
        f"seed {args.seed}, faults {','.join(result['faults']['kinds']) or 'none'}",
        f"  studies sent            {st['sent']}  {st['by_kind']}",
        f"  instances               sent {i['sent']}, acknowledged {i['acknowledged']}, lost {i['lost']} "
        f"(rows {i['lost_rows']}, files {i['lost_files']}), never acknowledged {i['never_acknowledged']}",
        f"  C-STORE answers         {i['statuses']}, unanswered {i['unanswered']}; associations {i['associations']} "
        f"({i['association_failures']} refused or failed)",
        f"  series                  {se['sent']} sent, states {se['states']}, reopened {se['reopened']}",
        f"  jobs                    expected {j['expected']}, in table {j['in_table']}, delivered {j['delivered']}; "
        f"missing {j['missing_count']}, extra {j['extra_count']}; states {j['states']}",
        f"  job attempts            {j['attempts']} (test-slow ran {j['test_slow_runs']} time(s))",
        f"  deliveries              expected {d['expected']}, sent {d['sent']} of {d['rows']} rows, "
        f"not exactly once {d['bad_count']}; attempts {d['attempts']}",
        f"  results in Orthanc      expected {o['expected_objects']}, held {o['objects']}, "
        f"missing {o['missing_count']}, duplicated {o['duplicate_count']}, not from a delivered job "
        f"{o['unexplained_count']}; also {o['superseded_count']} object(s) of {o['jobs_revised']} earlier "
        f"revision(s) (series grew after delivery; kept by design)",
        f"  re-sends received       {o['resent_objects']} object(s) received more than once "
        f"({o['receipts']} receipts; same UIDs, idempotent)",
        f"  time to result (s)      p50 {t['p50']:.1f}, p95 {t['p95']:.1f}, max {t['max']:.1f} over {t['count']} "
        f"job(s) (last instance received -> delivery sent; includes the {args.stable:g} s stability window)",
    ]
    for plugin, v in t["by_plugin"].items():
        lines.append(f"    {plugin:<22}p50 {v['p50']:.1f}, p95 {v['p95']:.1f} ({v['count']})")
    lines.append(f"  drain                   {result['drain']}")
    lines.append("  faults injected:")
    for e in result["faults"]["events"]:
        lines.append(f"    {e['at']:>7.1f} s  {e['kind']:<9}{e['detail']}")
    if not result["faults"]["events"]:
        lines.append("    none")
    lines.append("  resident memory (RSS; node = radnode run + receivers + HTTP; workers = all workers + pools):")
    lines += memory_table(result["memory"]["samples"])
    m = result["memory"]["summary"]
    if m.get("node_by_process"):
        lines.append("  node processes, first -> last sample (MiB): " + "; ".join(
            f"{k} {v['first']:.0f} -> {v['last']:.0f}" for k, v in m["node_by_process"].items()))
    for key, label in (("node_mib", "node"), ("workers_mib", "workers")):
        if key in m:
            lines.append(f"  {label} RSS first quarter {m[key]['first_quarter']:.1f} MiB, last quarter "
                         f"{m[key]['last_quarter']:.1f} MiB: growth {m[key]['growth_mib']:+.1f} MiB "
                         f"({m[key]['growth_pct']:+.1f} %), max {m[key]['max']:.1f} MiB")
    return "\n".join(lines)


def log_findings(paths: Sequence[Path], limit: int = 25) -> list[str]:
    """ERROR/CRITICAL lines of the logs, by message (timestamps, pids, ids and hashes folded), most frequent
    first. The fixture site's deliberately broken plugins (test-broken, test-bad-manifest) are left out."""
    import re

    counts: collections.Counter[str] = collections.Counter()
    for p in paths:
        for ln in p.read_text(errors="replace").splitlines():
            if (" ERROR " not in ln and " CRITICAL " not in ln) or "plugin test-b" in ln:
                continue
            msg = re.sub(r"^[\d-]+ [\d:,]+ ", "", ln)
            msg = re.sub(r"\[\d+\]|\b(job|delivery) \d+|[0-9a-f]{8}-[0-9a-f-]{27}|port \d+|:\d{4,5}\b", "", msg)
            counts[f"{p.name.split('-')[0].removesuffix('.log')}: {msg[:220]}"] += 1
    return [f"{n:>5} x {msg}" for msg, n in counts.most_common(limit)]


# --- the run ---------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0, help="how long to send (default 10)")
    p.add_argument("--associations", type=int, default=4, help="parallel sender associations (default 4)")
    p.add_argument("--workers", type=int, default=2, help="external worker processes (default 2)")
    p.add_argument("--receivers", type=int, default=2, help="RADNODE_RECEIVERS (default 2)")
    p.add_argument("--faults", default=",".join(FAULTS), help=f"comma-separated of {', '.join(FAULTS)}; or none")
    p.add_argument("--fault-every", type=float, default=None,
                   help="mean seconds between faults (default: ~2 of each kind per run, 15-60 s)")
    p.add_argument("--seed", type=int, default=1, help="seeds the study mix and the faults (default 1)")
    p.add_argument("--pause", type=float, default=6.0, help="seconds each sender waits between studies (default 6)")
    p.add_argument("--stable", type=float, default=4.0, help="RADNODE_STABLE_SECONDS (default 4)")
    p.add_argument("--slow-seconds", type=float, default=1.0, help="test-slow's sleep per CT job (default 1)")
    p.add_argument("--sample", type=float, default=5.0, help="seconds between RSS samples (default 5)")
    p.add_argument("--drain", type=float, default=300.0, help="longest wait for the pipeline to drain (default 300)")
    p.add_argument("--data", type=Path, default=None, help="shared DICOM (default RADNODE_TEST_DATA or ../shared/data)")
    p.add_argument("--pg-admin", default=os.environ.get("RADNODE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres"),
                   help="PostgreSQL server for the database when not root (default RADNODE_TEST_PG or local)")
    p.add_argument("--json", type=Path, default=None, help="write the figures to this file")
    p.add_argument("--tmp", type=Path, default=None, help="parent of the temporary work folder")
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs, storage) at the end")
    args = p.parse_args(argv)
    kinds = [] if args.faults.strip() in ("", "none") else [k.strip() for k in args.faults.split(",")]
    unknown = set(kinds) - set(FAULTS)
    if unknown:
        p.error(f"unknown fault(s) {sorted(unknown)}; choose from {', '.join(FAULTS)}")
    if args.minutes <= 0 or args.associations < 1 or args.workers < 1 or args.pause < 0:
        p.error("--minutes must be > 0, --associations and --workers >= 1, --pause >= 0")
    args.fault_kinds = list(dict.fromkeys(kinds))
    return args


def run(args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    for tool in ("redis-server", "echoscu"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} not found (Debian packages redis-server, dcmtk)")
    if not os.access(ORTHANC_BIN, os.X_OK):
        raise BenchError(f"{ORTHANC_BIN} not found: apt-get install orthanc")
    data = (args.data or Path(os.environ.get("RADNODE_TEST_DATA", REPO.parent / "shared" / "data"))).resolve()
    root = os.getuid() == 0
    kinds = list(args.fault_kinds)
    if "postgres" in kinds and not root:
        kinds.remove("postgres")
        log("not root: PostgreSQL is the shared server, the 'postgres' fault is left out")
    seconds = args.minutes * 60
    every = args.fault_every or min(60.0, max(15.0, seconds / (2 * max(1, len(kinds)))))
    rng = random.Random(args.seed)
    plan = schedule(kinds, seconds, every, random.Random(args.seed + 1))

    work = Path(tempfile.mkdtemp(prefix="radnode-soak-", dir=args.tmp))
    (work / "logs").mkdir()
    procs = Processes()
    pg: Postgres | None = None
    stop_send, stop_faults, stop_rss = threading.Event(), threading.Event(), threading.Event()
    threads: list[threading.Thread] = []
    try:
        log(f"work folder {work}")
        pg = Postgres(args.pg_admin, private=root)
        stack = Stack(work, procs, pg, args)
        stack.start_redis()
        stack.start_orthanc()
        stack.start_node()
        for _ in range(args.workers):
            stack.start_worker()
        log(f"node on port {stack.node_port} (PostgreSQL {'private cluster' if root else 'shared server'}, "
            f"Redis :{stack.redis_port}), {args.workers} worker(s), Orthanc :{stack.orthanc_dicom}; "
            f"{len(plan)} fault(s) planned every ~{every:.0f} s: {', '.join(k for _, k in plan) or 'none'}")
        maker = StudyMaker(data, work / "outgoing", rng)
        ledger = Ledger()
        t0 = time.time()
        sampler = Sampler(stack, args.sample, t0, stop_rss)
        senders = [Sender(i + 1, maker, ledger, stack.node_port, stop_send, args.pause)
                   for i in range(args.associations)]
        injector = Injector(stack, senders, plan, random.Random(args.seed + 2), t0, stop_faults)
        threads = [sampler, injector, *senders]
        for t in threads:
            t.start()
        next_note = t0 + 60
        while time.time() < t0 + seconds:
            time.sleep(1)
            if time.time() >= next_note:
                next_note += 60
                try:
                    jobs = dict(query(stack.pg.dsn, "SELECT state, count(*) FROM job GROUP BY state"))
                except Exception as exc:  # the database may be down for a fault
                    jobs = {"?": type(exc).__name__}
                log(f"{len(ledger.studies)} studies, {len(ledger.acked)} instances acknowledged, "
                    f"statuses {dict(ledger.statuses)}; jobs {jobs}")
            if ledger.errors or injector.errors:
                break
        stop_send.set()
        stop_faults.set()
        log("sending stops; waiting for the senders' last studies and the fault in progress")
        for t in senders:
            t.join(timeout=MAX_TRIES * 5)
        injector.join(timeout=120)
        errors = ledger.errors + injector.errors
        if errors:
            raise BenchError("the soak itself failed:\n" + "\n".join(errors[:5]))
        # every server back before the drain (a fault healed itself; this only checks)
        if stack.redis is None or stack.redis.poll() is not None:
            raise BenchError("redis-server is not running after the faults")
        if stack.orthanc is None or stack.orthanc.poll() is not None:
            raise BenchError("Orthanc is not running after the faults")
        if stack.node is None or stack.node.poll() is not None:
            raise BenchError(f"radnode run exited with {stack.node.returncode if stack.node else '?'}:\n"
                             f"{tail(work / 'logs' / 'radnode.log', 40)}")
        log(f"sent {len(ledger.studies)} studies; draining (at most {args.drain:g} s)")
        deadline, state, done = time.time() + args.drain, "", False
        drain_start = time.time()
        while time.time() < deadline:
            try:
                done, state = drained(stack, ledger)
            except Exception as exc:  # the database may be restarting: ask again
                state = f"{type(exc).__name__}: {exc}"
            if done:
                break
            time.sleep(2)
        drain = f"{'drained' if done else 'NOT drained'} after {time.time() - drain_start:.0f} s ({state})"
        log(drain)
        stop_rss.set()
        sampler.join(timeout=30)
        result = check(stack, ledger)
        result["drain"] = drain
        result["faults"] = {"kinds": kinds, "every_s": every, "planned": len(plan),
                            "events": [e.__dict__ for e in injector.events]}
        result["memory"] = {"samples": sampler.samples, "summary": memory_summary(sampler.samples)}
        result["settings"] = {k: v for k, v in vars(args).items() if k not in ("json", "tmp", "data")}
        result["machine"] = {"cpus": os.cpu_count(), "load_avg": os.getloadavg()}
        problems = problems_of(result)
        if not done:
            problems.append(f"the pipeline did not drain within {args.drain:g} s: {state}")
        result["problems"] = problems
        result["log_errors"] = log_findings(sorted((work / "logs").glob("*.log")))
        return result, problems
    finally:
        stop_send.set()
        stop_faults.set()
        stop_rss.set()
        procs.close(grace=30)
        if pg is not None:
            try:
                pg.close()
            except Exception as exc:
                print(f"could not remove the PostgreSQL database/cluster: {exc}", file=sys.stderr)
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import logging

    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)

    def on_term(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in the background (ignored there)
    try:
        result, problems = run(args)
    except BenchError as exc:
        print(f"soak failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print()
    print(render(result, args))
    if result["log_errors"]:
        print("\nERROR lines in the logs, by message (expected while a server is down; radnode recovers):")
        print("\n".join("  " + ln for ln in result["log_errors"]))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    if problems:
        print("\nFAILED:\n" + "\n".join("  - " + p for p in problems))
        return 1
    print("\nOK: nothing lost, every job delivered once, every result in Orthanc once")
    return 0


if __name__ == "__main__":
    sys.exit(main())
