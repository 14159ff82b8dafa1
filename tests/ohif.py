"""A real OHIF viewer for the tests: the prebuilt @ohif/app from the npm registry, served by a small Python HTTP
server that also proxies /dicom-web/ to a test Orthanc, driven by headless Chromium through Selenium.

    install_ohif()                        -> the dist folder (npm pack, checksum pinned, under .cache/ohif/)
    OhifServer(dist, orthanc).start()     -> http://127.0.0.1:PORT, one origin for the app and DICOMweb
    Viewer(server, artefacts).open_study(uid) ... .sr_measurements() / .seg_segments() / .screenshot(name)

Nothing is fetched from the internet: Chromium resolves every host other than 127.0.0.1 to nothing, and the
requests that were made are listed by `Viewer.foreign_requests()`.
"""

from __future__ import annotations

import hashlib
import http.client
import http.server
import json
import mimetypes
import os
import shutil
import subprocess
import tarfile
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import REPO, need

OHIF_VERSION = "3.13.2"
# sha256 of https://registry.npmjs.org/@ohif/app/-/app-3.13.2.tgz (npm integrity
# sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA==)
OHIF_SHA256 = "b189d3963bfc58e9394a9db8c7be75d07beb029ec211dbb126d47b62969dd3f1"
OHIF_ROOT = REPO / ".cache" / "ohif"
OHIF_DIST = OHIF_ROOT / f"app-{OHIF_VERSION}" / "dist"

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
CHROMIUM_ARGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--window-size=1600,1000", "--use-gl=swiftshader", "--enable-unsafe-swiftshader",
    "--ignore-gpu-blocklist",
    # no host but loopback resolves: a CDN font or a telemetry call fails at once instead of hanging the test
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
)
ERROR_TEXTS = ("Something went wrong", "Error:", "Cannot read properties")


def install_ohif(dist: Path = OHIF_DIST) -> Path:
    """The prebuilt OHIF app (its `dist/` folder), from `npm pack` into .cache/ohif/ once, checksum verified.

    scripts/test.sh does the same; this is for a developer running pytest without it.
    """
    if (dist / "index.html").is_file():
        return dist
    npm = shutil.which("npm")
    need(npm is not None, f"OHIF {OHIF_VERSION} not installed at {dist} and no npm to install it (run scripts/test.sh)")
    dist.parent.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dist.parent.parent) as tmp:
        subprocess.run([npm, "pack", f"@ohif/app@{OHIF_VERSION}", "--pack-destination", tmp, "--silent"],
                       check=True, capture_output=True, timeout=600)
        tgz = Path(tmp) / f"ohif-app-{OHIF_VERSION}.tgz"
        digest = hashlib.sha256(tgz.read_bytes()).hexdigest()
        if digest != OHIF_SHA256:
            raise RuntimeError(f"{tgz.name}: sha256 {digest}, expected {OHIF_SHA256}")
        with tarfile.open(tgz) as tar:
            tar.extractall(tmp, filter="data")
        if dist.parent.exists():
            shutil.rmtree(dist.parent)
        (Path(tmp) / "package").rename(dist.parent)
    return dist


def app_config(origin: str) -> str:
    """OHIF's window.config: one DICOMweb data source, the (proxied) Orthanc on the same origin."""
    dicomweb = f"{origin}/dicom-web"
    config = {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "customizationService": {},
        "showStudyList": True,
        "maxNumberOfWebWorkers": 2,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "investigationalUseDialog": {"option": "never"},
        "showErrorDetails": "always",
        "defaultDataSourceName": "orthanc",
        "dataSources": [
            {
                "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
                "sourceName": "orthanc",
                "configuration": {
                    "friendlyName": "radnode test Orthanc",
                    "name": "orthanc",
                    "wadoUriRoot": dicomweb,
                    "qidoRoot": dicomweb,
                    "wadoRoot": dicomweb,
                    "qidoSupportsIncludeField": False,
                    "imageRendering": "wadors",
                    "thumbnailRendering": "wadors",
                    "enableStudyLazyLoad": True,
                    "supportsFuzzyMatching": False,
                    "supportsWildcard": True,
                    "omitQuotationForMultipartRequest": True,
                    "bulkDataURI": {"enabled": True},
                },
            }
        ],
    }
    # the first-visit tour would cover the viewport in every screenshot (a fresh profile is a first visit)
    no_tour = "try { localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour'])); } catch (e) {}\n"
    return no_tour + f"window.config = {json.dumps(config, indent=2)};\n"


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, fmt, *args) -> None:  # into the server's list, not stderr
        self.server.log.append(f"{self.command} {self.path} -> {fmt % args}")

    def do_GET(self) -> None:  # noqa: N802
        self._route()

    def do_HEAD(self) -> None:  # noqa: N802
        self._route()

    def do_POST(self) -> None:  # noqa: N802
        self._route()

    def _route(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        if path.startswith("/dicom-web/") or path == "/dicom-web":
            return self._proxy()
        if self.command == "POST":
            return self._send(405, b"", "text/plain")
        if path == "/app-config.js":
            return self._send(200, self.server.config_js.encode(), "application/javascript")
        if path == "/init-service-worker.js":  # no service worker: every run starts from the files served now
            return self._send(200, b"", "application/javascript")
        rel = urllib.parse.unquote(path).lstrip("/")
        target = (self.server.dist / rel).resolve()
        if not rel or not target.is_relative_to(self.server.dist) or not target.is_file():
            if Path(rel).suffix and not rel.endswith(".html"):  # a missing asset is a 404, an app route is the app
                return self._send(404, b"not found", "text/plain")
            target = self.server.dist / "index.html"
        ctype = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        if target.suffix == ".wasm":
            ctype = "application/wasm"
        elif target.suffix in {".js", ".mjs"}:
            ctype = "application/javascript"
        self._send(200, target.read_bytes(), ctype)

    def _send(self, status: int, body: bytes, ctype: str, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        # cross-origin isolation, as OHIF's own deployments do (SharedArrayBuffer for volume loading)
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.send_header("Cross-Origin-Resource-Policy", "same-origin")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _proxy(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items()
                   if k.lower() in {"accept", "content-type", "host", "range"}}
        conn = http.client.HTTPConnection("127.0.0.1", self.server.orthanc_port, timeout=300)
        try:
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except OSError as exc:
            return self._send(502, str(exc).encode(), "text/plain")
        finally:
            conn.close()
        passed = {k: v for k, v in resp.getheaders()
                  if k.lower() not in {"content-length", "content-type", "connection", "transfer-encoding",
                                       "keep-alive", "cache-control"}}
        self.server.log.append(f"proxy {self.command} {self.path} -> {resp.status} {len(data)} bytes")
        self._send(resp.status, data, resp.getheader("Content-Type") or "application/octet-stream", passed)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    dist: Path
    orthanc_port: int
    config_js: str
    log: list[str]


class OhifServer:
    """The OHIF app and the proxied Orthanc DICOMweb on one loopback origin, served from a thread."""

    def __init__(self, dist: Path, orthanc_url: str) -> None:
        self.dist = dist.resolve()
        self.orthanc_port = urllib.parse.urlsplit(orthanc_url).port
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    def start(self) -> OhifServer:
        httpd = _Server(("127.0.0.1", 0), _Handler)
        httpd.dist, httpd.orthanc_port, httpd.log = self.dist, self.orthanc_port, []
        self.url = f"http://127.0.0.1:{httpd.server_address[1]}"
        httpd.config_js = app_config(self.url)
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, name="ohif-http", daemon=True)
        self._thread.start()
        return self

    @property
    def log(self) -> list[str]:
        return self._httpd.log if self._httpd else []

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=10)
            self._httpd = None

    def __enter__(self) -> OhifServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def chromium(user_data_dir: Path):
    """Headless Chromium under Selenium with the browser console log enabled."""
    need(CHROMIUM.exists() and CHROMEDRIVER.exists(),
         f"{CHROMIUM} and {CHROMEDRIVER} are needed (Debian chromium, chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(CHROMIUM)
    for arg in (*CHROMIUM_ARGS, f"--user-data-dir={user_data_dir}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)


class ViewerError(AssertionError):
    """OHIF showed its error page, or did not get where a helper waited for it to get."""


@dataclass
class Measurement:
    label: str  # the row's title in the measurements panel (OHIF: tracking identifier / first label)
    values: list[str] = field(default_factory=list)  # the row's value lines, e.g. "Volume: 3202.00 ml"


# JavaScript run in the page. OHIF 3.13's panels are React components with data-cy attributes; the fallbacks read
# the visible text so a renamed attribute shows up as an empty list in the report rather than as a crash.
_JS_PANEL_TEXT = """
const out = {};
for (const el of document.querySelectorAll('[data-cy]')) {
  const k = el.getAttribute('data-cy');
  if (!(k in out)) out[k] = [];
  out[k].push(el.innerText);
}
return out;
"""


class Viewer:
    """One headless Chromium on an OhifServer; screenshots and the console log go to `artefacts`."""

    def __init__(self, server: OhifServer, artefacts: Path, profile: Path | None = None) -> None:
        self.server = server
        self.artefacts = artefacts
        artefacts.mkdir(parents=True, exist_ok=True)
        self._profile = profile or Path(tempfile.mkdtemp(prefix="ohif-chromium-"))
        self._own_profile = profile is None
        self.driver = chromium(self._profile)
        self.driver.set_page_load_timeout(120)
        self.console: list[dict] = []
        self._shots = 0

    # --- lifecycle -------------------------------------------------------------------------------------------------
    def close(self) -> None:
        try:
            self.collect_console()
            self._write_console()
        except Exception:
            pass
        try:
            self.driver.quit()  # ends chromedriver and every Chromium process it started
        finally:
            if self._own_profile:
                shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> Viewer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- evidence ----------------------------------------------------------------------------------------------
    def collect_console(self) -> list[dict]:
        """New browser console entries (level, message) since the last call, also kept in self.console."""
        entries = self.driver.get_log("browser")
        self.console.extend(entries)
        return entries

    def _write_console(self) -> None:
        lines = [f"{e.get('level')} {e.get('message')}" for e in self.console]
        (self.artefacts / "console.log").write_text("\n".join(lines) + "\n")
        (self.artefacts / "http.log").write_text("\n".join(self.server.log) + "\n")

    def console_errors(self) -> list[str]:
        self.collect_console()
        return [e["message"] for e in self.console if e.get("level") == "SEVERE"]

    def screenshot(self, name: str) -> Path:
        self._shots += 1
        path = self.artefacts / f"{self._shots:02d}-{name}.png"
        self.driver.save_screenshot(str(path))
        return path

    def body_text(self) -> str:
        return self.driver.execute_script("return document.body ? document.body.innerText : ''") or ""

    def error_page(self) -> str | None:
        """The text of OHIF's error boundary when it is shown (the whole app or one panel/viewport), else None."""
        text = self.body_text()
        if "Something went wrong" in text:
            return text
        return None

    def check_no_error(self, where: str) -> None:
        err = self.error_page()
        if err:
            self.screenshot(f"error-{where}")
            raise ViewerError(f"OHIF error page at {where}:\n{err[:3000]}\n--- console errors:\n"
                              + "\n".join(self.console_errors()[-20:]))

    def foreign_requests(self) -> list[str]:
        """URLs the page asked for on any other origin than the test server's (should be none)."""
        names = self.driver.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name)") or []
        return [n for n in names if not n.startswith(self.server.url) and not n.startswith(("data:", "blob:"))]

    # --- waiting -------------------------------------------------------------------------------------------------
    def wait(self, condition, timeout: float, what: str, poll: float = 0.5):
        deadline = time.monotonic() + timeout
        while True:
            err = self.error_page()
            if err:
                self.screenshot(f"error-waiting-{what.replace(' ', '-')[:40]}")
                raise ViewerError(f"OHIF error page while waiting for {what}:\n{err[:3000]}\n--- console errors:\n"
                                  + "\n".join(self.console_errors()[-20:]))
            value = condition()
            if value:
                return value
            if time.monotonic() > deadline:
                self.screenshot(f"timeout-{what.replace(' ', '-')[:40]}")
                raise ViewerError(f"timed out after {timeout}s waiting for {what}; page text:\n"
                                  f"{self.body_text()[:2000]}")
            time.sleep(poll)

    # --- pages -------------------------------------------------------------------------------------------------
    def open(self, path: str) -> None:
        self.driver.get(self.server.url + path)

    def open_study(self, study_uid: str, mode: str = "viewer", timeout: float = 120, **params: str) -> None:
        """Open a study in an OHIF mode ('viewer' = the basic/longitudinal viewer, 'segmentation', ...) and wait
        until a viewport has drawn pixels."""
        query = urllib.parse.urlencode({"StudyInstanceUIDs": study_uid, **params})
        self.open(f"/{mode}?{query}")
        self.wait(self.viewport_rendered, timeout, "the first viewport to render")

    def viewport_rendered(self) -> bool:
        """True when a viewport canvas exists and holds non-black pixels."""
        return bool(self.driver.execute_script("""
            const cs = [...document.querySelectorAll('.cornerstone-canvas, [data-viewport-uid] canvas')];
            for (const c of cs) {
              if (!c.width || !c.height) continue;
              try {
                const ctx = document.createElement('canvas').getContext('2d');
                const w = Math.min(c.width, 256), h = Math.min(c.height, 256);
                ctx.canvas.width = w; ctx.canvas.height = h;
                ctx.drawImage(c, 0, 0, w, h);
                const d = ctx.getImageData(0, 0, w, h).data;
                let n = 0;
                for (let i = 0; i < d.length; i += 4) if (d[i] + d[i+1] + d[i+2] > 30) n++;
                if (n > w * h / 50) return true;
              } catch (e) { return false; }
            }
            return false;
        """))

    def data_cy(self) -> dict[str, list[str]]:
        """innerText of every element with a data-cy attribute, by attribute value."""
        return self.driver.execute_script(_JS_PANEL_TEXT) or {}

    def thumbnails(self) -> list[str]:
        """The study browser's series thumbnails' descriptions (their visible text)."""
        return self.driver.execute_script("""
            return [...document.querySelectorAll('[data-cy^="study-browser-thumbnail"], [data-cy="thumbnail"]')]
                   .map(e => e.innerText);
        """) or []

    def double_click_thumbnail(self, text: str) -> None:
        """Double-click the series thumbnail whose text contains `text` (loads it into the active viewport)."""
        from selenium.webdriver.common.action_chains import ActionChains

        el = self.driver.execute_script("""
            const t = arguments[0];
            const all = [...document.querySelectorAll('[data-cy^="study-browser-thumbnail"], [data-cy="thumbnail"]')];
            return all.find(e => e.innerText.includes(t)) || null;
        """, text)
        if el is None:
            raise ViewerError(f"no thumbnail with {text!r}; thumbnails: {self.thumbnails()}")
        ActionChains(self.driver).double_click(el).perform()

    def viewport_pixels(self):
        """The active viewport canvas as an RGB numpy array (from the page, not a screenshot)."""
        import base64
        import io

        import numpy as np
        from PIL import Image

        url = self.driver.execute_script("""
            const c = document.querySelector('.cornerstone-canvas');
            return c ? c.toDataURL('image/png') : null;
        """)
        if not url:
            return None
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))


def coloured_fraction(rgb) -> float:
    """Share of pixels that are clearly not grey (an overlay or annotation colour on a greyscale image)."""
    import numpy as np

    a = rgb.astype(np.int16)
    spread = a.max(axis=2) - a.min(axis=2)
    return float((spread > 40).mean())


def upload(orthanc, files: list[Path]) -> None:
    """POST each file to Orthanc's REST API."""
    for f in files:
        orthanc.post("/instances", f.read_bytes())


def artefact_dir(tmp_path: Path, name: str) -> Path:
    root = os.environ.get("RADNODE_TEST_ARTEFACTS")
    path = (Path(root) / name) if root else tmp_path / "artefacts"
    path.mkdir(parents=True, exist_ok=True)
    return path
