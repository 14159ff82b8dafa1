#!/usr/bin/env python3
"""Container healthchecks of the compose stack (installed as `radnode-healthcheck` in the image).

    radnode-healthcheck http [URL]   the node answers URL (default: its own /healthz) with 2xx
    radnode-healthcheck worker NAME [SECONDS]
                                     the Celery worker NAME@<this host> (`radnode worker --name NAME@%h`)
                                     answers a ping through the configured broker (within 10 s)

Exit status 0 when healthy, 1 otherwise, with the reason on stderr.
"""

from __future__ import annotations

import os
import socket
import ssl
import sys
import urllib.error
import urllib.request


def check_http(url: str | None, timeout: float = 4.0) -> str | None:
    """None when `url` answers 2xx, else why not. Default URL: this node's /healthz (HTTPS when
    RADNODE_HTTP_TLS_CERT is set, RADNODE_HTTP_PORT or 8080)."""
    if url is None:
        scheme = "https" if os.environ.get("RADNODE_HTTP_TLS_CERT") else "http"
        url = f"{scheme}://127.0.0.1:{os.environ.get('RADNODE_HTTP_PORT', '8080')}/healthz"
    context = ssl._create_unverified_context() if url.startswith("https:") else None  # our own certificate
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as response:
            return None if 200 <= response.status < 300 else f"{url}: HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        return f"{url}: HTTP {exc.code}"
    except (OSError, ValueError) as exc:
        return f"{url}: {exc}"


def check_worker(name: str, timeout: float = 10.0) -> str | None:
    """None when the worker `name@<hostname>` answers a ping on the configured broker, else why not."""
    from node.queueing.broker import make_celery
    from node.settings import load_settings

    node_name = f"{name}@{socket.gethostname()}"
    app = make_celery(load_settings(), "radnode-healthcheck")
    try:
        replies = app.control.ping(destination=[node_name], timeout=timeout)
    except Exception as exc:  # the broker is down or refuses us: unhealthy, say why
        return f"broker: {type(exc).__name__}: {exc}"
    finally:
        app.close()
    if not any(node_name in reply for reply in replies):
        return f"worker {node_name} did not answer within {timeout:g} s"
    return None


def main(argv: list[str]) -> int:
    if len(argv) >= 1 and argv[0] == "http" and len(argv) <= 2:
        problem = check_http(argv[1] if len(argv) == 2 else None)
    elif len(argv) in (2, 3) and argv[0] == "worker":
        problem = check_worker(argv[1], float(argv[2]) if len(argv) == 3 else 10.0)
    else:
        print(__doc__, file=sys.stderr)
        return 2
    if problem:
        print(f"unhealthy: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
