"""A FHIR R4 server for tests, in the test process: the transaction semantics radnode's `fhir` destination uses,
every received resource validated with fhir.resources (R4B models; the resources radnode sends are the same in R4).

No real FHIR server is installable here (HAPI FHIR's runnable server is not a registry package; the npm/PyPI ones
are frameworks or need Docker), so this one implements, as the FHIR R4 spec says:
- POST [base] with a `transaction` Bundle: all entries or none; conditional create (POST + ifNoneExist), conditional
  update (PUT Type?identifier=...), plain create and PUT Type/id; 412 when a condition matches more than one resource;
  references to entries' fullUrls rewritten to Type/id, references to unknown resources refused; a
  `transaction-response` with 201/200 per entry;
- GET [base]/Type/id, GET [base]/Type?identifier=system|value (searchset), GET [base]/metadata;
- 400 + OperationOutcome for anything invalid, 415 for a wrong Content-Type.

    with FhirServer() as fhir:
        send_fhir(report, FhirDestination(kind="fhir", name="ehr", url=fhir.url))
        assert len(fhir.resources("DiagnosticReport")) == 1

Knobs: `authorization` (the exact Authorization header required, else 401), `create_patients=False` (an EHR that
lets no one else create patients: 422), `fail(status, times)` and `hang(seconds)` for the next requests.
"""

from __future__ import annotations

import copy
import itertools
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from fhir.resources.R4B import get_fhir_model_class


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: Any  # parsed JSON, or the raw bytes when not JSON


class FhirError(Exception):
    def __init__(self, status: int, diagnostics: str, code: str = "invalid") -> None:
        super().__init__(diagnostics)
        self.status, self.code = status, code


def outcome(diagnostics: str, code: str = "invalid") -> dict[str, Any]:
    return {"resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": code, "diagnostics": diagnostics[:2000]}]}


def validate(resource: Any) -> None:
    """Raises FhirError (400) unless `resource` parses as its R4B model (required elements, types, no unknown
    elements, date/time formats)."""
    if not isinstance(resource, dict) or not isinstance(resource.get("resourceType"), str):
        raise FhirError(400, "not a FHIR resource")
    try:
        model = get_fhir_model_class(resource["resourceType"])
    except Exception:
        raise FhirError(400, f"unknown resourceType {resource['resourceType']!r}") from None
    try:
        model.model_validate(resource)
    except Exception as exc:
        raise FhirError(400, f"{resource['resourceType']}: {exc}") from None


def _token(query: str) -> tuple[str | None, str]:
    """The (system, value) of the only search parameter we serve, identifier=[system|]value (FHIR escapes)."""
    params = parse_qsl(query, keep_blank_values=True)
    if len(params) != 1 or params[0][0] != "identifier":
        raise FhirError(400, f"this server searches by identifier only, not {query!r}", "not-supported")
    parts, current, chars = [], "", iter(params[0][1])
    for ch in chars:
        if ch == "\\":
            current += next(chars, "")
        elif ch == "|":
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    if len(parts) > 2:
        raise FhirError(400, "identifier token with more than one '|'")
    return (parts[0], parts[1]) if len(parts) == 2 else (None, parts[0])


class FhirServer:
    """The server; a context manager that starts it on 127.0.0.1 and stops it (see the module docstring)."""

    def __init__(self, *, authorization: str | None = None, create_patients: bool = True) -> None:
        self.authorization, self.create_patients = authorization, create_patients
        self.requests: list[Recorded] = []
        self._store: dict[tuple[str, str], dict[str, Any]] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._failures: list[int] = []
        self._hang = 0.0
        self._closing = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="fhir-server",
                                        daemon=True)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/fhir"

    def __enter__(self) -> FhirServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closing.set()  # wakes a hanging request
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    # --- what tests use ---------------------------------------------------------------------------------

    def resources(self, kind: str) -> list[dict[str, Any]]:
        """The current version of every stored resource of type `kind` (copies)."""
        with self._lock:
            return [copy.deepcopy(r) for (k, _), r in self._store.items() if k == kind]

    def seed(self, resource: dict[str, Any]) -> str:
        """Store a resource as if the EHR had it already. Returns its id."""
        validate(resource)
        with self._lock:
            return self._write(copy.deepcopy(resource), None)

    def fail(self, status: int, times: int = 1) -> None:
        """Answer the next `times` requests with `status` and an OperationOutcome."""
        self._failures.extend([status] * times)

    def hang(self, seconds: float) -> None:
        """Hold the next request `seconds` before answering (or until the server stops)."""
        self._hang = seconds

    # --- FHIR semantics ---------------------------------------------------------------------------------

    def _write(self, resource: dict[str, Any], rid: str | None) -> str:
        kind = resource["resourceType"]
        rid = rid or str(next(self._ids))
        old = self._store.get((kind, rid))
        version = int(old["meta"]["versionId"]) + 1 if old else 1
        resource["id"] = rid
        resource["meta"] = {"versionId": str(version), "lastUpdated": datetime.now(UTC).isoformat()}
        self._store[(kind, rid)] = resource
        return rid

    def _search(self, kind: str, query: str) -> list[str]:
        system, value = _token(query)
        return [rid for (k, rid), r in self._store.items() if k == kind and any(
            i.get("value") == value and (system is None or i.get("system") == system)
            for i in r.get("identifier") or [])]

    def transaction(self, body: Any) -> dict[str, Any]:
        """Carry out a transaction Bundle, all or nothing. Returns the transaction-response; raises FhirError."""
        validate(body)
        if body.get("type") != "transaction":
            raise FhirError(400, f"Bundle.type must be transaction, not {body.get('type')!r}")
        entries = body.get("entry") or []
        with self._lock:
            plan = []  # (resource, kind, id, status, write)
            targets: dict[str, str] = {}
            for n, e in enumerate(entries):
                resource, request = copy.deepcopy(e.get("resource")), e.get("request") or {}
                if resource is None or "fullUrl" not in e:
                    raise FhirError(400, f"entry {n}: resource and fullUrl required")
                kind, method = resource["resourceType"], request.get("method")
                path, _, query = str(request.get("url", "")).partition("?")
                if path.split("/")[0] != kind:
                    raise FhirError(400, f"entry {n}: request.url {path!r} does not name a {kind}")
                if method == "POST":
                    found = self._search(kind, request["ifNoneExist"]) if request.get("ifNoneExist") else []
                    write = not found
                elif method == "PUT" and query:
                    found, write = self._search(kind, query), True
                elif method == "PUT" and path.count("/") == 1:
                    found, write = [path.split("/")[1]], True
                else:
                    raise FhirError(400, f"entry {n}: {method} {request.get('url')} is not supported here",
                                    "not-supported")
                if len(found) > 1:
                    raise FhirError(412, f"entry {n}: the condition matches {len(found)} {kind} resources",
                                    "duplicate")
                if write and not found and kind == "Patient" and not self.create_patients:
                    ids = ", ".join(f"{i.get('system')}|{i.get('value')}" for i in resource.get("identifier", []))
                    raise FhirError(422, f"Patient {ids} is unknown and this server does not create patients",
                                    "business-rule")
                rid = found[0] if found else str(next(self._ids))
                created = not found and (method == "POST" or (kind, rid) not in self._store)
                plan.append((resource, kind, rid, "201 Created" if created else "200 OK", write))
                targets[e["fullUrl"]] = f"{kind}/{rid}"
            known = set(targets.values()) | {f"{k}/{i}" for k, i in self._store}
            for resource, *_ in plan:
                self._resolve(resource, targets, known)
            answer = []
            for resource, kind, rid, status, write in plan:
                if write:
                    self._write(resource, rid)
                version = self._store[(kind, rid)]["meta"]["versionId"]
                answer.append({"response": {"status": status, "location": f"{kind}/{rid}/_history/{version}"}})
        return {"resourceType": "Bundle", "type": "transaction-response", "entry": answer}

    def _resolve(self, node: Any, targets: dict[str, str], known: set[str]) -> None:
        if isinstance(node, list):
            for item in node:
                self._resolve(item, targets, known)
        elif isinstance(node, dict):
            ref = node.get("reference")
            if isinstance(ref, str):
                if ref in targets:
                    node["reference"] = targets[ref]
                elif "?" in ref:  # a conditional reference
                    kind, _, query = ref.partition("?")
                    found = self._search(kind, query)
                    if len(found) != 1:
                        raise FhirError(412, f"conditional reference {kind} matches {len(found)} resources")
                    node["reference"] = f"{kind}/{found[0]}"
                elif ref not in known:
                    raise FhirError(400, f"reference {ref!r} resolves to nothing", "not-found")
            for key, value in node.items():
                if key != "reference":
                    self._resolve(value, targets, known)

    # --- HTTP ---------------------------------------------------------------------------------------------

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet: the tests read server.requests
                pass

            def _answer(self, status: int, document: dict[str, Any]) -> None:
                data = json.dumps(document).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _serve(self, method: str) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    body: Any = json.loads(raw) if raw else None
                except ValueError:
                    body = raw
                server.requests.append(Recorded(method, self.path, dict(self.headers.items()), body))
                if server._hang:
                    seconds, server._hang = server._hang, 0.0
                    server._closing.wait(seconds)
                if server._failures:
                    status = server._failures.pop(0)
                    return self._answer(status, outcome(f"the test asked for HTTP {status}", "transient"))
                if server.authorization and self.headers.get("Authorization") != server.authorization:
                    return self._answer(401, outcome("authorization required", "login"))
                try:
                    self._answer(200, self._route(method, body))
                except FhirError as exc:
                    self._answer(exc.status, outcome(str(exc), exc.code))

            def _route(self, method: str, body: Any) -> dict[str, Any]:
                url = urlsplit(self.path)
                path = url.path.removeprefix("/fhir").strip("/")
                if method == "POST" and not path:
                    if not (self.headers.get("Content-Type") or "").startswith("application/fhir+json"):
                        raise FhirError(415, "Content-Type must be application/fhir+json")
                    return server.transaction(body)
                if method == "GET" and path == "metadata":
                    return {"resourceType": "CapabilityStatement", "status": "active", "kind": "instance",
                            "fhirVersion": "4.0.1", "format": ["json"], "date": "2026-01-01"}
                if method == "GET" and path and "/" not in path and url.query:
                    with server._lock:
                        found = [copy.deepcopy(server._store[(path, i)]) for i in server._search(path, url.query)]
                    return {"resourceType": "Bundle", "type": "searchset", "total": len(found),
                            "entry": [{"resource": r} for r in found]}
                if method == "GET" and path.count("/") == 1:
                    with server._lock:
                        found_one = server._store.get(tuple(path.split("/")))  # type: ignore[arg-type]
                    if found_one is None:
                        raise FhirError(404, f"{path} not found", "not-found")
                    return copy.deepcopy(found_one)
                raise FhirError(400, f"{method} {self.path} is not supported here", "not-supported")

            def do_POST(self) -> None:
                self._serve("POST")

            def do_GET(self) -> None:
                self._serve("GET")

        return Handler

    def iter_references(self) -> Iterator[str]:
        """Every reference string in the stored resources (for tests that check they all resolve)."""
        def walk(node: Any) -> Iterator[str]:
            if isinstance(node, dict):
                if isinstance(node.get("reference"), str):
                    yield node["reference"]
                for value in node.values():
                    yield from walk(value)
            elif isinstance(node, list):
                for item in node:
                    yield from walk(item)
        with self._lock:
            resources = list(self._store.values())
        yield from walk(resources)
