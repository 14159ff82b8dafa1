"""The node process (`radnode run`): migrate, reconcile, receivers, tracker -> router -> sweeper, embedded worker."""

from __future__ import annotations

import itertools
import logging
import multiprocessing as mp
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from db.jobs import hand_back
from db.migrate import current_revision, upgrade
from db.models import utcnow
from db.records import known_paths, record_instance
from db.session import make_engine, make_sessionmaker
from node.dicom.header import HeaderError, read_header
from node.ingest.completeness import ExpectedCount
from node.ingest.ingest import to_record
from node.ingest.scp import listen_addresses, open_listeners, spawn_receiver
from node.ingest.storage import InstanceStore
from node.ingest.tracker import Tracker
from node.metrics import enable_multiprocess
from node.process import descendants, set_parent_death_signal
from node.queueing.broker import BASE_QUEUES, Enqueuer, is_embedded
from node.queueing.clock import StepWatch
from node.queueing.sweeper import Sweeper
from node.route.router import Router
from node.route.rules import RulesError, RuleSet, load_rules
from node.settings import Settings
from plugins.registry import Discovery, discover, unavailable_reason

log = logging.getLogger("radnode.node")


class StartupError(RuntimeError):
    """The node cannot start (database not migrated, port taken, ...); the message says why."""


def prepare_database(settings: Settings, engine: Engine, auto_upgrade: bool) -> None:
    """Upgrade the embedded (SQLite) database; refuse a PostgreSQL one that is not at head.

    Raises StartupError with the command to run.
    """
    from alembic.script import ScriptDirectory

    from db.migrate import alembic_config

    head = ScriptDirectory.from_config(alembic_config(settings.db_url)).get_current_head()
    if engine.dialect.name == "sqlite" or auto_upgrade:
        upgrade(engine)
        return
    current = current_revision(engine)
    if current != head:
        raise StartupError(f"database is at revision {current}, code expects {head}: run `radnode db upgrade`")


def _unknown_files(store: InstanceStore, sessionmaker: Any, batch: int = 1000):
    """Stored files without an instance row, looked up a batch at a time (not the whole table at once)."""
    files = store.iter_files()
    while chunk := list(itertools.islice(files, batch)):
        with sessionmaker() as session:
            known = known_paths(session, chunk)
        yield from (r for r in chunk if r not in known)


def reconcile(store: InstanceStore, sessionmaker: Any) -> int:
    """Record every stored file that has no row (a crash between rename and commit). Returns the count."""
    added = 0
    for relative in _unknown_files(store, sessionmaker):
        path = store.path(relative)
        try:
            header = read_header(path)
        except HeaderError as exc:
            log.warning("reconcile: unreadable stored file skipped (%s)", exc)
            continue
        rec = to_record(header, relative, path.stat().st_size, None)
        with sessionmaker.begin() as session:
            record_instance(session, rec, utcnow())
        added += 1
    if added:
        log.warning("reconcile: recorded %d stored instance(s) that had no row", added)
    return added


def load_plugins_and_rules(settings: Settings) -> tuple[Discovery, RuleSet]:
    """Discover plugins (broken ones are logged and left out) and validate the rules against them.

    Raises StartupError naming the rules file and line of the first problem.
    """
    discovery = discover()
    try:
        rules = load_rules(settings.rules_file, discovery.manifests, [d.name for d in settings.destinations])
    except (RulesError, OSError) as exc:
        raise StartupError(f"invalid routing rules: {exc}") from exc
    return discovery, rules


def worker_queues(rules: RuleSet) -> list[str]:
    """Every queue the embedded worker must serve: the base queues and any a rule names."""
    extra = sorted({r.queue for r in rules.rules if r.queue} - set(BASE_QUEUES))
    return [*BASE_QUEUES, *extra]


@dataclass
class Node:
    """Supervises the receiver and worker processes; tracks, routes and sweeps in this process."""

    settings: Settings
    receivers: dict[int, mp.process.BaseProcess] = field(default_factory=dict)
    listeners: list[socket.socket] = field(default_factory=list)  # the DICOM ports, shared by the receivers
    stop: threading.Event = field(default_factory=threading.Event)
    worker: subprocess.Popen | None = None
    api: mp.process.BaseProcess | None = None

    def start(self, auto_upgrade: bool = False) -> None:
        """Prepare the database and storage and start the receivers. Raises StartupError."""
        s = self.settings
        if threading.current_thread() is threading.main_thread():
            # from now on a SIGTERM stops the children too (serve_forever, or shutdown after a failed start)
            signal.signal(signal.SIGTERM, lambda *_: self.stop.set())
            signal.signal(signal.SIGINT, lambda *_: self.stop.set())
        s.data_path.mkdir(parents=True, exist_ok=True)
        s.models_path.mkdir(parents=True, exist_ok=True)
        self.store = InstanceStore(s.instances_dir, s.tmp_dir, s.min_free_bytes)
        self.engine = make_engine(s.db_url)
        try:
            prepare_database(s, self.engine, auto_upgrade)
        except StartupError:
            raise
        except Exception as exc:
            raise StartupError(f"database unavailable: {type(exc).__name__}: {exc}") from exc
        self.sessionmaker = make_sessionmaker(self.engine)
        self.discovery, self.rules = load_plugins_and_rules(s)
        removed = self.store.clean_tmp()
        if removed:
            log.info("removed %d partial file(s) left by an interrupted transfer", removed)
        reconcile(self.store, self.sessionmaker)
        enable_multiprocess(s.data_path / "metrics")  # before any child starts: they all write metrics there
        self._ready: Any = mp.get_context("spawn").Queue()
        try:
            self.listeners = open_listeners(s)
        except OSError as exc:
            raise StartupError(f"cannot listen for DICOM: {exc}") from exc
        for i in range(s.receivers):
            self.receivers[i] = spawn_receiver(s, i, self._ready, self.listeners)
        self._wait_ready(set(self.receivers))
        if s.http_port:
            self.api = spawn_api(s, self._ready)
            self._wait_ready({"api"})
        self.tracker = Tracker(self.sessionmaker, s.stable_seconds, min(s.sweep_seconds, s.stable_seconds / 2),
                               settle_seconds=s.settle_seconds, max_wait_seconds=s.max_wait_seconds,
                               expected=[ExpectedCount(re.compile(e.match, re.IGNORECASE), e.count)
                                         for e in s.expected_counts])
        self.enqueuer = Enqueuer(s)
        self.router = Router(self.sessionmaker, self.rules, self.discovery.manifests, self.enqueuer, s.instances_dir,
                             stat_called_aes=s.stat_called_ae_titles)
        self.sweeper = Sweeper(self.sessionmaker, self.enqueuer, s)
        self.clock = StepWatch(self.sessionmaker)
        if s.embedded_worker:
            self._start_worker()
        if s.watch_orthanc is not None:
            self._start_watcher()
        if s.ups_worklist is not None:
            self._start_performer()

    def _start_performer(self) -> None:
        """IHE AIW-I task performer: follow the UPS worklist in a thread of this process (stopped with the node;
        its workitems are recorded, so a restart resumes them)."""
        from node.ups.performer import Performer

        performer = Performer(self.settings, self.sessionmaker, self.discovery.manifests)
        self.performer = threading.Thread(target=performer.run, args=(self.stop,), name="ups-performer", daemon=True)
        self.performer.start()

    def _start_watcher(self) -> None:
        """Pull side: follow the configured Orthanc's /changes in a thread of this process."""
        from node.ingest.ingest import Ingest
        from node.ingest.pull import OrthancWatcher, orthanc_client

        w = self.settings.watch_orthanc
        password = w.password.get_secret_value() if w.password is not None else None
        watcher = OrthancWatcher(orthanc_client(w.url, w.username, password), Ingest(self.settings, self.sessionmaker),
                                 self.settings.data_path / "watch-orthanc.json", from_start=w.from_start)
        self.watcher = threading.Thread(target=watcher.run, args=(self.stop, w.interval_seconds), name="watch",
                                        daemon=True)
        self.watcher.start()

    def _start_worker(self) -> None:
        """The embedded worker: `python -m workers` in its own process, same settings (environment)."""
        queues = ",".join(worker_queues(self.rules))
        cmd = [sys.executable, "-m", "workers", "--queues", queues, "--concurrency",
               str(self.settings.worker_concurrency), "--name", f"radnode-embedded@{os.uname().nodename}"]
        node = os.getpid()

        def die_with_node() -> None:  # in the child, before exec: killed when the node dies, even by kill -9
            set_parent_death_signal(signal.SIGKILL)  # its jobs are recovered from the job table
            if os.getppid() != node:
                os._exit(1)

        self.worker = subprocess.Popen(cmd, env=os.environ.copy(), preexec_fn=die_with_node)
        log.info("embedded worker started (pid %d, queues %s)", self.worker.pid, queues)

    def _stop_worker(self, processes: list[int], deadline: float) -> None:
        """Let the embedded worker finish its running job until `deadline`; then stop it and hand the jobs its
        processes held back to the queue (a restarted node, or another worker, runs them again)."""
        assert self.worker is not None
        try:
            self.worker.wait(timeout=max(0.0, deadline - time.monotonic()))
            log.info("embedded worker stopped (any running job finished)")
            return
        except subprocess.TimeoutExpired:
            pass
        for pid in [*descendants(self.worker.pid), self.worker.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.worker.wait()
        host = socket.gethostname()
        try:
            with self.sessionmaker.begin() as session:
                handed = hand_back(session, [f"{host}:{pid}" for pid in processes], utcnow())
        except SQLAlchemyError:
            log.exception("embedded worker stopped after %g s; its running jobs could not be handed back now (the "
                          "sweeper requeues them after job_lost_seconds)", self.settings.stop_grace_seconds)
            return
        log.warning("embedded worker still busy after %g s: stopped; job(s) %s handed back to the queue",
                    self.settings.stop_grace_seconds, ", ".join(map(str, handed)) or "none")

    def _wait_ready(self, pending: set[int | str], timeout: float = 60.0, starting: bool = True) -> None:
        """Wait for these children to report ready. Raises StartupError; while `starting`, after shutting
        the node down (a child restarted later fails alone: the rest of the node keeps running)."""
        deadline = time.monotonic() + timeout
        while pending:
            try:
                index, error = self._ready.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                error = f"{', '.join(map(str, pending))} did not start in time"
                index = None
            if error:
                if starting:
                    self.shutdown()
                raise StartupError(error)
            pending.discard(index)

    def describe(self) -> list[str]:
        s = self.settings
        lines = [
            f"DICOM {'TLS' if tls else 'TCP'} {host}:{port} AE {s.ae_title} ({s.receivers} receiver processes)"
            for host, port, tls in listen_addresses(s)
        ]
        if s.http_port:
            scheme = "https" if s.http_tls_cert else "http"
            lines.append(f"HTTP {scheme}://{s.dicom_host}:{s.http_port}/ (dashboard, REST API /v1, STOW-RS /dicomweb, "
                         "/metrics, /docs)")
        lines.append(f"storage {s.data_path}")
        lines.append(f"database {self.engine.url.render_as_string(hide_password=True)}")
        lines.append(f"stable after {s.stable_seconds:g} s")
        broker = "embedded (SQLite, no server)" if is_embedded(s) else _hide_password(s.broker)
        worker = f"embedded worker x{s.worker_concurrency}" if s.embedded_worker else "external workers"
        lines.append(f"broker {broker}; {worker}")
        for name, manifest in sorted(self.discovery.manifests.items()):
            why = unavailable_reason(manifest, s.models_path)
            lines.append(f"plugin {name} {manifest.version} ({manifest.queue}): {why or 'available'}")
        for name, error in sorted(self.discovery.errors.items()):
            lines.append(f"plugin {name}: excluded ({error})")
        lines.append(f"rules: {len(self.rules.rules)} from {s.rules_file or 'the default rules'}")
        if s.watch_orthanc is not None:
            lines.append(f"watching Orthanc {_hide_password(s.watch_orthanc.url)} for stable studies")
        if s.ups_worklist is not None:
            lines.append(f"UPS worklist {_hide_password(s.ups_worklist.url)}: task performer as station "
                         f"{s.ups_worklist.station_name or s.ae_title}, every {s.ups_worklist.poll_seconds:g} s")
        for dest in s.destinations:
            lines.append(f"destination {dest.name}: {describe_destination(dest)}")
        if not s.destinations:
            lines.append("destinations: none configured (results stay in the outputs folder)")
        if s.allowed_aes:
            lines.append("calling AE allow-list: " + ", ".join(s.allowed_aes))
        return lines

    def pipeline_once(self) -> None:
        """Complete stable series, route them to jobs. Raises SQLAlchemyError when the database is down."""
        self.clock.check()  # a step of the wall clock first: the tracker compares stamps
        self.tracker.sweep()
        self.router.route_pending()

    def _pipeline(self) -> None:
        """Tracker -> router every sweep period, sweeper every heartbeat period; outages are retried."""
        next_sweep = next_purge = 0.0
        wait = self.tracker.sweep_seconds
        while not self.stop.wait(wait):
            wait = self.tracker.sweep_seconds
            try:
                self.pipeline_once()
                if time.monotonic() >= next_sweep:
                    self.sweeper.sweep()
                    next_sweep = time.monotonic() + self.settings.job_heartbeat_seconds
                if time.monotonic() >= next_purge:
                    next_purge = time.monotonic() + 300
                    self.sweeper.purge_outputs()
                    self.sweeper.purge_instances()
                wait = self.tracker.wait_seconds()
            except SQLAlchemyError:
                log.exception("pipeline pass failed (database); retrying")
            except Exception:
                log.exception("pipeline pass failed; retrying")

    def supervise_once(self) -> None:
        """Restart any receiver or embedded worker that died (a crash must not stop the node for good)."""
        if self.worker is not None and self.worker.poll() is not None and not self.stop.is_set():
            log.error("embedded worker exited with %s; restarting", self.worker.returncode)
            self._start_worker()
        if self.api is not None and not self.api.is_alive() and not self.stop.is_set():
            log.error("HTTP service exited with %s; restarting", self.api.exitcode)
            self.api = spawn_api(self.settings, self._ready)
            try:
                self._wait_ready({"api"}, timeout=30, starting=False)
            except StartupError:
                log.exception("HTTP service could not be restarted")
        for index, proc in list(self.receivers.items()):
            if not proc.is_alive() and not self.stop.is_set():
                log.error("receiver %d exited with %s; restarting", index, proc.exitcode)
                self.receivers[index] = spawn_receiver(self.settings, index, self._ready, self.listeners)
                try:
                    self._wait_ready({index}, timeout=30, starting=False)
                except StartupError:
                    log.exception("receiver %d could not be restarted", index)

    def serve_forever(self) -> None:
        """Run the tracker and supervision until SIGTERM/SIGINT, then shut down cleanly."""
        signal.signal(signal.SIGTERM, lambda *_: self.stop.set())
        signal.signal(signal.SIGINT, lambda *_: self.stop.set())
        tracker_thread = threading.Thread(target=self._pipeline, name="pipeline", daemon=True)
        tracker_thread.start()
        while not self.stop.wait(1.0):
            self.supervise_once()
        self.shutdown()
        tracker_thread.join(timeout=5)

    def shutdown(self) -> None:
        self.stop.set()
        deadline = time.monotonic() + self.settings.stop_grace_seconds
        worker_processes: list[int] = []
        if self.worker is not None and self.worker.poll() is None:
            worker_processes = [self.worker.pid, *descendants(self.worker.pid)]
            self.worker.terminate()  # Celery warm shutdown: finish the running task
        children = [*self.receivers.values(), *([self.api] if self.api is not None else [])]
        for proc in children:
            if proc.is_alive():
                proc.terminate()  # SIGTERM: stop accepting, finish running associations and requests
        for sock in self.listeners:  # the port is free once the receivers closed theirs too
            sock.close()
        for proc in children:
            proc.join(timeout=15)
            if proc.is_alive():
                proc.kill()
        if worker_processes:
            self._stop_worker(worker_processes, deadline)
        if getattr(self, "performer", None) is not None:
            self.performer.join(timeout=10)  # a retrieval under way is resumed after a restart
        if hasattr(self, "enqueuer"):
            self.enqueuer.close()
        log.info("node stopped")


def spawn_api(settings: Settings, ready: Any) -> mp.process.BaseProcess:
    """The HTTP service (REST API, STOW-RS, dashboard, metrics) in its own process."""
    from node.api.app import api_main

    proc = mp.get_context("spawn").Process(target=api_main, args=(settings.model_dump(), ready, os.getpid()),
                                           name="radnode-api",
                                           daemon=False)
    proc.start()
    return proc


def describe_destination(dest: Any) -> str:
    """One line about a destination, without credentials."""
    if dest.kind == "dicom":
        return f"DICOM {dest.ae_title}@{dest.host}:{dest.port}{' (TLS)' if dest.tls else ''}"
    if dest.kind in ("dicomweb", "orthanc"):
        return f"{'STOW-RS' if dest.kind == 'dicomweb' else 'Orthanc REST'} {_hide_password(dest.url)}"
    return "return to the sending AE (configured peers)"


def _hide_password(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]
