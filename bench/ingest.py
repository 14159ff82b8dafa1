"""Ingest benchmark: C-STORE throughput of radnode against Orthanc and DCMTK storescp, side by side in one run.

What it measures
    Images per second that a receiver acknowledges when DCMTK ``storescu`` (env TCP_NODELAY=1)
    sends it one CT series over loopback, timed from the start of the sender(s) until every
    sender has exited:

    * "1 assoc": one ``storescu`` sending the whole series over one association;
    * "4 assoc": the series split into 4 equal chunks sent by 4 ``storescu`` in parallel.

    The series is built on the fly from the 64 real slices of the shared Philips chest CT
    (``ct_chest_philips_lungdx_a0001``), cycled to ``--slices`` (default 300) 512x512 slices with
    new Study/Series/SOP Instance UIDs, InstanceNumber and ImagePositionPatient. Every measurement
    (target x column x repeat) gets its own freshly generated series, written (and synced to disk)
    before the clock starts, so neither receiver ever sees a duplicate. Each measurement is preceded
    by a small warm-up send (its own study) with the same number of associations.

    The receivers are started by the script with their own temporary storage:

    * radnode: ``radnode run`` (SQLite job table, ``RADNODE_STABLE_SECONDS=5``, ``--receivers``
      sets ``RADNODE_RECEIVERS``); it acknowledges an instance only after fsync + rename + row.
      ``--routing off`` starts it with an empty rules file (``rules: []``: no jobs, so no inference
      on the same cores; this is the ingest figure the target is checked on); ``--routing on``
      with the packaged default rules (today's behaviour: every 300-slice series goes to lung-quant
      and ct-chest-triage, whose jobs run in the embedded worker while later measurements run).
      ``both`` (the default) measures routing off first, alternated with the other receivers, then
      stops that node and measures a routing-on node on its own (its ratio uses the Orthanc figures
      of the first phase);
    * Orthanc (``/usr/sbin/Orthanc``, Debian package ``orthanc``) with a minimal config (no plugins,
      no compression, ``ConcurrentJobs`` 2) and env TCP_NODELAY=1;
    * DCMTK ``storescp`` (Debian package ``dcmtk``), env TCP_NODELAY=1, flags ``+B -pdu 131072
      -od DIR``: ``+B`` (bit-preserving) writes the received data set to the file as it arrives, as
      radnode stores the bytes it received (no decode/re-encode; this also excludes ``-up``, which
      would rewrite UIDs), and ``-pdu 131072`` announces storescp's largest PDU so that storescu
      sends it 128 KiB PDUs as it does to radnode. No fsync. Without ``--fork`` storescp serves one
      association at a time, so the 1-association column uses a storescp without ``--fork`` and the
      4-association column a second one with ``--fork`` (a child process per association).

    Each receiver counts as started when it answers a C-ECHO (DCMTK ``echoscu``); radnode also
    when it has printed "radnode ... running".

    Receivers are measured alternately (radnode, Orthanc, storescp, radnode, ...) so machine noise
    affects all. Every send must exit 0 with no error lines, and the number of stored instances is
    checked on every side (``radnode studies --json``; Orthanc's REST API; storescp's files named
    by SOP Instance UID), so a failing receiver cannot look fast.

    CPU: the user + system CPU seconds of the receiver's whole process tree (radnode: the node, its
    receiver processes and embedded worker; Orthanc; storescp and its forks), read with psutil just
    before and just after the timed send (for storescp --fork, once its children have exited), where
    every process counts its own time plus that of its children that exited and were reaped
    (children_user, children_system); reported per 1000 instances. With routing on this includes
    the inference of earlier series that runs during the send.

Caveats
    The receivers do not promise the same: radnode fsyncs every instance (and its directory)
    before answering 0x0000, Orthanc and storescp do not. Orthanc answers with its default maximum
    PDU (16 KiB), radnode with none (storescu then sends 128 KiB PDUs), storescp with 128 KiB.
    Sender and receivers share the machine's cores, and so does anything else running on it: note
    the load average the script prints before and after.

Targets
    Orthanc 1.10 measured ~174 img/s (1 assoc) and ~369 img/s (4 assoc) on a 2-core machine with a
    300-slice CT. radnode must reach >= 1.2x Orthanc in both columns, measured in the same run.

Usage
    .venv/bin/python bench/ingest.py [--slices 300] [--repeat 3] [--routing off|on|both] [--receivers N]
                                     [--json FILE]

Needs ``storescu``, ``storescp`` and ``echoscu`` (Debian package ``dcmtk``) and ``Orthanc`` (package
``orthanc``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

REPO = Path(__file__).resolve().parent.parent
CT_FOLDER = "ct_chest_philips_lungdx_a0001"
ORTHANC_BIN = "/usr/sbin/Orthanc"
ASSOCIATIONS = (1, 4)
TARGET_RATIO = 1.2
RADNODE_AE = "RADNODE"
ORTHANC_AE = "ORTHANC"
STORESCP_AE = "STORESCP"
STORESCP_FLAGS = ("+B", "-pdu", "131072")  # bit-preserving, largest PDU (see the docstring)
ROW_OFF, ROW_ON, ROW_ORTHANC, ROW_STORESCP = "radnode (routing off)", "radnode (routing on)", "Orthanc", "storescp"
SEND_TIMEOUT = 600.0  # seconds: a receiver that stops answering fails the run instead of hanging it


class BenchError(RuntimeError):
    """The benchmark cannot go on (a receiver did not start, a send failed, counts differ)."""


# --- input series -------------------------------------------------------------------------------


def default_source() -> Path:
    """The shared CT: RADNODE_TEST_DATA (the shared data dir) or ../shared/data from the repo root."""
    root = os.environ.get("RADNODE_TEST_DATA")
    return (Path(root) if root else REPO.parent / "shared" / "data") / CT_FOLDER


def load_templates(source: Path) -> list[Dataset]:
    """The source slices in order (InstanceNumber, then position). Raises BenchError if none."""
    files = sorted(source.glob("*.dcm"))
    if not files:
        raise BenchError(f"no *.dcm files in {source} (use --source or set RADNODE_TEST_DATA)")
    datasets = [pydicom.dcmread(f) for f in files]
    datasets.sort(key=lambda d: (int(d.get("InstanceNumber", 0) or 0), float(d.ImagePositionPatient[2])))
    return datasets


@dataclass
class Series:
    """One generated series on disk."""

    study_uid: str
    files: list[Path]
    sop_uids: list[str]


class SeriesFactory:
    """Cycles the source slices into new series with fresh UIDs and continuous geometry."""

    def __init__(self, templates: list[Dataset]) -> None:
        self.templates = templates
        first = [float(v) for v in templates[0].ImagePositionPatient]
        last = [float(v) for v in templates[-1].ImagePositionPatient]
        n = max(1, len(templates) - 1)
        self.origin = first
        self.step = [(b - a) / n for a, b in zip(first, last, strict=True)]
        if not any(self.step):
            thickness = float(templates[0].get("SliceThickness", 1.0) or 1.0)
            self.step = [0.0, 0.0, -thickness]

    def make(self, folder: Path, count: int, description: str) -> Series:
        """Write `count` slices to `folder` (a new study and series) and return them."""
        folder.mkdir(parents=True)
        study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
        files, sop_uids = [], []
        for i in range(count):
            ds = self.templates[i % len(self.templates)]
            sop_uid = generate_uid()
            ds.SOPInstanceUID = sop_uid
            ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = series_uid
            if "FrameOfReferenceUID" in ds:
                ds.FrameOfReferenceUID = frame_uid
            ds.SeriesDescription = description
            ds.InstanceNumber = i + 1
            position = [o + i * s for o, s in zip(self.origin, self.step, strict=True)]
            ds.ImagePositionPatient = [f"{v:.6f}".rstrip("0").rstrip(".") for v in position]
            if "SliceLocation" in ds:
                ds.SliceLocation = f"{position[2]:.6f}".rstrip("0").rstrip(".")
            path = folder / f"{i + 1:05d}.dcm"
            ds.save_as(path)
            files.append(path)
            sop_uids.append(sop_uid)
        return Series(study_uid, files, sop_uids)


# --- processes ----------------------------------------------------------------------------------


class Processes:
    """Every process the benchmark starts; `close()` ends them (and their children) by pid."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, cmd: Sequence[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            # Own session: a Ctrl-C in the terminal reaches only us; we stop the others in order.
            proc = subprocess.Popen(
                list(cmd), env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def forget(self, proc: subprocess.Popen[bytes]) -> None:
        if proc in self.procs:
            self.procs.remove(proc)

    def close(self, grace: float = 20.0) -> None:
        """Newest first (senders before receivers): SIGTERM the process and its children, wait up to
        `grace` seconds, then SIGKILL what is left."""
        for proc in reversed(self.procs):
            if proc.poll() is not None:
                continue
            try:
                parent = psutil.Process(proc.pid)
                tree = [parent, *parent.children(recursive=True)]
                parent.terminate()
            except psutil.NoSuchProcess:
                continue
            _, alive = psutil.wait_procs(tree, timeout=grace)
            for p in alive:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
            psutil.wait_procs(alive, timeout=5)
            if proc.poll() is None:
                proc.wait(timeout=5)
        self.procs.clear()

    def stop(self, proc: subprocess.Popen[bytes], grace: float = 40.0) -> None:
        """End one process and its children as close() does; the others keep running."""
        others, self.procs = [p for p in self.procs if p is not proc], [proc]
        try:
            self.close(grace)
        finally:
            self.procs = others


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dicom_echo(ae: str, port: int) -> bool:
    """True when a C-ECHO (DCMTK echoscu) to 127.0.0.1:`port` succeeds.

    A real association rather than a bare TCP connect: pynetdicom counts a connection that closes
    before its A-ASSOCIATE-RQ as an active association for a while, which delays radnode's shutdown.
    """
    try:
        done = subprocess.run(
            ["echoscu", "-to", "5", "-aec", ae, "127.0.0.1", str(port)],
            stdin=subprocess.DEVNULL, capture_output=True, timeout=15, check=False,
        )
    except subprocess.TimeoutExpired:
        return False
    return done.returncode == 0


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_until(what: str, check: Callable[[], bool], proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    """Poll `check()` until true; raises BenchError if `proc` exits or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while not check():
        if proc.poll() is not None:
            raise BenchError(f"{what}: process exited with {proc.returncode}\n{tail(log)}")
        if time.monotonic() > deadline:
            raise BenchError(f"{what}: not ready after {timeout:g} s\n{tail(log)}")
        time.sleep(0.1)


# --- receivers ----------------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    ae: str
    port: int
    log: Path
    pid: int = 0

    def stored_instances(self, study_uid: str) -> int:
        raise NotImplementedError

    def stored(self, series: Series) -> int:
        """How many instances of `series` the receiver holds."""
        return self.stored_instances(series.study_uid)

    def quiesce(self) -> None:
        """Wait until the receiver has finished what the last send started (before reading its CPU)."""


def tree_cpu(pid: int) -> float:
    """User + system CPU seconds of process `pid` and its descendants, children that exited and were reaped
    included (children_user/system of their parent: no double count, a live process has none of its own
    live children's time). Raises BenchError when `pid` is gone."""
    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        raise BenchError(f"receiver process {pid} is gone") from None
    total = 0.0
    for p in tree:
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:  # exited between the listing and now: its parent counts it once reaped
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


@dataclass
class Radnode(Target):
    env: dict[str, str] = field(default_factory=dict)
    command: list[str] = field(default_factory=list)

    def cli(self, *args: str) -> str:
        """Run `radnode ARGS` with the node's environment; returns stdout. Raises BenchError."""
        done = subprocess.run(
            [*self.command, *args], env=self.env, capture_output=True, text=True, timeout=120, check=False
        )
        if done.returncode != 0:
            raise BenchError(f"radnode {' '.join(args)} exited {done.returncode}: {done.stderr[-2000:]}")
        return done.stdout

    def studies(self, study_uid: str | None = None) -> list[dict[str, Any]]:
        args = ["studies", "--json", "--limit", "100000"]
        if study_uid:
            args += ["--study", study_uid]
        try:
            rows: list[dict[str, Any]] = json.loads(self.cli(*args))
        except json.JSONDecodeError as exc:
            raise BenchError(f"radnode studies --json printed something that is not JSON: {exc}") from None
        return rows

    def stored_instances(self, study_uid: str) -> int:
        return sum(se["instances"] for st in self.studies(study_uid) for se in st["series"])


@dataclass
class Orthanc(Target):
    http_port: int = 0

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=30) as r:
            return json.load(r)

    def post(self, path: str, body: bytes) -> Any:
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=body, method="POST")
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.load(r)

    def stored_instances(self, study_uid: str) -> int:
        found = [x for x in self.post("/tools/lookup", study_uid.encode()) if x.get("Type") == "Study"]
        if not found:
            return 0
        return int(self.get(f"/studies/{found[0]['ID']}/statistics")["CountInstances"])


@dataclass
class StoreSCP(Target):
    folder: Path = Path()

    def stored(self, series: Series) -> int:
        # storescp names a file <modality prefix>.<SOP Instance UID> (its default filenames)
        names = {p.name.split(".", 1)[-1] for p in self.folder.iterdir()}
        return sum(uid in names for uid in series.sop_uids)

    def total(self) -> int:
        return sum(1 for p in self.folder.iterdir() if p.is_file())

    def quiesce(self) -> None:
        """storescp --fork: its children exit after their association is released; wait up to 10 s."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if not psutil.Process(self.pid).children():
                    return
            except psutil.NoSuchProcess:
                return
            time.sleep(0.02)


def radnode_command() -> list[str]:
    """`radnode` beside this interpreter, else the repo's venv, else `python -m node.cli`."""
    for candidate in (Path(sys.executable).parent / "radnode", REPO / ".venv" / "bin" / "radnode"):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return [str(candidate)]
    return [sys.executable, "-m", "node.cli"]


def start_radnode(procs: Processes, work: Path, receivers: int | None, database_url: str | None = None,
                  extra_env: dict[str, str] | None = None, name: str = "radnode") -> Radnode:
    """Start `radnode run` on a free loopback port with data dir and log under work/`name`; returns when it
    said "running" and the port answers. `extra_env` adds or overrides settings (RADNODE_...)."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADNODE_")}  # hermetic settings
    env.update(
        RADNODE_DATA_DIR=str(work / f"{name}-data"),
        RADNODE_DICOM_HOST="127.0.0.1",
        RADNODE_DICOM_PORT=str(port),
        RADNODE_HTTP_PORT=str(free_port()),
        RADNODE_STABLE_SECONDS="5",
        RADNODE_AE_TITLE=RADNODE_AE,
    )
    if receivers is not None:
        env["RADNODE_RECEIVERS"] = str(receivers)
    env.update(extra_env or {})
    command = radnode_command()
    if database_url:  # e.g. a PostgreSQL database made for the run; migrated explicitly as in production
        env["RADNODE_DATABASE_URL"] = database_url
        subprocess.run([*command, "db", "upgrade"], env=env, check=True, capture_output=True)
    log = work / "logs" / f"{name}.log"
    proc = procs.start([*command, "run"], env, log)

    def running() -> bool:
        return any(
            line.startswith("radnode ") and line.rstrip().endswith("running")
            for line in log.read_text(errors="replace").splitlines()
        )

    wait_until("radnode start", running, proc, log, timeout=120)
    wait_until("radnode C-ECHO", lambda: dicom_echo(RADNODE_AE, port), proc, log, timeout=30)
    return Radnode("radnode", RADNODE_AE, port, log, proc.pid, env=env, command=command)


def start_orthanc(procs: Processes, work: Path) -> Orthanc:
    """Start Orthanc with its own config on free loopback ports; returns when REST and DICOM answer."""
    if not os.access(ORTHANC_BIN, os.X_OK):
        raise BenchError(f"{ORTHANC_BIN} not found: apt-get install orthanc")
    http_port, dicom_port = free_port(), free_port()
    while dicom_port == http_port:
        dicom_port = free_port()
    root = work / "orthanc"
    config = {
        "Name": "radnode-bench",
        "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "index"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": ORTHANC_AE,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomAlwaysAllowStore": True,
        "DicomCheckCalledAet": False,
        "Plugins": [],
        "OverwriteInstances": True,
        "StorageCompression": False,
        "ConcurrentJobs": 2,
    }
    root.mkdir(parents=True)
    config_path = root / "config.json"
    config_path.write_text(json.dumps(config, indent=2))
    log = work / "logs" / "orthanc.log"
    proc = procs.start([ORTHANC_BIN, str(config_path)], {**os.environ, "TCP_NODELAY": "1"}, log)
    target = Orthanc("Orthanc", ORTHANC_AE, dicom_port, log, proc.pid, http_port=http_port)

    def rest_up() -> bool:
        try:
            target.get("/system")
            return True
        except (OSError, urllib.error.URLError, ValueError):
            return False

    wait_until("Orthanc REST", rest_up, proc, log, timeout=60)
    wait_until("Orthanc C-ECHO", lambda: dicom_echo(ORTHANC_AE, dicom_port), proc, log, timeout=30)
    return target


def start_storescp(procs: Processes, work: Path, fork: bool) -> StoreSCP:
    """Start DCMTK storescp (STORESCP_FLAGS, `--fork` when asked) writing into its own folder; returns when it
    answers a C-ECHO."""
    name = "storescp-fork" if fork else "storescp"
    folder = work / name
    folder.mkdir()
    port = free_port()
    log = work / "logs" / f"{name}.log"
    cmd = ["storescp", *(["--fork"] if fork else []), *STORESCP_FLAGS, "-aet", STORESCP_AE, "-od", str(folder),
           str(port)]
    proc = procs.start(cmd, {**os.environ, "TCP_NODELAY": "1"}, log)
    wait_until(f"{name} C-ECHO", lambda: dicom_echo(STORESCP_AE, port), proc, log, timeout=30)
    return StoreSCP(name, STORESCP_AE, port, log, proc.pid, folder=folder)


# --- sending ------------------------------------------------------------------------------------


def chunks(files: list[Path], n: int) -> list[list[Path]]:
    """`files` split into `n` contiguous chunks whose sizes differ by at most one."""
    size, extra = divmod(len(files), n)
    out, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        out.append(files[start:end])
        start = end
    return [c for c in out if c]


def send(procs: Processes, target: Target, files: list[Path], associations: int, logs: Path, label: str) -> float:
    """Send `files` over `associations` parallel storescu; returns seconds from start to last exit.

    Raises BenchError when a storescu exits non-zero, logs an error or runs past SEND_TIMEOUT.
    """
    env = {**os.environ, "TCP_NODELAY": "1"}
    parts = chunks(files, associations)
    log_paths = [logs / f"storescu-{label}-{i}.log" for i in range(len(parts))]
    for p in log_paths:
        p.unlink(missing_ok=True)
    started = time.perf_counter()
    running = [
        procs.start(["storescu", "-aec", target.ae, "127.0.0.1", str(target.port), *map(str, part)], env, log)
        for part, log in zip(parts, log_paths, strict=True)
    ]
    try:
        codes = [p.wait(timeout=max(1.0, started + SEND_TIMEOUT - time.perf_counter())) for p in running]
    except subprocess.TimeoutExpired:
        raise BenchError(f"storescu to {target.name} ({label}) still running after {SEND_TIMEOUT:g} s") from None
    elapsed = time.perf_counter() - started
    for p in running:
        procs.forget(p)
    for code, log in zip(codes, log_paths, strict=True):
        errors = [ln for ln in log.read_text(errors="replace").splitlines() if ln.startswith(("E:", "F:"))]
        if code != 0 or errors:
            raise BenchError(f"storescu to {target.name} ({label}) exited {code}:\n" + "\n".join(errors[:10]))
    return elapsed


# --- the benchmark ------------------------------------------------------------------------------


@dataclass
class Column:
    runs: list[float] = field(default_factory=list)  # img/s
    cpu: list[float] = field(default_factory=list)  # receiver CPU seconds per 1000 instances

    @property
    def median(self) -> float:
        return statistics.median(self.runs) if self.runs else float("nan")

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu) if self.cpu else float("nan")


def measure(
    procs: Processes,
    target: Target,
    factory: SeriesFactory,
    work: Path,
    associations: int,
    slices: int,
    warmup: int,
    label: str,
    keep: bool,
    settle: float,
) -> tuple[float, float]:
    """One measurement: generate, warm up, send, verify. Returns (img/s, receiver CPU s per 1000 instances).
    Raises BenchError."""
    folder = work / "series" / label
    warm = factory.make(folder / "warmup", max(warmup, associations), f"ingest bench warm-up {label}")
    series = factory.make(folder / "series", slices, f"ingest bench {label}")
    os.sync()  # nothing left to write back from generation (or the other target) while we time
    time.sleep(settle)
    logs = work / "logs"
    send(procs, target, warm.files, associations, logs, label + "-warmup")
    target.quiesce()
    cpu_before = tree_cpu(target.pid)
    seconds = send(procs, target, series.files, associations, logs, label)
    target.quiesce()
    cpu = tree_cpu(target.pid) - cpu_before
    stored = target.stored(series)
    if stored != slices:
        raise BenchError(f"{target.name} ({label}): {stored} instances stored, {slices} sent")
    if not keep:
        shutil.rmtree(folder)
    return slices / seconds, cpu * 1000 / slices


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def render(results: dict[str, dict[int, Column]], slices: int, repeat: int, bytes_per_series: int,
           load: tuple[str, str]) -> str:
    """The table: a row per receiver, img/s and CPU s/1000 img per column, then the ratios and the verdict."""
    width = 23
    cols = [f"{n} assoc img/s" for n in ASSOCIATIONS] + [f"CPU s/1000 ({n} assoc)" for n in ASSOCIATIONS]
    lines = [
        f"ingest of a {slices}-slice 512x512 CT ({bytes_per_series / 1e6:.0f} MB), median of {repeat} run(s) per cell",
        f"load average (1, 5, 15 min) before: {load[0]}; after: {load[1]}",
        f"{'':<{width}}" + "".join(f"{c:>22}" for c in cols),
    ]
    for name, row in results.items():
        cells = [f"{row[n].median:.1f}" for n in ASSOCIATIONS] + [f"{row[n].cpu_median:.2f}" for n in ASSOCIATIONS]
        lines.append(f"{name:<{width}}" + "".join(f"{c:>22}" for c in cells))
    orthanc = results[ROW_ORTHANC]
    for name in (ROW_OFF, ROW_ON):
        if name in results:
            row = results[name]
            cells = [f"{ratio(row[n].median, orthanc[n].median):.2f}x" for n in ASSOCIATIONS]
            cells += [f"{ratio(row[n].cpu_median, orthanc[n].cpu_median):.2f}x" for n in ASSOCIATIONS]
            lines.append(f"{name.replace('radnode', 'radnode/Orthanc'):<{width}}" + "".join(f"{c:>22}" for c in cells))
    lines.append("storescp: no --fork in the 1-association column, --fork in the 4-association column")
    if ROW_OFF in results:
        met = all(ratio(results[ROW_OFF][n].median, orthanc[n].median) >= TARGET_RATIO for n in ASSOCIATIONS)
        lines.append(f"target radnode (routing off) >= {TARGET_RATIO:g}x Orthanc in both columns (medians): "
                     f"{'MET' if met else 'NOT MET'}")
    return "\n".join(lines)


def log_findings(log: Path) -> list[str]:
    """Warning/error/traceback lines of a receiver log (radnode's format, Orthanc's E lines), at most 10."""
    keys = (" WARNING ", " ERROR ", " CRITICAL ", "Traceback")
    lines = [
        ln
        for ln in log.read_text(errors="replace").splitlines()
        if any(k in ln for k in keys) or (ln[:1] == "E" and ln[1:5].isdigit())
    ]
    return lines[:10]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--source", type=Path, default=None, help=f"folder of source slices (default: {default_source()})")
    p.add_argument("--slices", type=int, default=300, help="slices per series (default 300)")
    p.add_argument("--repeat", type=int, default=3, help="measurements per cell (default 3)")
    p.add_argument("--warmup", type=int, default=8, help="files sent before each measurement (default 8)")
    p.add_argument("--routing", choices=("off", "on", "both"), default="both",
                   help="radnode with an empty rules file (off), the default rules (on), or both (default)")
    p.add_argument("--receivers", type=int, default=None, help="RADNODE_RECEIVERS (default: radnode's own)")
    p.add_argument("--database-url", default=None, help="RADNODE_DATABASE_URL (default: embedded SQLite)")
    p.add_argument("--settle", type=float, default=1.0, help="seconds of quiet before each measurement")
    p.add_argument("--json", type=Path, default=None, help="write the figures to this file")
    p.add_argument("--tmp", type=Path, default=None, help="parent of the temporary work folder")
    p.add_argument("--keep", action="store_true", help="keep the temporary work folder (series, storage, logs)")
    args = p.parse_args(argv)
    if args.slices < 4 or args.repeat < 1 or args.warmup < 0:
        p.error("--slices must be >= 4, --repeat >= 1, --warmup >= 0")
    return args


def load_average() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def run(args: argparse.Namespace) -> dict[str, Any]:
    for tool in ("storescu", "storescp", "echoscu"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} not found: apt-get install dcmtk")
    source = (args.source or default_source()).resolve()
    factory = SeriesFactory(load_templates(source))
    work = Path(tempfile.mkdtemp(prefix="radnode-ingest-", dir=args.tmp))
    (work / "logs").mkdir()
    (work / "empty-rules.yaml").write_text("rules: []\n")
    procs = Processes()
    load_before = load_average()
    print(f"work folder {work}; load average before: {load_before}", flush=True)
    try:
        orthanc = start_orthanc(procs, work)
        scp = {1: start_storescp(procs, work, fork=False), 4: start_storescp(procs, work, fork=True)}
        version = orthanc.get("/system").get("Version", "?")
        print(f"Orthanc {version} on port {orthanc.port}, storescp on ports {scp[1].port} and {scp[4].port} (--fork)",
              flush=True)
        phases = {"off": [ROW_OFF], "on": [ROW_ON], "both": [ROW_OFF, ROW_ON]}[args.routing]
        results: dict[str, dict[int, Column]] = {}
        sent: dict[str, int] = {}
        for row in phases:
            # routing off: no rules; on: the packaged default rules (RADNODE_RULES_FILE unset)
            extra = {"RADNODE_RULES_FILE": str(work / "empty-rules.yaml")} if row == ROW_OFF else {}
            node = start_radnode(procs, work, args.receivers, args.database_url, extra,
                                 name="radnode-" + row.split()[-1].rstrip(")"))
            node_proc = next(p for p in procs.procs if p.pid == node.pid)
            print(f"{row} on port {node.port}", flush=True)
            rows: dict[str, dict[int, Target]] = {row: {n: node for n in ASSOCIATIONS}}
            if ROW_ORTHANC not in results:  # the others are measured once, alternated with the first radnode
                rows[ROW_ORTHANC] = {n: orthanc for n in ASSOCIATIONS}
                rows[ROW_STORESCP] = scp
            for name in rows:
                results[name] = {n: Column() for n in ASSOCIATIONS}
            for r in range(args.repeat):
                for n in ASSOCIATIONS:
                    for name, targets in rows.items():  # alternate: radnode, Orthanc, storescp, radnode, ...
                        target = targets[n]
                        label = f"{target.name.lower()}-{n}assoc-{r + 1}"
                        rate, cpu = measure(
                            procs, target, factory, work, n, args.slices, args.warmup, label, args.keep, args.settle
                        )
                        sent[target.name] = sent.get(target.name, 0) + args.slices + max(args.warmup, n)
                        results[name][n].runs.append(rate)
                        results[name][n].cpu.append(cpu)
                        print(f"  {name:<22} {n} assoc  run {r + 1}/{args.repeat}: {rate:7.1f} img/s, "
                              f"{cpu:6.2f} CPU s/1000 img", flush=True)
            # Whole-run check: every instance sent to this node (warm-ups included) has its row.
            total = sum(se["instances"] for st in node.studies() for se in st["series"])
            if total != sent[node.name]:
                raise BenchError(f"{row} holds {total} instances, {sent[node.name]} were sent")
            print(f"verified: {row} holds {total} instances", flush=True)
            findings = log_findings(node.log)
            if findings:
                print(f"{row} log has warnings/errors ({node.log}):\n" + "\n".join("  " + ln for ln in findings))
            procs.stop(node_proc)
            sent.pop(node.name)
        orthanc_total = int(orthanc.get("/statistics")["CountInstances"])
        if orthanc_total != sent["Orthanc"]:
            raise BenchError(f"Orthanc holds {orthanc_total} instances, {sent['Orthanc']} were sent")
        scp_total = scp[1].total() + scp[4].total()
        if scp_total != sent[scp[1].name] + sent[scp[4].name]:
            raise BenchError(f"storescp holds {scp_total} instances, {sent[scp[1].name] + sent[scp[4].name]} sent")
        print(f"verified: Orthanc holds {orthanc_total} instances, storescp {scp_total}", flush=True)
        load_after = load_average()
        bytes_per_series = sum(f.stat().st_size for f in sorted(source.glob("*.dcm")))
        bytes_per_series = bytes_per_series * args.slices // len(factory.templates)
        print()
        print(render(results, args.slices, args.repeat, bytes_per_series, (load_before, load_after)))
        for target in (orthanc, scp[1], scp[4]):
            findings = log_findings(target.log)
            if findings:
                print(f"\n{target.name} log has warnings/errors ({target.log}):")
                print("\n".join("  " + ln for ln in findings))
        return {
            "slices": args.slices,
            "repeat": args.repeat,
            "warmup": args.warmup,
            "routing": args.routing,
            "receivers": args.receivers,
            "source": str(source),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "load_before": load_before, "load_after": load_after},
            "orthanc_version": version,
            "storescp_flags": list(STORESCP_FLAGS),
            "results": {
                name: {f"{n}_assoc": {"runs": c.runs, "median": c.median, "cpu_s_per_1000": c.cpu,
                                      "cpu_median": c.cpu_median} for n, c in cols.items()}
                for name, cols in results.items()
            },
            "ratio_to_orthanc": {
                name: {f"{n}_assoc": ratio(results[name][n].median, results[ROW_ORTHANC][n].median)
                       for n in ASSOCIATIONS}
                for name in results if name.startswith("radnode")
            },
            "target_ratio": TARGET_RATIO,
        }
    finally:
        procs.close()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def on_term(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    try:
        report = run(args)
    except BenchError as exc:
        print(f"ingest benchmark failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
