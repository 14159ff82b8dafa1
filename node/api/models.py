"""API step, payloads: the JSON the REST API answers with (documented in the OpenAPI schema)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SeriesOut(_Out):
    series_uid: str
    modality: str | None
    instances: int
    state: str = Field(description="receiving, complete or routed")
    series_number: int | None
    series_description: str | None
    body_part_examined: str | None
    sop_class_uid: str | None
    calling_ae: str | None
    first_received_at: str
    last_received_at: str
    completed_at: str | None
    completion_reason: str | None = Field(None, description="why it was taken as complete (window or evidence)")
    reopened_count: int
    routed_at: str | None
    route_note: str | None = Field(description="why the series got these jobs, or none")
    instances_removed_at: str | None = Field(
        None, description="its instances received before this were removed (instance retention); `instances` counts "
        "those left")


class StudyOut(_Out):
    study_uid: str
    state: str
    study_description: str | None
    first_received_at: str
    last_received_at: str
    completed_at: str | None
    reopened_count: int
    routed_at: str | None = Field(None, description="when the study-level rules were applied")
    route_note: str | None = Field(None, description="what the study-level rules did, or why not")
    series: list[SeriesOut]


class DeliveryOut(_Out):
    id: int
    destination: str
    state: str = Field(description="pending, sent or failed")
    attempts: int
    last_error: str | None
    instances: int | None
    next_attempt_at: str | None
    sent_at: str | None


class JobOut(_Out):
    id: int
    study_uid: str
    series_uid: str
    plugin: str
    plugin_version: str | None
    rule: str | None
    queue: str
    priority: str
    state: str = Field(description="queued, running, encoded, delivered, failed or skipped")
    attempts: int
    warnings: list[str]
    error: str | None
    fail_stage: str | None = Field(description="infer, encode or dispatch (failed jobs)")
    reason: str | None = Field(description="why it failed or was skipped")
    outputs: list[str]
    outputs_removed_at: str | None
    destinations: list[str] | None
    findings: dict[str, Any] | None = Field(description="the plugin's findings (classifications, measurements...)")
    timings: dict[str, float] = Field(description="seconds per stage of the last attempt")
    weights_sha256: str | None
    worker: str | None
    created_at: str | None
    queued_at: str | None
    not_before: str | None = Field(None, description="held until then by its rule's hours")
    revision: int = Field(0, description="0, then +1 each time new instances in the series superseded the results")
    objects: list[dict[str, str]] = Field([], description="the DICOM objects of this revision (kind and UIDs)")
    history: list[dict[str, Any]] = Field([], description="earlier revisions: objects, superseded_at, reason")
    extra_series: list[str] = Field([], description="a multi-series plugin's other series of the study (UIDs)")
    rollout: str = Field("live", description="the mode it ran under: live, silent (never delivered) or review")
    review_state: str | None = Field(None, description="review mode: pending, accepted, rejected or expired")
    reviewed_by: str | None = None
    reviewed_at: str | None = None
    review_note: str | None = None
    review_due_at: str | None = Field(None, description="review mode: when the review times out")
    input_stats: dict[str, Any] | None = Field(None, description="what the loader saw: scanner, geometry, "
                                               "intensities (monitoring)")
    started_at: str | None
    encoded_at: str | None
    delivered_at: str | None
    finished_at: str | None
    updated_at: str | None
    deliveries: list[DeliveryOut]


class PluginOut(_Out):
    name: str
    version: str | None = None
    queue: str | None = None
    modalities: list[str] = []
    outputs: list[str] = []
    reference_only: bool = False
    available: bool
    reason: str | None = Field(None, description="why it cannot run here (weights missing, broken plugin)")


class WorkerOut(_Out):
    name: str
    hostname: str
    pid: int
    queues: list[str]
    started_at: str
    seen_at: str


class Accepted(_Out):
    id: int
    state: str
    message: str


class Redelivered(_Out):
    id: int
    deliveries: list[int]
    message: str


class RedeliverIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    all: bool = Field(False, description="send to every destination again, not only the failed ones")


class InferAccepted(_Out):
    jobs: list[int]
    message: str
    skipped_files: int


class Problem(_Out):
    detail: Any
