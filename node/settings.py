"""Configuration: every RADNODE_* setting, read once, shared by the node and the workers."""

from __future__ import annotations

import os
import re
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE: 16 chars, no backslash


def _check_ae(value: str) -> str:
    value = value.strip()
    if not _AE_RE.match(value):
        raise ValueError(f"not a valid AE title (1-16 printable characters, no backslash): {value!r}")
    return value


_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


def _check_name(value: str, what: str) -> str:
    if not _NAME_RE.match(value):
        raise ValueError(f"bad {what} name {value!r}: lower-case letters, digits, '-' and '_' (at most 64)")
    return value


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ExpectedCountSetting(_Config):
    """The number of instances series of a protocol have (completeness by evidence)."""

    match: str = Field(min_length=1, description="regex searched in ProtocolName and SeriesDescription, any case")
    count: int = Field(ge=1, le=1_000_000)

    @field_validator("match")
    @classmethod
    def _regex(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"bad regex {value!r}: {exc}") from None
        return value


class Peer(_Config):
    """A DICOM node we know by its AE title (for "return to sender")."""

    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    tls: bool = False

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        return _check_ae(v)


class _Destination(_Config):
    name: str = Field(description="lower-case name that rules use to pick this destination")
    objects: list[Literal["SR", "SEG", "SC"]] = Field(
        default_factory=lambda: ["SR", "SEG", "SC"], min_length=1,
        description="which result objects this destination receives, e.g. [SR, SC] for a PACS or viewer "
        "without SEG support; default all",
    )

    @field_validator("objects")
    @classmethod
    def _objects(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("objects lists a kind twice")
        return v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_name(v, "destination")


class DicomDestination(_Destination):
    """C-STORE SCU to a DICOM node (one association per job)."""

    kind: Literal["dicom"]
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    calling_ae: str | None = Field(None, description="our AE title towards this node; default ae_title")
    tls: bool = False
    tls_ca: Path | None = Field(None, description="CA bundle to verify the peer (TLS); default: system CAs")
    tls_cert: Path | None = Field(None, description="client certificate (PEM) when the peer asks for one")
    tls_key: Path | None = None

    @field_validator("ae_title", "calling_ae")
    @classmethod
    def _ae(cls, v: str | None) -> str | None:
        return None if v is None else _check_ae(v)


class DicomwebDestination(_Destination):
    """STOW-RS to a DICOMweb service root (e.g. http://pacs:8042/dicom-web)."""

    kind: Literal["dicomweb"]
    url: str
    username: str | None = None
    password: SecretStr | None = None
    token: SecretStr | None = Field(None, description="bearer token (instead of username/password)")
    verify_tls: bool | Path = Field(True, description="verify the server certificate, or a CA bundle path")


class OrthancDestination(_Destination):
    """Orthanc's REST API (POST /instances)."""

    kind: Literal["orthanc"]
    url: str
    username: str | None = None
    password: SecretStr | None = None


class ReturnToSender(_Destination):
    """C-STORE back to the AE that sent the series, looked up in `peers`."""

    kind: Literal["return-to-sender"]


class FhirDestination(_Destination):
    """FHIR R4 server: one transaction Bundle per job (DiagnosticReport, Observations, ImagingStudy, Device),
    derived from the job's findings and its SR (HL7 "DICOM SR to FHIR Resource Mapping")."""

    kind: Literal["fhir"]
    objects: list[Literal["SR", "SEG", "SC"]] = Field(
        default_factory=lambda: ["SR"], min_length=1,
        description="the objects the resources reference (derivedFrom); the SR is what they are mapped from")
    url: str = Field(description="FHIR base URL, e.g. https://ehr.example.org/fhir")
    username: str | None = None
    password: SecretStr | None = None
    token: SecretStr | None = Field(None, description="bearer token (instead of username/password)")
    verify_tls: bool | Path = Field(True, description="verify the server certificate, or a CA bundle path")
    report_status: Literal["final", "preliminary"] = Field(
        "preliminary", description="DiagnosticReport.status: an AI result awaiting a radiologist is preliminary")
    patient_identifier_system: str | None = Field(
        None, description="Patient.identifier.system of the PACS patient IDs (e.g. urn:oid:1.2.3 of the issuer); "
        "default: the IssuerOfPatientID of the source, else urn:dicom:patient-id")
    flag_first: bool = Field(False, description="a positive triage flag is sent at once, as its own short "
                             "message, before the full results")


class Hl7v2Destination(_Destination):
    """HL7 v2.5.1 ORU^R01 over MLLP (a RIS or interface engine): one message per job, OBX per finding."""

    kind: Literal["hl7v2"]
    objects: list[Literal["SR", "SEG", "SC"]] = Field(
        default_factory=lambda: ["SR"], min_length=1, description="the objects the message refers to")
    host: str
    port: int = Field(ge=1, le=65535)
    tls: bool = False
    tls_ca: Path | None = Field(None, description="CA bundle to verify the peer (TLS); default: system CAs")
    tls_cert: Path | None = Field(None, description="client certificate (PEM) when the peer asks for one")
    tls_key: Path | None = None
    sending_application: str = Field("RADNODE", max_length=180)
    sending_facility: str = Field("", max_length=180)
    receiving_application: str = Field("", max_length=180)
    receiving_facility: str = Field("", max_length=180)
    result_status: Literal["P", "F"] = Field("P", description="OBR-25/OBX-11: P preliminary (default), F final")
    ack_timeout_seconds: float = Field(30.0, gt=0, description="how long to wait for the ACK")
    flag_first: bool = Field(False, description="a positive triage flag is sent at once, as its own short "
                             "message, before the full results")


class WatchOrthanc(_Config):
    """Pull side: follow an Orthanc's /changes and pull each study once it is stable there."""

    url: str
    username: str | None = None
    password: SecretStr | None = None
    interval_seconds: float = Field(5.0, gt=0, description="how often /changes is read")
    from_start: bool = Field(False, description="first start: pull every stable study in the change log")


class UpsWorklist(_Config):
    """IHE AIW-I task performer: take AI tasks from a UPS-RS worklist (PS3.18 11), run the plugin each names
    (ScheduledWorkitemCodeSequence: CodeValue = plugin name, scheme 99RADNODE) and complete the workitem."""

    url: str = Field(description="UPS-RS service root; workitems are under <url>/workitems")
    username: str | None = None
    password: SecretStr | None = None
    token: SecretStr | None = Field(None, description="bearer token (instead of username/password)")
    verify_tls: bool | Path = Field(True, description="verify the server certificate, or a CA bundle path")
    poll_seconds: float = Field(10.0, gt=0, description="how often the worklist is searched and claimed tasks "
                                "are followed")
    station_name: str | None = Field(None, max_length=16, description="the station name code radnode claims "
                                     "as and reports as Performed Station; default our AE title")
    only_our_station: bool = Field(False, description="take only workitems whose ScheduledStationNameCodeSequence "
                                   "names station_name (unassigned ones are left to others)")
    destinations: list[str] | None = Field(None, description="destination names the results go to; default all")
    retrieve_from: str | None = Field(None, description="destination (kind dicom or dicomweb) the inputs are "
                                      "fetched from when the workitem gives no usable retrieve location")


Destination = Annotated[
    DicomDestination | DicomwebDestination | OrthancDestination | ReturnToSender | FhirDestination
    | Hl7v2Destination,
    Field(discriminator="kind"),
]


class ApiToken(_Config):
    """A bearer token for the HTTP API, stored as the SHA-256 of the token (`radnode token new` makes one)."""

    name: str = Field(description="who or what uses it (shown in logs, never the token)")
    sha256: str = Field(description="hex SHA-256 of the token")
    read_only: bool = Field(False, description="may read but not change state (retry, redeliver, STOW, infer)")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return _check_name(v, "token")

    @field_validator("sha256")
    @classmethod
    def _hash(cls, v: str) -> str:
        v = v.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{64}", v):
            raise ValueError("sha256 must be 64 hex digits (the SHA-256 of the token, not the token)")
        return v


class _YamlSource(PydanticBaseSettingsSource):
    """Reads the optional YAML file named by RADNODE_CONFIG (set by `--config`)."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path | None) -> None:
        super().__init__(settings_cls)
        self._data: dict[str, Any] = {}
        if path is not None:
            with open(path, encoding="utf-8") as f:
                loaded = yaml.safe_load(f) or {}
            if not isinstance(loaded, dict):
                raise ValueError(f"{path}: the configuration file must be a mapping of setting: value")
            self._data = loaded

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._data)


class Settings(BaseSettings):
    """All radnode settings. Environment (RADNODE_*) wins over the YAML file, which wins over defaults."""

    model_config = SettingsConfigDict(env_prefix="RADNODE_", extra="forbid", frozen=True)

    data_dir: Path = Field(Path("./radnode-data"), description="storage root: instances, outputs, embedded db")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default: SQLite file in the data dir")
    broker_url: str | None = Field(None, description="Celery broker URL; default: embedded, no server")
    ae_title: str = Field("RADNODE", description="our AE title")
    dicom_host: str = Field("0.0.0.0", description="address the DICOM and HTTP services listen on")
    dicom_port: int = Field(11112, ge=0, le=65535, description="DICOM listen port (0 = no plain-TCP listener)")
    http_port: int = Field(8080, ge=0, le=65535, description="HTTP listen port (API, dashboard; 0 = off)")
    http_tls_cert: Path | None = Field(None, description="HTTPS: certificate (PEM) uvicorn serves the API with")
    http_tls_key: Path | None = Field(None, description="HTTPS: private key (PEM) for http_tls_cert")
    api_tokens: list[ApiToken] = Field(
        default_factory=list, description="API bearer tokens, hashed (JSON list in RADNODE_API_TOKENS)"
    )
    api_read_open: bool = Field(False, description="reading the API and dashboard needs no token")
    max_upload_bytes: int = Field(
        4 * 1024**3, gt=0, description="largest HTTP request body (STOW-RS, /v1/infer); larger: 413"
    )
    infer_wait_seconds: float = Field(
        120.0, ge=0, le=3600, description="POST /v1/infer answers with the results if done within this time"
    )
    stable_seconds: float = Field(30.0, gt=0, description="series/study stability window in seconds")
    settle_seconds: float = Field(1.0, ge=0, description="a series whose headers prove it complete is taken "
                                  "once nothing arrived for this long (instead of the stability window)")
    max_wait_seconds: float = Field(600.0, gt=0, description="a series whose headers show instances still to come "
                                    "waits up to this long after its last instance, then is taken as it is")
    expected_counts: list[ExpectedCountSetting] = Field(
        [], description='instance counts per protocol, e.g. [{"match": "thorax 1.25", "count": 300}]: a series whose '
        "ProtocolName or SeriesDescription matches (regex, any case) is complete at that count")
    allowed_aes: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="calling AE titles allowed to associate; empty = accept all"
    )
    models_dir: Path | None = Field(None, description="model weights root; default <data dir>/models")
    tls_cert: Path | None = Field(None, description="DICOM TLS: our certificate (PEM)")
    tls_key: Path | None = Field(None, description="DICOM TLS: our private key (PEM)")
    tls_ca: Path | None = Field(None, description="DICOM TLS: CA bundle to verify peers; set = client certs required")
    tls_port: int = Field(2762, ge=1, le=65535, description="DICOM TLS listen port (used when cert and key are set)")
    max_instance_bytes: int = Field(2 * 1024**3, gt=0, description="largest dataset accepted by C-STORE")
    min_free_bytes: int = Field(64 * 1024**2, ge=0, description="refuse new instances (0xA700) below this free space")
    receivers: int = Field(
        default_factory=lambda: max(2, min(4, os.cpu_count() or 2)),
        ge=1,
        le=64,
        description="DICOM receiver processes sharing the port",
    )
    max_pdu: int = Field(0, ge=0, description="maximum PDU we accept (0 = unlimited)")
    dicom_associate_timeout: float = Field(
        10.0, gt=0, le=600, description="seconds a new DICOM connection has for its TLS handshake and its complete "
        "A-ASSOCIATE-RQ; then it is closed"
    )
    dicom_idle_timeout: float = Field(
        60.0, gt=0, le=3600, description="seconds an association may stay silent (or stop inside a PDU); then it "
        "is aborted"
    )
    dicom_max_associations: int = Field(
        64, ge=1, le=4096, description="connections one receiver process serves at once (associating or "
        "associated); more are closed at once"
    )
    dicom_max_per_source: int = Field(
        32, ge=1, le=4096, description="connections one receiver process serves at once from one source address"
    )
    sweep_seconds: float = Field(0.25, gt=0, description="how often the tracker looks for stable series")
    rules_file: Path | None = Field(None, description="routing rules YAML; default: the packaged default rules")
    stat_called_ae_titles: list[str] = Field(
        ["RADNODE_STAT"], description="called AE titles that make a series' jobs urgent (priority stat), e.g. a "
        "second AE title the PACS sends urgent studies to; RequestedProcedurePriority STAT or HIGH does the same")
    embedded_worker: bool = Field(True, description="`radnode run` also starts a worker process (off in production)")
    worker_concurrency: int = Field(1, ge=1, le=64, description="processes of the embedded worker")
    stop_grace_seconds: float = Field(30.0, ge=0, description="on stop, how long the embedded worker may finish "
                                      "a running job before it is stopped and the job handed back to the queue")
    device: str = Field("auto", description="model device: auto (CUDA when present), cpu, cuda, cuda:N")
    job_heartbeat_seconds: float = Field(5.0, gt=0, description="a running job's heartbeat period")
    job_lost_seconds: float = Field(60.0, gt=0, description="a running job without heartbeat this long is requeued")
    job_resend_seconds: float = Field(
        600.0, gt=0, description="a queued job not started this long after its task was sent is sent again"
    )
    job_max_attempts: int = Field(3, ge=1, description="runs of a job before it is failed as lost")
    manufacturer: str = Field("radnode", max_length=64, description="Manufacturer written on output objects")
    model_name: str = Field("radnode AI node", max_length=64, description="ManufacturerModelName on outputs")
    device_serial_number: str = Field("RADNODE", max_length=64, description="DeviceSerialNumber on outputs")
    institution_name: str | None = Field(None, max_length=64, description="InstitutionName on outputs")
    sc_max_images: int = Field(
        3, ge=1, le=50, description="heatmap secondary captures per heatmap (CT: the strongest slices)"
    )
    destinations: list[Destination] = Field(
        default_factory=list, description="where results go (JSON list in RADNODE_DESTINATIONS)"
    )
    peers: list[Peer] = Field(default_factory=list, description="known DICOM nodes by AE title (return to sender)")
    priors_source: str | None = Field(
        None, description="the destination (kind dicom: C-FIND + C-GET; dicomweb: QIDO-RS + WADO-RS) where plugins "
        "that compare with earlier exams find the patient's prior studies; unset: no priors")
    watch_orthanc: WatchOrthanc | None = Field(
        None, description="pull studies from this Orthanc when they become stable (JSON in RADNODE_WATCH_ORTHANC)"
    )
    ups_worklist: UpsWorklist | None = Field(
        None, description="act as an IHE AIW-I task performer on this UPS-RS worklist (JSON in RADNODE_UPS_WORKLIST)")
    delivery_max_attempts: int = Field(8, ge=1, le=100, description="tries per destination before it is failed")
    delivery_backoff_seconds: float = Field(10.0, gt=0, description="wait before the first retry; doubles each try")
    delivery_backoff_max_seconds: float = Field(600.0, gt=0, description="longest wait between two tries")
    output_retention_days: float = Field(
        7.0, ge=0, description="days outputs are kept after a job is finished (0 = keep for ever)"
    )
    instance_retention_days: float = Field(
        0.0, ge=0, description="days received instances (files and rows) are kept after their series was last "
        "received, once every job of the series is finished and every delivery sent (0 = keep for ever)"
    )
    log_json: bool = Field(False, description="log as JSON lines")
    log_level: str = Field("INFO")
    uid_hash_salt: SecretStr = Field(SecretStr(""), description="salt for the UID hashes in logs")
    monitoring_window_days: float = Field(7.0, gt=0, description="drift check: the last window, in days")
    monitoring_reference_days: float = Field(28.0, gt=0, description="drift check: the reference window, the days "
                                             "before the last window (unless a reference period is pinned)")
    monitoring_reference_from: datetime | None = Field(None, description="drift check: a pinned reference period "
                                                       "from (ISO 8601 with zone), with monitoring_reference_to")
    monitoring_reference_to: datetime | None = Field(None, description="drift check: the pinned period's end")
    monitoring_psi_threshold: float = Field(0.2, gt=0, description="drift warning when a population stability "
                                            "index exceeds this")
    monitoring_ks_alpha: float = Field(0.01, gt=0, lt=1, description="drift warning when a Kolmogorov-Smirnov p "
                                       "value is below this")
    monitoring_min_samples: int = Field(20, ge=2, description="drift check: jobs needed in each window")

    @model_validator(mode="after")
    def _monitoring_reference(self) -> Settings:
        start, end = self.monitoring_reference_from, self.monitoring_reference_to
        if (start is None) != (end is None):
            raise ValueError("monitoring_reference_from and monitoring_reference_to must be set together")
        if start is not None and (start.tzinfo is None or end.tzinfo is None):
            raise ValueError("monitoring_reference_from/to need a time zone (e.g. 2026-11-01T00:00:00Z)")
        if start is not None and start >= end:
            raise ValueError("monitoring_reference_from must be before monitoring_reference_to")
        return self

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        return _check_ae(v)

    @field_validator("allowed_aes", mode="before")
    @classmethod
    def _split_aes(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [p for p in (s.strip() for s in v.split(",")) if p]
        return v

    @field_validator("allowed_aes")
    @classmethod
    def _check_aes(cls, v: list[str]) -> list[str]:
        return [_check_ae(a) for a in v]

    @model_validator(mode="after")
    def _tls_pair(self) -> Settings:
        if (self.http_tls_cert is None) != (self.http_tls_key is None):
            raise ValueError("http_tls_cert and http_tls_key must be set together")
        token_names = [t.name for t in self.api_tokens]
        if len(set(token_names)) != len(token_names):
            raise ValueError("api_tokens: each name may be used once")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be set together")
        if self.tls_ca is not None and self.tls_cert is None:
            raise ValueError("tls_ca needs tls_cert and tls_key")
        if self.dicom_port == 0 and self.tls_cert is None:
            raise ValueError("dicom_port 0 disables plain TCP; then DICOM TLS must be configured")
        if self.job_lost_seconds < 2 * self.job_heartbeat_seconds:
            raise ValueError("job_lost_seconds must be at least twice job_heartbeat_seconds")
        names = [d.name for d in self.destinations]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"destination names must be unique: {', '.join(duplicates)} used more than once")
        if self.priors_source is not None:
            kinds = {d.name: d.kind for d in self.destinations}
            if kinds.get(self.priors_source) not in ("dicom", "dicomweb"):
                known = ", ".join(n for n, k in kinds.items() if k in ("dicom", "dicomweb")) or "none"
                raise ValueError(f"priors_source {self.priors_source!r} must name a destination of kind dicom or "
                                 f"dicomweb (configured: {known})")
        if self.ups_worklist is not None:
            ups = self.ups_worklist
            unknown = sorted(set(ups.destinations or []) - set(names))
            if unknown:
                raise ValueError(f"ups_worklist.destinations names unknown destination(s): {', '.join(unknown)}")
            kinds = {d.name: d.kind for d in self.destinations}
            if ups.retrieve_from is not None and kinds.get(ups.retrieve_from) not in ("dicom", "dicomweb"):
                known = ", ".join(n for n, k in kinds.items() if k in ("dicom", "dicomweb")) or "none"
                raise ValueError(f"ups_worklist.retrieve_from {ups.retrieve_from!r} must name a destination of kind "
                                 f"dicom or dicomweb (configured: {known})")
        aes = [p.ae_title for p in self.peers]
        if len(set(aes)) != len(aes):
            raise ValueError("peers: each AE title may be listed once")
        if not re.match(r"^(auto|cpu|cuda(:\d+)?|mps)$", self.device):
            raise ValueError(f"device must be auto, cpu, cuda, cuda:N or mps, got {self.device!r}")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = os.environ.get("RADNODE_CONFIG")
        return (init_settings, env_settings, _YamlSource(settings_cls, Path(path) if path else None))

    # Derived locations -------------------------------------------------------------------------

    @cached_property
    def data_path(self) -> Path:
        return self.data_dir.expanduser().resolve()

    @cached_property
    def instances_dir(self) -> Path:
        return self.data_path / "instances"

    @cached_property
    def tmp_dir(self) -> Path:
        """Temporary files live on the same file system as their destination (atomic rename)."""
        return self.data_path / "tmp"

    @cached_property
    def models_path(self) -> Path:
        return (self.models_dir or self.data_path / "models").expanduser().resolve()

    @cached_property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_path / 'radnode.db'}"

    @cached_property
    def outputs_dir(self) -> Path:
        return self.data_path / "outputs"

    @cached_property
    def broker(self) -> str:
        """Celery broker URL: the configured one (Redis in production) or the embedded SQLite file."""
        return self.broker_url or f"sqla+sqlite:///{self.data_path / 'broker.sqlite'}"

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert is not None

    def destination(self, name: str) -> Any:
        """The configured destination called `name`. Raises KeyError."""
        for dest in self.destinations:
            if dest.name == name:
                return dest
        raise KeyError(name)

    def peer(self, ae_title: str | None) -> Peer | None:
        """The configured peer with this AE title (exact match, trailing spaces ignored), or None."""
        wanted = (ae_title or "").strip()
        return next((p for p in self.peers if p.ae_title == wanted), None)


# Setting name (without prefix) -> environment variable, for documentation and the CLI.
ENV_NAMES = {name: f"RADNODE_{name.upper()}" for name in Settings.model_fields}


def load_settings(config: Path | None = None, **overrides: Any) -> Settings:
    """Read the settings once: environment, then the YAML file `config`, then defaults.

    Raises pydantic.ValidationError (a clear message per field) when a value is invalid.
    """
    if config is not None:
        os.environ["RADNODE_CONFIG"] = str(config)
    return Settings(**overrides)
