"""Dispatch step, transport helpers every sender shares: the TLS client context and the HTTP session."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any


def tls_context(ca: Path | None, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    """A TLS 1.2+ client context verifying the peer with `ca` (default: the system CAs), presenting `cert`."""
    ctx = ssl.create_default_context(cafile=str(ca) if ca else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key) if key else None)
    return ctx


def http_session(username: str | None, password: Any, token: Any, verify: bool | Path = True) -> Any:
    """A requests session with bearer (`token`) or basic authentication and the server check `verify`."""
    import requests

    session = requests.Session()
    if token is not None:
        session.headers["Authorization"] = f"Bearer {token.get_secret_value()}"
    elif username is not None:
        session.auth = (username, password.get_secret_value() if password is not None else "")
    session.verify = str(verify) if isinstance(verify, Path) else verify
    return session
