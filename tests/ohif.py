"""A real OHIF viewer for the tests: the prebuilt @ohif/app from the npm registry, served by a small Python HTTP
server that also proxies /dicom-web/ to a test Orthanc, driven by headless Chromium through Selenium.

    install_ohif()                     -> the dist folder (npm pack, checksum pinned, under .cache/ohif/)
    OhifServer(dist, orthanc_url)      -> http://127.0.0.1:PORT, one origin for the app and the proxied DICOMweb
    Viewer(server, artefacts)          -> headless Chromium on it; screenshots + console.log + http.log in artefacts
        .open_study(uid)                  open /viewer?StudyInstanceUIDs=uid, wait for the first image
        .open_sr(description) -> SrView   double-click the SR series: crash (error boundary), annotation text lines,
                                          shapes drawn, hydrate prompt
        .open_seg(description) -> labels  double-click the SEG, answer Yes to "open this Segmentation?", list segments
        .select_segment(label); .overlay_fraction()   jump to a segment; share of pixels the overlay changes
        .check_no_error(where); .foreign_requests(); .screenshot(name)

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
    return _PRELUDE_JS + f"window.config = {json.dumps(config, indent=2)};\n"


# Runs before the app: no first-visit tour over the viewport (a fresh profile is a first visit), and a record of
# every error OHIF's error boundary catches (its toast disappears after a few seconds; this list does not).
_PRELUDE_JS = """
try { localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour'])); } catch (e) {}
window.__radnode = { boundary: [], errors: [] };
(function () {
  const text = e => (e && (e.stack || e.message)) ? String(e.stack || e.message) : String(e);
  const debug = console.debug.bind(console);
  console.debug = function (...args) {
    if (typeof args[0] === 'string' && args[0].endsWith('Error Boundary')) {
      window.__radnode.boundary.push(args[0] + ': ' + text(args[1]));
    }
    return debug(...args);
  };
  window.addEventListener('error', e => window.__radnode.errors.push('error: ' + text(e.error || e.message)));
  window.addEventListener('unhandledrejection',
                          e => window.__radnode.errors.push('unhandledrejection: ' + text(e.reason)));
})();
"""


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, fmt, *args) -> None:  # into the server's list, not stderr
        self.server.log.append(fmt % args)

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
class SrView:
    """What OHIF showed for one SR display set."""

    crashed: list[str]  # errors OHIF's error boundary caught while loading it (empty: no crash)
    annotations: list[list[str]]  # per annotation drawn on the current image: its text lines ("Area: 1.60 cm2")
    shapes: int  # SVG shapes (polylines, ellipses, points' lines) drawn in the viewport
    hydrate_prompt: bool  # OHIF offered to "track" (hydrate) the SR's measurements
    panel: list[str] = field(default_factory=list)  # rows of the measurements panel (after hydrate())

    @property
    def lines(self) -> list[str]:
        return [line for a in self.annotations for line in a]


# The SVG layer the cornerstone tools draw into: the number of shapes, and each annotation's text box lines.
_JS_SVG = """
const layers = [...document.querySelectorAll('svg.svg-layer')];
const shapes = layers.reduce((n, l) => n + l.querySelectorAll('polyline, path, circle, ellipse, rect, line').length, 0);
const notes = [];
for (const l of layers) for (const g of l.querySelectorAll('g[data-annotation-uid]')) {
  const lines = [...g.querySelectorAll('tspan')].map(t => t.textContent);
  if (lines.length) notes.push(lines);
}
return {shapes: shapes, notes: notes};
"""

# innerText of every element with a data-cy attribute, by attribute value (OHIF 3.13 marks its UI with data-cy).
_JS_DATA_CY = """
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
        try:
            self.driver = chromium(self._profile)
        except BaseException:  # a skip (no Chromium) or a failed start: leave no profile folder behind
            if self._own_profile:
                shutil.rmtree(self._profile, ignore_errors=True)
            raise
        self.driver.set_page_load_timeout(120)
        self.console: list[dict] = []
        self._shots = 0
        self._log_start = len(server.log)

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
        (self.artefacts / "http.log").write_text("\n".join(self.server.log[self._log_start:]) + "\n")

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

    def boundary_errors(self) -> list[str]:
        """Every error OHIF's error boundaries caught since the page loaded ("Route viewer Error Boundary: TypeError:
        ..."), whether or not its "Something went wrong" toast is still on screen."""
        return self.driver.execute_script("return (window.__radnode || {}).boundary || []") or []

    def page_errors(self) -> list[str]:
        """Uncaught errors and unhandled promise rejections in the page since it loaded."""
        return self.driver.execute_script("return (window.__radnode || {}).errors || []") or []

    def error_page(self) -> str | None:
        """What OHIF's error boundary caught (or its "Something went wrong" text on screen), else None."""
        caught = self.boundary_errors()
        if caught:
            return "\n".join(caught)
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
        return self.driver.execute_script(_JS_DATA_CY) or {}

    def thumbnails(self) -> list[str]:
        """The study browser's series thumbnails' descriptions (their visible text)."""
        return self.driver.execute_script("""
            return [...document.querySelectorAll('[data-cy^="study-browser-thumbnail"], [data-cy="thumbnail"]')]
                   .map(e => e.innerText);
        """) or []

    def double_click_thumbnail(self, text: str, timeout: float = 30) -> None:
        """Double-click the series thumbnail whose text contains `text` (loads it into the active viewport); the
        study browser fills in after the first image, so wait for it."""
        from selenium.webdriver.common.action_chains import ActionChains

        def find():
            return self.driver.execute_script("""
                const sel = '[data-cy^="study-browser-thumbnail"], [data-cy="thumbnail"]';
                return [...document.querySelectorAll(sel)].find(e => e.innerText.includes(arguments[0])) || null;
            """, text)

        try:
            el = self.wait(find, timeout, f"the thumbnail {text!r}")
        except ViewerError as exc:
            raise ViewerError(f"no thumbnail with {text!r}; thumbnails: {self.thumbnails()}") from exc
        ActionChains(self.driver).double_click(el).perform()
    def _click(self, data_cy: str) -> bool:
        return bool(self.driver.execute_script(
            "const b = document.querySelector(`[data-cy=\"${arguments[0]}\"]`); if (b) { b.click(); return true; }"
            " return false;", data_cy))

    def open_panel(self, which: str) -> None:
        """Open a right-hand panel: 'measurements' or 'segmentation' (a no-op when it is already open)."""
        button = {"measurements": "trackedMeasurements-btn", "segmentation": "panelSegmentation-btn"}[which]
        if not self._click(button):
            raise ViewerError(f"no {button} button; the mode may not have a {which} panel")
        time.sleep(0.5)

    def panel_rows(self) -> list[str]:
        """The rows (data-row) of the open panel(s), each as its visible text on one line."""
        rows = self.driver.execute_script(
            "return [...document.querySelectorAll('[data-cy=\"data-row\"]')].map(e => e.innerText);") or []
        return [" / ".join(x.strip() for x in r.splitlines() if x.strip()) for r in rows]

    def svg(self) -> dict:
        return self.driver.execute_script(_JS_SVG) or {"shapes": 0, "notes": []}

    def hydrate_prompt(self) -> bool:
        """OHIF asks "Do you want to open this Segmentation?" / "... continue tracking measurements ...?"."""
        return bool(self.driver.find_elements("css selector", '[data-cy="yes-hydrate-btn"]'))

    def hydrate(self, timeout: float = 30) -> None:
        """Answer Yes to the hydrate prompt (load the SEG / track the SR's measurements)."""
        self.wait(self.hydrate_prompt, timeout, "the hydrate prompt")
        self._click("yes-hydrate-btn")
        self.wait(lambda: not self.hydrate_prompt(), timeout, "the hydrate prompt to close")

    def open_sr(self, description: str, timeout: float = 60, settle: float = 3) -> SrView:
        """Double-click the SR series whose thumbnail shows `description` and report what OHIF made of it.

        Does not raise when OHIF's error boundary catches an error: that is the `crashed` field."""
        self.double_click_thumbnail(description)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.boundary_errors() or self.svg()["shapes"] or self.hydrate_prompt():
                break
            time.sleep(0.5)
        time.sleep(settle)  # the remaining annotations and the prompt come a moment later
        drawn = self.svg()
        view = SrView(crashed=self.boundary_errors(), annotations=drawn["notes"], shapes=drawn["shapes"],
                      hydrate_prompt=self.hydrate_prompt())
        self.screenshot("sr")
        return view

    def open_seg(self, description: str, timeout: float = 90) -> list[str]:
        """Double-click the SEG series with `description`, answer Yes to "open this Segmentation?", open the
        segmentation panel and return the segment labels it lists."""
        self.double_click_thumbnail(description)
        self.hydrate(timeout)
        self.open_panel("segmentation")
        labels = self.wait(self.segment_labels, timeout, "the segmentation panel to list segments")
        self.screenshot("seg")
        return labels

    def segment_labels(self) -> list[str]:
        return self.driver.execute_script(
            "return [...document.querySelectorAll('[data-cy=\"data-row-title\"]')].map(e => e.innerText.trim());"
        ) or []

    def select_segment(self, label: str) -> None:
        """Click a segment in the segmentation panel: OHIF jumps to the slice at its centre."""
        found = self.driver.execute_script("""
            const t = [...document.querySelectorAll('[data-cy="data-row-title"]')]
                      .find(e => e.innerText.trim() === arguments[0]);
            if (!t) return false;
            t.closest('[data-cy="data-row"]').click();
            return true;""", label)
        if not found:
            raise ViewerError(f"no segment {label!r}; segments: {self.segment_labels()}")
        time.sleep(1.5)

    def overlay_fraction(self) -> float:
        """Share of viewport pixels that change when every segmentation is hidden: the overlay OHIF draws."""
        import numpy as np

        shown = self.viewport_pixels()
        if not self._click("all-segments-visibility-toggle"):
            raise ViewerError("no all-segments-visibility-toggle in the segmentation panel")
        time.sleep(1.5)
        hidden = self.viewport_pixels()
        self._click("all-segments-visibility-toggle")
        time.sleep(1)
        if shown is None or hidden is None or shown.shape != hidden.shape:
            return 0.0
        return float((np.abs(shown.astype(np.int16) - hidden.astype(np.int16)).max(axis=2) > 30).mean())

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


def artefact_dir(tmp_path: Path, name: str) -> Path:
    root = os.environ.get("RADNODE_TEST_ARTEFACTS")
    path = (Path(root) / name) if root else tmp_path / "artefacts"
    path.mkdir(parents=True, exist_ok=True)
    return path
