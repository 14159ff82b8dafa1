"""Infer step as a Celery task: load job -> load image -> run plugin -> write findings -> record. Ids in, ids out."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery.signals import worker_process_init, worker_ready, worker_shutdown
from sqlalchemy.exc import NoResultFound, OperationalError

from db import deliveries, jobs, records, review, workers
from db.heartbeat import Heartbeat
from db.models import FailStage, JobState, Priority, Rollout, Series, Study, utcnow
from db.session import make_engine, make_sessionmaker
from node import metrics
from node.dispatch.dispatcher import Dispatcher
from node.logs import job_context, uid_hash
from node.pipeline.inference import load_plugin
from node.pipeline.prior_images import Gathered, gather_priors
from node.pipeline.run import run_series
from node.pipeline.stats import input_stats
from node.process import set_parent_death_signal
from node.queueing.broker import TASK_DISPATCH, TASK_INFER, Enqueuer
from node.results.common import ObjectRef, warm_up
from node.settings import Settings, load_settings
from plugins.base import Findings, Manifest, Plugin, WeightsUnavailable
from plugins.registry import Discovery, discover, unavailable_reason
from workers.celery_app import app

log = logging.getLogger("radnode.worker")


class WorkerRuntime:
    """Per-process state: settings, database, discovered plugins, models loaded once."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.engine = make_engine(settings.db_url)
        self.maker = make_sessionmaker(self.engine)
        self.discovery: Discovery = discover()
        self.plugins: dict[str, tuple[Plugin, str | None]] = {}
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.enqueuer = Enqueuer(settings, app=app)
        self.dispatcher = Dispatcher(settings, self.maker)

    def _plugin(self, manifest: Manifest) -> tuple[Plugin, str | None]:
        """The loaded plugin and the SHA-256 of its weights (loaded once per process). Raises
        WeightsUnavailable, PluginLoadError or whatever the plugin's load raises."""
        cached = self.plugins.get(manifest.name)
        if cached is None:
            cached = self.plugins[manifest.name] = load_plugin(manifest, self.settings)
        return cached

    def _finish(self, job_id: int, fn, *args: Any, **values: Any) -> bool:
        with self.maker.begin() as session:
            return fn(session, job_id, *args, **values)

    def infer(self, job_id: int) -> str:
        """Run one job if it is still queued. Returns the state it ends in (or why nothing ran).

        Every failure becomes the job's `failed` (stage, reason) or `skipped` (reason); nothing
        raises out of here except database errors (the task is then redelivered or swept).
        """
        with self.maker() as session:
            row = jobs.job_row(session, job_id)
            if row is None:
                log.warning("job %d does not exist; task dropped", job_id)
                return "missing"
            if row["state"] != JobState.QUEUED:
                log.info("job %d is %s already; duplicate task ignored", job_id, row["state"])
                return "duplicate"
            series, study, rel_paths = jobs.series_and_paths(session, row["series_id"])
        manifest = self.discovery.manifests.get(row["plugin"])
        if manifest is None:
            why = self.discovery.errors.get(row["plugin"], "not installed")
            reason = f"plugin {row['plugin']} unavailable on worker {self.name}: {why}"
            self._finish(job_id, jobs.fail, JobState.QUEUED, FailStage.INFER, reason)
            return JobState.FAILED
        unavailable = unavailable_reason(manifest, self.settings.models_path)
        if unavailable:
            self._finish(job_id, jobs.skip, JobState.QUEUED, unavailable, plugin_version=manifest.version)
            log.warning("job %d skipped: %s", job_id, unavailable)
            return JobState.SKIPPED
        with self.maker.begin() as session:
            if not jobs.start(session, job_id, self.name, plugin_version=manifest.version):
                log.info("job %d was taken by another worker", job_id)
                return "duplicate"
            mode = review.effective(session, job_id)  # the mode it runs under, overrides applied now
            review.record(session, job_id, mode)
        log.info("job %d started: plugin %s on series %s", job_id, manifest.name, uid_hash(series.series_uid))
        beat = functools.partial(jobs.heartbeat, job_id=job_id)
        with Heartbeat(self.maker, beat, self.settings.job_heartbeat_seconds, f"job {job_id}"):
            return self._run(job_id, manifest, series, study, rel_paths, row, mode)

    def _run(self, job_id: int, manifest: Manifest, series: Series, study: Study, rel_paths: list[str],
             row: Any, mode: review.Mode) -> str:
        """Load the model (once per process), then `run_series`; its result becomes the job's next state."""
        timings: dict[str, float] = {}
        if row["enqueued_at"] is not None:
            timings["queue_wait"] = round((utcnow() - row["enqueued_at"]).total_seconds(), 3)
        R = JobState.RUNNING
        t = time.perf_counter()
        try:
            plugin, sha = self._plugin(manifest)
        except WeightsUnavailable as exc:
            self._finish(job_id, jobs.skip, R, f"model unavailable: {exc}")
            return JobState.SKIPPED
        except Exception as exc:
            log.exception("job %d: plugin %s failed to load", job_id, manifest.name)
            self._finish(job_id, jobs.fail, R, FailStage.INFER, f"model load: {type(exc).__name__}: {exc}")
            return JobState.FAILED
        timings["model_load"] = round(time.perf_counter() - t, 3)
        stored = self.settings.instances_dir
        descriptions = _descriptions(series, study)
        others = []  # a multi-series plugin's other series: (files, descriptions)
        all_paths = list(rel_paths)
        for uid in row["extra_series"] or []:
            with self.maker() as session:
                try:
                    other, other_study, other_paths = jobs.series_and_paths(session,
                                                                            records.series_id_of(session, uid))
                except (LookupError, NoResultFound):
                    reason = f"image load: series {uid_hash(uid)} of the study is no longer recorded"
                    self._finish(job_id, jobs.fail, R, FailStage.INFER, reason, timings=timings)
                    return JobState.FAILED
            others.append(([stored / p for p in other_paths], _descriptions(other, other_study)))
            all_paths += other_paths
        revision = Revision.of(row, all_paths)
        triage = [c.model_dump() for c in manifest.triage]
        meta: dict[str, Any] = {"job_id": job_id, "source_series_uid": series.series_uid, "triage": triage}
        gathered = Gathered()
        if manifest.priors is not None and rel_paths:
            t = time.perf_counter()
            gathered = gather_priors(self.settings, manifest, stored / rel_paths[0])
            timings["priors"] = round(time.perf_counter() - t, 3)
            meta["priors"] = gathered.used
        result = run_series(plugin, manifest, self.settings, [stored / p for p in rel_paths], descriptions,
                            series.series_uid, self.settings.outputs_dir / str(job_id), sha, meta=meta,
                            paths_by_uid={Path(p).stem: stored / p for p in rel_paths}, revision=revision.number,
                            predecessors=revision.predecessors, priors=gathered.priors, others=others,
                            on_findings=functools.partial(self._flag_first, job_id, manifest, row, meta, mode))
        result.warnings = list(dict.fromkeys([*gathered.warnings, *result.warnings]))
        timings |= result.timings
        common: dict[str, Any] = {"weights_sha256": sha}
        if result.image is not None:
            common["input_stats"] = input_stats(result.image)
        if result.state == "failed":
            if result.error is not None:
                what = {"image": "image load", "model": f"plugin {manifest.name}"}.get(result.failed_at, "encoding")
                log.error("job %d: %s failed", job_id, what, exc_info=result.error)
            stage = FailStage.ENCODE if result.failed_at == "encode" else FailStage.INFER
            if result.failed_at != "image":  # the image loaded: its warnings and the seconds so far
                common |= {"warnings": result.warnings, "timings": timings}
            self._finish(job_id, jobs.fail, R, stage, result.reason, **common)
            return JobState.FAILED
        flags = triage_flags(manifest, result.findings)
        findings = {**result.findings.to_json(), "triage": triage, "flags": flags}
        if result.state == "not-applicable":
            self._finish(job_id, jobs.skip, R, f"not applicable: {result.reason}", warnings=result.warnings,
                         findings=findings, timings=timings, **common)
            return JobState.SKIPPED
        timings |= {f"encode:{kind}": seconds for kind, seconds in result.encode_parts.items()}
        if revision.superseded:
            log.info("job %d: the series changed after revision %d; revision %d supersedes it", job_id,
                     revision.number - 1, revision.number)
        with self.maker.begin() as session:
            done = jobs.transition(session, job_id, R, JobState.ENCODED, warnings=result.warnings, findings=findings,
                                   outputs=[str(p) for p in result.outputs], timings=timings,
                                   revision=revision.number, inputs_sha256=revision.inputs_sha256,
                                   objects=[o.to_json() for o in result.objects], history=revision.history,
                                   **({"priority": Priority.STAT} if flags else {}), **common)
            names = self.destination_names(row["destinations"]) if mode.mode != Rollout.SILENT else []
            delivery_ids = deliveries.prepare(session, job_id, names, utcnow()) if done else []
            if done and mode.mode == Rollout.REVIEW:  # nothing goes out until a reader accepts it
                review.park(session, job_id, delivery_ids, mode, utcnow())
                delivery_ids = []
        if not done:
            log.warning("job %d finished here but was taken back meanwhile; result left to the new run", job_id)
            return "superseded"
        metrics.job_timings(manifest.name, timings)
        going = {Rollout.SILENT: "silent mode: kept here, never delivered",
                 Rollout.REVIEW: f"review mode: {', '.join(names) or 'no destination'} after a reader accepts it"
                 }.get(mode.mode, f"delivering to {', '.join(names) or 'no destination'}")
        log.info("job %d encoded in %.2f s; %s", job_id, sum(timings.values()) - timings.get("queue_wait", 0), going)
        self.enqueue_dispatch(delivery_ids, Priority.STAT if flags or row["priority"] == Priority.STAT
                              else Priority.ROUTINE)
        return JobState.ENCODED

    def _flag_first(self, job_id: int, manifest: Manifest, row: Any, meta: dict[str, Any], mode: review.Mode,
                    findings: Findings) -> None:
        """Findings are in, encoding starts: a positive triage flag goes at once to the destinations that take
        flags first (its own delivery row, `<name>:flag`, sent at stat priority), with the findings recorded on
        the job so the flag message can be made before the objects exist. Never raises: a failure here only
        loses the head start (the full results still carry the flag)."""
        flags = triage_flags(manifest, findings)
        if not flags or mode.mode != Rollout.LIVE:  # silent and review results send nothing, flags included
            return
        try:
            names = [n for n in self.destination_names(row["destinations"])
                     if getattr(self.settings.destination(n), "flag_first", False)]
            with self.maker.begin() as session:
                recorded = jobs.record_flags(session, job_id, {**findings.to_json(), **meta, "flags": flags,
                                                               "plugin": manifest.name,
                                                               "plugin_version": manifest.version})
                ids = deliveries.prepare_flags(session, job_id, names, utcnow()) if recorded and names else []
        except Exception:
            log.exception("job %d: the triage flag could not be sent ahead; it goes with the results", job_id)
            return
        log.info("job %d: triage flag positive (%s)%s", job_id, ", ".join(f["meaning"] for f in flags),
                 f"; sent ahead to {', '.join(names)}" if ids else "")
        if not ids:
            return
        # Sent from here, beside the encoding: as a task it would wait behind this very job on a worker with one
        # process (the embedded default). One attempt each; a failed one is retried by the sweeper, and a worker
        # that dies mid-send stops its heartbeat, so the attempt is released.
        with self.maker.begin() as session:
            deliveries.mark_enqueued(session, ids, utcnow())
        for delivery_id in ids:
            threading.Thread(target=self._send_flag, args=(delivery_id,), name=f"flag-{delivery_id}",
                             daemon=True).start()

    def _send_flag(self, delivery_id: int) -> None:
        try:
            self.dispatcher.run(delivery_id)
        except Exception:  # the database: the sweeper sends it again
            log.exception("delivery %d: the triage flag could not be sent from the worker", delivery_id)

    def destination_names(self, chosen: list[str] | None) -> list[str]:
        """The destinations of a job: the ones its rule named, or every configured one."""
        return list(chosen) if chosen is not None else [d.name for d in self.settings.destinations]

    def enqueue_dispatch(self, delivery_ids: list[int], priority: str = Priority.ROUTINE) -> None:
        """Send the delivery tasks after the commit; ones the broker refuses are sent by the sweeper."""
        if not delivery_ids:
            return
        sent = self.enqueuer.send_dispatch(delivery_ids, priority)
        with self.maker.begin() as session:
            deliveries.mark_enqueued(session, sent, utcnow())

    def dispatch(self, delivery_id: int) -> str:
        return self.dispatcher.run(delivery_id)


def triage_flags(manifest: Manifest, findings: Findings) -> list[dict[str, Any]]:
    """The positive classifications the plugin declares triage flags, as coded concepts."""
    return [c.concept.model_dump() for c in findings.classifications if c.positive and manifest.is_triage(c.concept)]


def _descriptions(series: Series, study: Study) -> dict[str, str | None]:
    return {"BodyPartExamined": series.body_part_examined, "StudyDescription": study.study_description,
            "SeriesDescription": series.series_description, "ProtocolName": series.protocol_name}


@dataclass(frozen=True)
class Revision:
    """Which result revision a run makes. The same inputs as the last encoded run give the same revision (and
    so the same UIDs); new inputs after objects were made give the next one, whose SR names the last SR."""

    number: int
    inputs_sha256: str
    predecessors: tuple[ObjectRef, ...]
    history: list[dict[str, Any]]
    superseded: bool

    @classmethod
    def of(cls, row: Any, rel_paths: list[str]) -> Revision:
        digest = hashlib.sha256("\n".join(sorted(Path(p).stem for p in rel_paths)).encode()).hexdigest()
        history = list(row["history"] or [])
        number = row["revision"] or 0
        changed = bool(row["objects"]) and row["inputs_sha256"] not in (None, digest)
        if changed:
            history.append({"revision": number, "objects": row["objects"], "inputs_sha256": row["inputs_sha256"],
                            "superseded_at": utcnow().isoformat(), "reason": "new instances in the series"})
            number += 1
        last = history[-1]["objects"] if number and history else []
        return cls(number, digest, tuple(ObjectRef.from_json(o) for o in last), history, changed)


_runtime: WorkerRuntime | None = None
_runtime_pid: int | None = None


def runtime() -> WorkerRuntime:
    """This process's runtime (created after fork, so no connection crosses processes)."""
    global _runtime, _runtime_pid
    if _runtime is None or _runtime_pid != os.getpid():
        _runtime, _runtime_pid = WorkerRuntime(load_settings()), os.getpid()
    return _runtime


# A task that meets the job table down (PostgreSQL restarting) is sent again after 1, 2, 4 ... 30 s rather than
# dropped: else it waits for the sweeper's resend (job_resend_seconds, 10 minutes by default). A job found running
# on a later try is left to its lease; the job table stays the truth either way.
DB_RETRY = dict(autoretry_for=(OperationalError,), retry_backoff=1, retry_backoff_max=30, retry_jitter=False,
                max_retries=12)


@app.task(name=TASK_INFER, acks_late=True, reject_on_worker_lost=True, ignore_result=True, **DB_RETRY)
def infer(job_id: int) -> str:
    """Celery entry: run job `job_id` (an id only; the job table says what to do)."""
    with job_context(int(job_id)):
        return runtime().infer(int(job_id))



@app.task(name=TASK_DISPATCH, acks_late=True, reject_on_worker_lost=True, ignore_result=True, **DB_RETRY)
def dispatch(delivery_id: int) -> str:
    """Celery entry: one attempt of delivery `delivery_id` (the sweeper sends retries when due)."""
    return runtime().dispatch(int(delivery_id))


@worker_process_init.connect
def _warm_up(**_: Any) -> None:
    """Each pool process dies with its worker (however the worker dies: its jobs are recovered from the job
    table) and loads the encoders' tables now, not during its first job."""
    set_parent_death_signal(signal.SIGKILL)
    warm_up()


class Liveness:
    """The worker's main process records itself alive in the job table every heartbeat period (readiness
    and the dashboard read it). One short connection per beat: pool processes fork from this process."""

    def __init__(self, settings: Settings, name: str, queues: list[str]) -> None:
        from sqlalchemy.pool import NullPool

        self.settings, self.name, self.queues = settings, name, queues
        self.maker = make_sessionmaker(make_engine(settings.db_url, poolclass=NullPool))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="liveness", daemon=True)

    def _beat(self) -> None:
        with self.maker.begin() as session:
            workers.beat(session, self.name, socket.gethostname(), os.getpid(), self.queues, utcnow())

    def _run(self) -> None:
        while True:
            try:
                self._beat()
            except Exception:
                log.exception("worker liveness: could not record the heartbeat; retrying")
            if self.stop.wait(self.settings.job_heartbeat_seconds):
                return

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        try:
            with self.maker.begin() as session:
                workers.gone(session, self.name)
        except Exception:
            log.exception("worker liveness: could not remove the worker row")


_liveness: Liveness | None = None


@worker_ready.connect
def _alive(sender: Any = None, **_: Any) -> None:
    """The worker consumes its queues now: start recording it alive."""
    global _liveness
    queues = sorted(q.name for q in sender.app.amqp.queues.consume_from.values())
    _liveness = Liveness(load_settings(), sender.hostname, queues)
    _liveness.start()


@worker_shutdown.connect
def _stopping(**_: Any) -> None:
    if _liveness is not None:
        _liveness.close()
