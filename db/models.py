"""Job table schema: studies, series, instances (received) and jobs, deliveries (processing)."""

from __future__ import annotations

import enum
from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    """Aware UTC now; every timestamp in the job table is UTC."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator):
    """Stores UTC and always reads back an aware UTC datetime (SQLite forgets time zones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC) if dialect.name != "sqlite" else value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class SeriesState(enum.StrEnum):
    """Study/series machine: receiving -> complete -> routed (a late instance reopens to receiving)."""

    RECEIVING = "receiving"
    COMPLETE = "complete"
    ROUTED = "routed"


class JobState(enum.StrEnum):
    """Job machine (db/jobs.py holds the allowed transitions)."""

    QUEUED = "queued"
    RUNNING = "running"
    ENCODED = "encoded"
    DELIVERED = "delivered"
    FAILED = "failed"
    SKIPPED = "skipped"


class FailStage(enum.StrEnum):
    """Where a failed job failed."""

    INFER = "infer"
    ENCODE = "encode"
    DISPATCH = "dispatch"


class Priority(enum.StrEnum):
    STAT = "stat"
    ROUTINE = "routine"


class Rollout(enum.StrEnum):
    LIVE = "live"
    SILENT = "silent"
    REVIEW = "review"


class ReviewState(enum.StrEnum):
    PENDING = "pending"
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    EXPIRED = "expired"


class DeliveryState(enum.StrEnum):
    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"


UID = String(64)
STATE = String(16)


class Base(DeclarativeBase):
    pass


class Study(Base):
    __tablename__ = "study"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(UID, unique=True)
    state: Mapped[str] = mapped_column(STATE, default=SeriesState.RECEIVING)
    study_description: Mapped[str | None] = mapped_column(String(256))
    first_received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    reopened_count: Mapped[int] = mapped_column(Integer, default=0)
    routed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    route_note: Mapped[str | None] = mapped_column(Text, doc="what the study-level rules did, or why not")

    series: Mapped[list[Series]] = relationship(back_populates="study", order_by="Series.id")

    __table_args__ = (
        Index("ix_study_state_last", "state", "last_received_at"),
        Index("ix_study_first_received", "first_received_at", "id"),  # the studies list, newest first
    )


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_uid: Mapped[str] = mapped_column(UID, unique=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id"), index=True)
    state: Mapped[str] = mapped_column(STATE, default=SeriesState.RECEIVING)
    modality: Mapped[str | None] = mapped_column(String(16))
    sop_class_uid: Mapped[str | None] = mapped_column(UID)
    body_part_examined: Mapped[str | None] = mapped_column(String(64))
    series_description: Mapped[str | None] = mapped_column(String(256))
    protocol_name: Mapped[str | None] = mapped_column(String(256))
    manufacturer: Mapped[str | None] = mapped_column(String(256))
    slice_thickness: Mapped[float | None] = mapped_column(Float)
    image_type: Mapped[str | None] = mapped_column(String(256))
    series_number: Mapped[int | None] = mapped_column(Integer)
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    called_ae: Mapped[str | None] = mapped_column(String(16), doc="the AE title the sender called (C-STORE)")
    requested_priority: Mapped[str | None] = mapped_column(String(16), doc="RequestedProcedurePriority")
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    last_received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    reopened_count: Mapped[int] = mapped_column(Integer, default=0)
    routed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    expected_instances: Mapped[int | None] = mapped_column(Integer, doc="configured count for its protocol")
    completion_reason: Mapped[str | None] = mapped_column(String(160), doc="why the series was taken as complete")
    route_note: Mapped[str | None] = mapped_column(Text, doc="why the series got these jobs, or none")
    instances_removed_at: Mapped[datetime | None] = mapped_column(
        UTCDateTime, doc="instances received before this were removed (instance retention); the series row stays")

    study: Mapped[Study] = relationship(back_populates="series")

    __table_args__ = (
        Index("ix_series_state_last", "state", "last_received_at"),
        Index("ix_series_state_completed", "state", "completed_at"),  # the router's queue, oldest first
    )


class Instance(Base):
    __tablename__ = "instance"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"))
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    path: Mapped[str] = mapped_column(String(256))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    number_of_frames: Mapped[int | None] = mapped_column(Integer)
    acquisition_number: Mapped[int | None] = mapped_column(Integer)
    images_in_acquisition: Mapped[int | None] = mapped_column(Integer, doc="ImagesInAcquisition (completeness)")
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(UTCDateTime)
    receive_count: Mapped[int] = mapped_column(Integer, default=1)

    __table_args__ = (
        Index("ix_instance_series_received", "series_id", "received_at"),
        Index("ix_instance_received", "received_at", "series_id"),  # the tracker: series that got instances lately
    )


class Job(Base):
    """One plugin run on one series (at most one per series and plugin)."""

    __tablename__ = "job"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    plugin: Mapped[str] = mapped_column(String(64))
    plugin_version: Mapped[str | None] = mapped_column(String(32))
    rule: Mapped[str | None] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(STATE, default=JobState.QUEUED, index=True)
    queue: Mapped[str] = mapped_column(String(64))
    priority: Mapped[str] = mapped_column(String(16), default=Priority.ROUTINE)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    fail_stage: Mapped[str | None] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text, doc="why it failed or was skipped")
    weights_sha256: Mapped[str | None] = mapped_column(String(64))
    worker: Mapped[str | None] = mapped_column(String(128), doc="host/process that ran the last attempt")
    warnings: Mapped[list | None] = mapped_column(JSON)
    findings: Mapped[dict | None] = mapped_column(JSON, doc="JSON summary of the plugin's Findings")
    outputs: Mapped[list | None] = mapped_column(JSON, doc="paths of the objects written for this job")
    revision: Mapped[int] = mapped_column(Integer, default=0, server_default="0",
                                          doc="0, then +1 each time new instances changed the series' results")
    inputs_sha256: Mapped[str | None] = mapped_column(String(64), doc="SHA-256 of the input SOP Instance UIDs")
    objects: Mapped[list | None] = mapped_column(JSON, doc="identities of the DICOM objects of this revision")
    history: Mapped[list | None] = mapped_column(JSON, doc="earlier revisions: objects, times, why superseded")
    extra_series: Mapped[list | None] = mapped_column(JSON, doc="a multi-series plugin's other series (UIDs)")
    timings: Mapped[dict | None] = mapped_column(JSON, doc="seconds per stage of the last attempt")
    destinations: Mapped[list | None] = mapped_column(JSON, doc="destination names the rule chose; null = all")
    outputs_removed_at: Mapped[datetime | None] = mapped_column(UTCDateTime, doc="outputs deleted (retention)")
    rollout: Mapped[str] = mapped_column(String(16), default=Rollout.LIVE, server_default=Rollout.LIVE,
                                         doc="the mode it ran under: live, silent (never delivered), review")
    review_hours: Mapped[float | None] = mapped_column(Float, doc="review mode: how long a result may wait")
    review_timeout: Mapped[str | None] = mapped_column(String(16), doc="review mode, after review_hours: deliver "
                                                       "or discard")
    review_state: Mapped[str | None] = mapped_column(String(16), doc="review mode: pending, accepted, rejected, "
                                                     "expired")
    reviewed_by: Mapped[str | None] = mapped_column(String(64), doc="who accepted or rejected it")
    reviewed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    review_note: Mapped[str | None] = mapped_column(Text)
    review_due_at: Mapped[datetime | None] = mapped_column(UTCDateTime, doc="the review's timeout")
    input_stats: Mapped[dict | None] = mapped_column(JSON, doc="the loader's statistics of the input (monitoring)")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    queued_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    not_before: Mapped[datetime | None] = mapped_column(UTCDateTime, doc="held until then (a rule's hours)")
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime, doc="last time its task was sent")
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    encoded_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    series: Mapped[Series] = relationship()

    __table_args__ = (
        UniqueConstraint("series_id", "plugin", name="uq_job_series_plugin"),
        Index("ix_job_outputs_removed_updated", "outputs_removed_at", "updated_at"),  # output retention
        Index("ix_job_review_due", "review_state", "review_due_at"),  # the sweeper's review timeouts
        Index("ix_job_created", "created_at"),  # monitoring windows
    )


class Delivery(Base):
    """One job's results to one destination: pending -> sent | failed (retried with backoff while pending)."""

    __tablename__ = "delivery"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("job.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(STATE, default=DeliveryState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime, doc="due time; null = not yet due")
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime, doc="last time its task was sent")
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime, doc="an attempt in progress since")
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    instances: Mapped[int | None] = mapped_column(Integer, doc="objects the destination acknowledged")

    __table_args__ = (
        UniqueConstraint("job_id", "destination", name="uq_delivery_job_destination"),
        Index("ix_delivery_state_next", "state", "next_attempt_at"),
    )


class RolloutMode(Base):
    """An operator's rollout mode for a plugin or a rule, set at run time (overrides the rules file)."""

    __tablename__ = "rollout_mode"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    scope: Mapped[str] = mapped_column(String(16), doc="plugin or rule")
    name: Mapped[str] = mapped_column(String(64))
    mode: Mapped[str] = mapped_column(String(16))
    review_hours: Mapped[float | None] = mapped_column(Float, doc="review mode: how long a result waits")
    on_timeout: Mapped[str | None] = mapped_column(String(16), doc="review mode: deliver, discard or keep")
    updated_by: Mapped[str | None] = mapped_column(String(64))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (UniqueConstraint("scope", "name", name="uq_rollout_scope_name"),)


class Feedback(Base):
    """A reader's verdict on a job's result, one finding or one segment. Insert-only: the history is kept."""

    __tablename__ = "feedback"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("job.id"))
    reader: Mapped[str] = mapped_column(String(64), doc="API token name or dashboard login")
    target_kind: Mapped[str] = mapped_column(String(16), doc="result, finding or segment")
    target: Mapped[str] = mapped_column(String(128), doc="'' (result), SCHEME:CODE (finding), segment label")
    verdict: Mapped[str] = mapped_column(String(16), doc="agree, disagree (result, finding); accept, reject, "
                                         "edited (segment)")
    comment: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    __table_args__ = (
        Index("ix_feedback_job_created", "job_id", "created_at"),
        Index("ix_feedback_created", "created_at"),
    )


class Worker(Base):
    """A worker process that is alive: it refreshes `seen_at` every heartbeat period (readiness, dashboard)."""

    __tablename__ = "worker"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(200))
    pid: Mapped[int] = mapped_column(Integer)
    queues: Mapped[list] = mapped_column(JSON)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    seen_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
