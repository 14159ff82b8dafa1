"""A real Orthanc for the tests: loopback only, DICOMweb plugin, radnode registered as a modality."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import requests

from tests.conftest import free_port, need

ORTHANC_BIN = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
AE = "ORTHANC"


class Orthanc:
    """One Orthanc server with its own storage; stop() and start() keep the data and the ports."""

    def __init__(self, root: Path, radnode_port: int, radnode_ae: str = "RADNODE") -> None:
        need(os.access(ORTHANC_BIN, os.X_OK), "Orthanc not installed (Debian package orthanc)")
        need(DICOMWEB_PLUGIN.is_file(), "Orthanc DICOMweb plugin not installed (Debian package orthanc-dicomweb)")
        self.root = root
        self.http_port, self.dicom_port = free_port(), free_port()
        while self.dicom_port == self.http_port:
            self.dicom_port = free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.dicomweb_url = f"{self.url}/dicom-web"
        config = {
            "Name": "radnode-test",
            "StorageDirectory": str(root / "storage"),
            "IndexDirectory": str(root / "index"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": AE,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomAlwaysAllowStore": True,
            "DicomCheckCalledAet": False,
            "OverwriteInstances": True,
            "StableAge": 2,
            "DicomModalities": {"radnode": [radnode_ae, "127.0.0.1", radnode_port]},
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "Ssl": False},
        }
        root.mkdir(parents=True, exist_ok=True)
        self.config_path = root / "orthanc.json"
        self.config_path.write_text(json.dumps(config, indent=2))
        self.log_path = root / "orthanc.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> Orthanc:
        log = open(self.log_path, "a")
        env = {**os.environ, "TCP_NODELAY": "1"}
        self.proc = subprocess.Popen([ORTHANC_BIN, str(self.config_path)], env=env, stdout=log, stderr=log,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited; log:\n{self.log_path.read_text()[-3000:]}")
            try:
                if requests.get(f"{self.url}/system", timeout=1).ok:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"Orthanc did not answer; log:\n{self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def get(self, path: str):
        r = requests.get(f"{self.url}{path}", timeout=30)
        r.raise_for_status()
        return r.json()

    def post(self, path: str, body, timeout: float = 300):
        r = requests.post(f"{self.url}{path}", data=body if isinstance(body, bytes | str) else json.dumps(body),
                          timeout=timeout)
        r.raise_for_status()
        return r.json()

    def file(self, orthanc_id: str) -> bytes:
        r = requests.get(f"{self.url}/instances/{orthanc_id}/file", timeout=30)
        r.raise_for_status()
        return r.content

    def upload(self, files: list[Path]) -> str:
        """Upload files over REST; returns the Orthanc id of their (single) study."""
        studies = {self.post("/instances", f.read_bytes())["ParentStudy"] for f in files}
        assert len(studies) == 1, studies
        return studies.pop()

    def study_id(self, study_uid: str) -> str | None:
        found = self.post("/tools/lookup", study_uid)
        return next((r["ID"] for r in found if r["Type"] == "Study"), None)

    def study_instances(self, study_uid: str) -> list[dict]:
        """Every instance of the study, with SOPClassUID, SOPInstanceUID, Modality and SeriesInstanceUID."""
        orthanc_id = self.study_id(study_uid)
        if orthanc_id is None:
            return []
        out = []
        for inst in self.get(f"/studies/{orthanc_id}/instances?expand"):
            tags = self.get(f"/instances/{inst['ID']}/simplified-tags")
            out.append({k: tags.get(k) for k in ("SOPClassUID", "SOPInstanceUID", "Modality", "SeriesInstanceUID")}
                       | {"id": inst["ID"]})
        return out
