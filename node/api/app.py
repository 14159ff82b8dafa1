"""API step: the HTTP service (FastAPI) of `radnode run` and `radnode api`: REST /v1, DICOMweb STOW-RS,
dashboard, /metrics, /healthz and /readyz. Errors become HTTP statuses with a message here."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy.exc import SQLAlchemyError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from node import __version__, metrics
from node.api.auth import Authenticator, Reader
from node.settings import Settings

log = logging.getLogger("radnode.api")

STOP_GRACE_SECONDS = 10  # requests in flight get this long to finish when the HTTP service stops


class Guard:
    """ASGI middleware: a request body over `limit` bytes gets 413 (by Content-Length, or while streaming);
    every request is counted by method, route and status."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await _problem(413, f"request body larger than {self.limit} bytes (max_upload_bytes)")(scope, receive, send)
            metrics.http_request(scope["method"], "any", 413)
            return
        seen = 0
        started = False
        status = 500

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started, status
            if message["type"] == "http.response.start":
                started, status = True, message["status"]
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                status = 413
                await _problem(413, f"request body larger than {self.limit} bytes (max_upload_bytes)")(
                    scope, receive, send)
        finally:
            route = scope.get("route")
            metrics.http_request(scope["method"], getattr(route, "path", "unmatched"), status)


class _TooLarge(Exception):
    pass


def _problem(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)


def _failed(check: str, exc: Exception) -> dict[str, Any]:
    """A failed readiness check: the error in the log, only its kind in the (unauthenticated) answer."""
    log.warning("readiness: %s check failed: %s: %s", check, type(exc).__name__, exc)
    return {"ok": False, "detail": f"{type(exc).__name__} (the node log has the details)"}


def readiness(app: FastAPI) -> dict[str, Any]:
    """Each readiness check with ok and a message: database, broker, storage writable, a worker alive."""
    from db.migrate import current_revision
    from db.session import ping
    from node.api.v1 import alive_workers_from

    s: Settings = app.state.settings
    checks: dict[str, Any] = {}
    try:
        ping(app.state.sessionmaker)
        revision = current_revision(app.state.engine)
        checks["database"] = {"ok": revision == app.state.head, "detail": f"revision {revision}"}
    except Exception as exc:
        checks["database"] = _failed("database", exc)
    try:
        with app.state.enqueuer.app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=3)
        checks["broker"] = {"ok": True, "detail": "reachable"}
    except Exception as exc:
        checks["broker"] = _failed("broker", exc)
    try:
        s.tmp_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=s.tmp_dir, prefix="ready-") as f:
            f.write(b"ok")
            f.flush()
            os.fsync(f.fileno())
        free = shutil.disk_usage(s.data_path).free
        checks["storage"] = {"ok": free > s.min_free_bytes, "detail": f"writable, {free // 1024**2} MiB free"}
    except OSError as exc:
        checks["storage"] = {"ok": False, "detail": f"not writable: {exc}"}
    try:
        workers = alive_workers_from(app)
        checks["workers"] = {"ok": bool(workers), "detail": f"{len(workers)} alive"}
    except Exception as exc:
        checks["workers"] = _failed("workers", exc)
    return checks


def create_app(settings: Settings) -> FastAPI:
    """The HTTP application, bound to the database and storage of `settings`."""
    from alembic.script import ScriptDirectory

    from db.migrate import alembic_config
    from db.session import make_engine, make_sessionmaker
    from node.api import dashboard, feedback, infer, routing, stow, v1
    from node.ingest.ingest import Ingest
    from node.queueing.broker import Enqueuer
    from plugins.registry import discover

    app = FastAPI(
        title="radnode", version=__version__,
        description="The AI node beside the PACS: received studies, jobs and their results, DICOMweb STOW-RS. "
                    "Send `Authorization: Bearer <token>` (tokens: `radnode token new`).",
        openapi_tags=[{"name": n} for n in ("studies", "jobs", "infer", "plugins", "DICOMweb", "service")],
    )
    app.state.settings = settings
    app.state.engine = make_engine(settings.db_url)
    app.state.sessionmaker = make_sessionmaker(app.state.engine)
    app.state.head = ScriptDirectory.from_config(alembic_config(settings.db_url)).get_current_head()
    app.state.auth = Authenticator(settings)
    app.state.ingest = Ingest(settings, app.state.sessionmaker)
    app.state.discovery = discover()
    app.state.enqueuer = Enqueuer(settings)
    app.state.collector = metrics.JobTableCollector(app.state.sessionmaker, settings.data_path,
                                                    settings.job_heartbeat_seconds, feedback.drift_gauges(app))

    @app.exception_handler(SQLAlchemyError)
    async def _database_down(request: Request, exc: SQLAlchemyError) -> JSONResponse:
        log.exception("%s %s: database error", request.method, request.url.path)
        return _problem(503, "database unavailable; try again")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return _problem(500, f"internal error ({type(exc).__name__}); the node log has the details")

    @app.get("/healthz", tags=["service"], summary="the process is up (no auth)")
    def healthz() -> dict[str, str]:
        return {"status": "ok", "version": __version__}

    @app.get("/readyz", tags=["service"], summary="ready to work (no auth): database, broker, storage, a worker",
             responses={503: {"description": "a check failed; the body says which"}})
    def readyz() -> JSONResponse:
        checks = readiness(app)
        ready = all(c["ok"] for c in checks.values())
        return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)

    @app.get("/metrics", tags=["service"], response_class=Response,
             responses={200: {"content": {"text/plain": {}}}})
    def metrics_endpoint(_: Reader) -> Response:
        """Prometheus metrics: instances received, bytes, jobs, stage durations, queue depth, deliveries, disk."""
        data, content_type = metrics.exposition(app.state.collector)
        return Response(data, media_type=content_type)

    app.include_router(v1.router)
    app.include_router(infer.router)
    app.include_router(stow.router)
    from node.api import ups  # UPS-RS worklist provider (/dicomweb/workitems)

    app.include_router(ups.router)
    app.include_router(dashboard.router)
    app.include_router(routing.router)
    app.include_router(feedback.router)
    app.include_router(feedback.ui)
    app.add_middleware(Guard, limit=settings.max_upload_bytes)
    return app


def _listen(settings: Settings) -> Any:
    """The bound HTTP socket. Raises OSError when the port is taken."""
    import socket

    family = socket.AF_INET6 if ":" in settings.dicom_host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((settings.dicom_host, settings.http_port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _server(app: FastAPI, settings: Settings) -> Any:
    import uvicorn

    config = uvicorn.Config(
        app, log_config=None, access_log=False, timeout_keep_alive=30, server_header=False,
        timeout_graceful_shutdown=STOP_GRACE_SECONDS,  # a stop waits this long for requests in flight
        ssl_certfile=str(settings.http_tls_cert) if settings.http_tls_cert else None,
        ssl_keyfile=str(settings.http_tls_key) if settings.http_tls_key else None,
    )
    return uvicorn.Server(config)


def serve(settings: Settings) -> None:
    """`radnode api`: run the HTTP service in this process until SIGTERM/SIGINT (HTTPS when http_tls_cert/key
    are set). Raises OSError when the port is taken."""
    sock = _listen(settings)
    _server(create_app(settings), settings).run(sockets=[sock])


def api_main(settings_data: dict[str, Any], ready: Any, node_pid: int) -> None:
    """Entry point of the node's HTTP process (spawned by `radnode run`); stops with the node, however the
    node stops (SIGTERM from the node, or from Linux when the node dies)."""
    from node.logs import setup_logging
    from node.process import die_with_parent

    die_with_parent(node_pid, signal.SIGTERM, grace=STOP_GRACE_SECONDS + 5, what="HTTP service")
    settings = Settings(**settings_data)
    setup_logging(settings.log_level, settings.log_json, settings.uid_hash_salt.get_secret_value())
    try:
        sock = _listen(settings)
        server = _server(create_app(settings), settings)
    except Exception as exc:
        ready.put(("api", f"HTTP service cannot start on port {settings.http_port}: {type(exc).__name__}: {exc}"))
        return
    ready.put(("api", None))
    server.run(sockets=[sock])
    if os.getppid() != node_pid:
        log.error("node process gone; HTTP service stopped")
