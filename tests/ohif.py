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
        .step_measurement(+1/-1) -> SrStep   click the SR viewport's ">"/"<" arrow: the image it jumps to, what
                                          is drawn there
        .next_image(); .current_image()   step through a stack (the Down key); which image (frame) is shown
        .check_no_error(where); .console_errors(); .foreign_requests(); .screenshot(name)

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
import signal
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
    misplaced: int = 0  # shapes and text boxes whose coordinates are NaN (not where they belong; not counted above)
    repainted: bool = False  # its annotations were not drawn until the harness asked for a render (OHIF race)

    @property
    def lines(self) -> list[str]:
        return [line for a in self.annotations for line in a]


@dataclass
class SrStep:
    """The SR viewport after a click on its "<" or ">" arrow: the image it shows and what is drawn on it."""

    image: int  # index of the image (slice, frame) shown in the viewport's stack
    image_id: str  # its cornerstone image id (".../instances/<SOP Instance UID>/frames/<n>")
    annotations: list[list[str]]  # text lines of each annotation drawn on it
    shapes: int  # SVG shapes drawn (outlines and the dashed lines linking them to their text)
    outlines: int  # of those, the outlines (polylines, paths, circles, ellipses, rects; not the link lines)
    misplaced: int  # shapes and text boxes with NaN coordinates (OHIF could not place them)


# The SVG layer the cornerstone tools draw into: the number of shapes, and each annotation's text box lines. A shape
# or text box whose coordinates are NaN (an image OHIF cannot place annotations on) is in the DOM but not where it
# belongs (the browser drops such an outline and puts such a text box in the viewport's top-left corner): it is
# counted as misplaced, not as drawn.
_JS_SVG = """
const layers = [...document.querySelectorAll('svg.svg-layer')];
const nan = e => [...e.attributes].some(a => a.value.includes('NaN'));
let shapes = 0, outlines = 0, misplaced = 0;
const notes = [];
for (const l of layers) {
  for (const e of l.querySelectorAll('polyline, path, circle, ellipse, rect, line')) {
    if (e.closest('defs')) continue;
    if (nan(e)) { misplaced++; continue; }
    shapes++;
    if (e.tagName !== 'line') outlines++;
  }
  for (const g of l.querySelectorAll('g[data-annotation-uid]')) {
    const lines = [...g.querySelectorAll('tspan')].map(t => t.textContent);
    if (!lines.length) continue;
    if (nan(g)) { misplaced++; continue; }
    notes.push(lines);
  }
}
return {shapes: shapes, outlines: outlines, notes: notes, misplaced: misplaced};
"""

# The image shown in the (first) viewport, from the cornerstone API OHIF exposes as window.cornerstone.
_JS_CURRENT_IMAGE = """
const cs = window.cornerstone;
if (!cs || !cs.getEnabledElements) return null;
for (const e of cs.getEnabledElements()) {
  const vp = e.viewport;
  if (vp && vp.getCurrentImageId && vp.getCurrentImageId()) return [vp.getCurrentImageIdIndex(), vp.getCurrentImageId()];
}
return null;
"""

# Render the viewport whose current image has SR display annotations when none is drawn (see Viewer.open_sr).
_JS_REPAINT_STALE_SR = """
const cs = window.cornerstone, ct = window.cornerstoneTools;
if (!cs || !ct || !cs.getEnabledElements) return false;
if (document.querySelector('svg.svg-layer g[data-annotation-uid]')) return false;
const all = ct.annotation.state.getAllAnnotations();
for (const e of cs.getEnabledElements()) {
  const vp = e.viewport;
  if (!vp || !vp.getCurrentImageId) continue;
  const id = vp.getCurrentImageId();
  if (all.some(a => a.metadata && a.metadata.toolName === 'DICOMSRDisplay' && a.metadata.referencedImageId === id)) {
    vp.render();
    return true;
  }
}
return false;
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
        self.interventions: list[str] = []  # what the harness did for OHIF (a render a user's interaction
        # would have caused): harness.log
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
        except Exception:
            self.driver.service.stop()
        finally:
            self._kill_leftovers()
            if self._own_profile:
                shutil.rmtree(self._profile, ignore_errors=True)

    def _kill_leftovers(self, grace: float = 5) -> None:
        """SIGKILL any process still running on this viewer's Chromium profile (its unique folder is on the
        command line of the browser and of its zygotes, renderers, GPU and utility processes) that outlived quit():
        by pid, only the ones started here."""
        deadline = time.monotonic() + grace
        while True:
            pids = _processes_mentioning(str(self._profile))
            if not pids or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

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
        if self.interventions:
            (self.artefacts / "harness.log").write_text("\n".join(self.interventions) + "\n")

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

    def open_study(self, study_uid: str, mode: str = "viewer", timeout: float = 120, rendered: bool = True,
                   **params: str) -> None:
        """Open a study in an OHIF mode ('viewer' = the basic/longitudinal viewer, 'segmentation', ...) and wait
        until a viewport has drawn pixels (`rendered`), or, for an image OHIF draws black, until the viewport shows
        an image and the study browser its series."""
        query = urllib.parse.urlencode({"StudyInstanceUIDs": study_uid, **params})
        self.open(f"/{mode}?{query}")
        if rendered:
            self.wait(self.viewport_rendered, timeout, "the first viewport to render")
        else:
            self.wait(lambda: self.current_image() and self.thumbnails(), timeout, "the first viewport's image")

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
        return self.driver.execute_script(_JS_SVG) or {"shapes": 0, "outlines": 0, "notes": [], "misplaced": 0}

    def current_image(self) -> tuple[int, str] | None:
        """(index in the stack, cornerstone image id) of the image the viewport shows."""
        found = self.driver.execute_script(_JS_CURRENT_IMAGE)
        return (int(found[0]), str(found[1])) if found else None

    def next_image(self, settle: float = 1.5) -> None:
        """The next image of the viewport's stack: OHIF's Down-arrow hotkey, with the viewport focused."""
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.keys import Keys

        before = self.current_image()
        ActionChains(self.driver).send_keys(Keys.DOWN).perform()
        deadline = time.monotonic() + settle * 4
        while self.current_image() == before and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(settle)

    def step_measurement(self, direction: int = 1, timeout: float = 30) -> SrStep:
        """Click the SR viewport's ">" (direction 1) or "<" (-1) arrow: OHIF jumps to the next (previous)
        measurement's image. Returns that image and what is drawn on it once the drawing has stopped changing."""
        from selenium.webdriver.common.action_chains import ActionChains

        side = "right" if direction > 0 else "left"
        arrows = self.driver.find_elements("css selector", f'[data-cy="viewport-action-arrows-{side}"] svg')
        if not arrows:
            raise ViewerError(f"no viewport-action-arrows-{side} in the viewport header (not an SR viewport?)")
        ActionChains(self.driver).move_to_element(arrows[0]).click().perform()
        return self.measurement_shown(timeout, f"the SR viewport to settle after its {side} arrow")

    def measurement_shown(self, timeout: float = 30, what: str = "the SR viewport to settle",
                          stable: float = 1.0, stale_after: float = 5) -> SrStep:
        """The image the SR viewport shows and what is drawn on it, once that has not changed for `stable` s
        (asking for a render after `stale_after` s without a drawing, as open_sr does)."""
        start = time.monotonic()

        def settled():
            if time.monotonic() > start + stale_after and not self.svg()["shapes"]:
                self.repaint_stale_sr()
            first = (self.current_image(), self.svg())
            time.sleep(stable)
            second = (self.current_image(), self.svg())
            return second if first == second and second[0] is not None and second[1]["shapes"] else None

        image, drawn = self.wait(settled, timeout, what)
        return SrStep(image=image[0], image_id=image[1], annotations=drawn["notes"], shapes=drawn["shapes"],
                      outlines=drawn["outlines"], misplaced=drawn["misplaced"])

    def repaint_stale_sr(self) -> bool:
        """When the SR viewport holds SR annotations (cornerstone tools' DICOMSRDisplay) for the image it shows but
        has drawn none of them, render it once (as any interaction would) and say so; logged in harness.log."""
        stale = bool(self.driver.execute_script(_JS_REPAINT_STALE_SR))
        if stale:
            self.interventions.append(f"{time.strftime('%H:%M:%S')} SR annotations not drawn: viewport rendered")
        return stale

    def hydrate_prompt(self) -> bool:
        """OHIF asks "Do you want to open this Segmentation?" / "... continue tracking measurements ...?"."""
        return bool(self.driver.find_elements("css selector", '[data-cy="yes-hydrate-btn"]'))

    def hydrate(self, timeout: float = 30) -> None:
        """Answer Yes to the hydrate prompt (load the SEG / track the SR's measurements)."""
        self.wait(self.hydrate_prompt, timeout, "the hydrate prompt")
        self._click("yes-hydrate-btn")
        self.wait(lambda: not self.hydrate_prompt(), timeout, "the hydrate prompt to close")

    def open_sr(self, description: str, timeout: float = 60, settle: float = 3, stale_after: float = 5) -> SrView:
        """Double-click the SR series whose thumbnail shows `description` and report what OHIF made of it.

        Does not raise when OHIF's error boundary catches an error: that is the `crashed` field. OHIF 3.13 sometimes
        adds the SR's annotations after the viewport's last render and draws them only at the next one (any
        interaction); after `stale_after` s without a drawing, that next render is asked for (`repainted`)."""
        self.double_click_thumbnail(description)
        start = time.monotonic()
        repainted = False
        while time.monotonic() < start + timeout:
            if self.boundary_errors() or self.svg()["shapes"] or self.hydrate_prompt():
                break
            if time.monotonic() > start + stale_after:
                repainted = self.repaint_stale_sr() or repainted
            time.sleep(0.5)
        time.sleep(settle)  # the remaining annotations and the prompt come a moment later
        if not self.svg()["notes"] and self.repaint_stale_sr():
            repainted = True
            time.sleep(1.5)
        drawn = self.svg()
        view = SrView(crashed=self.boundary_errors(), annotations=drawn["notes"], shapes=drawn["shapes"],
                      hydrate_prompt=self.hydrate_prompt(), misplaced=drawn["misplaced"], repainted=repainted)
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


def _processes_mentioning(text: str) -> list[int]:
    """Pids of the processes with `text` in their command line (Linux /proc), this one aside."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if text.encode() in cmdline:
            pids.append(int(entry.name))
    return pids


def colour_fraction(rgb, colour: tuple[int, int, int], tolerance: int = 40) -> float:
    """Share of pixels within `tolerance` (per channel) of `colour`."""
    import numpy as np

    return float((np.abs(rgb.astype(np.int16) - np.asarray(colour, dtype=np.int16)).max(axis=2) <= tolerance).mean())


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
