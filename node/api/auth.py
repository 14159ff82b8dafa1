"""API step, security: bearer tokens (stored as SHA-256 hashes), read and write permissions."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import Depends, HTTPException, Request

from node.files import atomic_write
from node.settings import ApiToken, Settings

log = logging.getLogger("radnode.api")

TOKENS_FILE = "api-tokens.json"  # in the data folder: tokens made by `radnode token new` (hashes only)
COOKIE = "radnode_token"
MAX_TOKEN_CHARS = 512  # the dashboard keeps the token in an HttpOnly, SameSite=Strict cookie


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def tokens_path(settings: Settings) -> Path:
    return settings.data_path / TOKENS_FILE


def saved_tokens(settings: Settings) -> list[ApiToken]:
    """Tokens saved in the data folder. Raises ValueError naming the file when it is not valid."""
    path = tokens_path(settings)
    if not path.exists():
        return []
    try:
        return [ApiToken(**entry) for entry in json.loads(path.read_text())]
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: not a valid token list ({exc})") from None


def new_token(settings: Settings, name: str, read_only: bool = False, save: bool = True) -> tuple[str, ApiToken]:
    """A new random token and its settings entry; saved (hash only, mode 0600) in the data folder when `save`.
    The token itself is returned once and stored nowhere. Raises ValueError for a bad or taken name."""
    token = "rn_" + secrets.token_urlsafe(32)
    entry = ApiToken(name=name, sha256=hash_token(token), read_only=read_only)
    if save:
        current = saved_tokens(settings)
        if any(t.name == name for t in [*current, *settings.api_tokens]):
            raise ValueError(f"a token named {name!r} exists already")
        path = tokens_path(settings)
        path.parent.mkdir(parents=True, exist_ok=True)
        document = json.dumps([t.model_dump() for t in [*current, entry]], indent=2).encode()
        atomic_write(path, document, mode=0o600)
    return token, entry


@dataclass(frozen=True)
class Principal:
    """Who made a request: the token's name, or "anonymous" for open reads."""

    name: str
    can_write: bool


class Authenticator:
    """Checks bearer tokens against the configured and saved hashes (the saved file is re-read on change)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._mtime: float | None = None
        self._saved: list[ApiToken] = []

    def tokens(self) -> list[ApiToken]:
        path = tokens_path(self.settings)
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            mtime = None
        if mtime != self._mtime:
            try:
                self._saved = saved_tokens(self.settings)
            except ValueError:
                log.exception("API tokens file ignored")
                self._saved = []
            self._mtime = mtime
        return [*self.settings.api_tokens, *self._saved]

    def identify(self, request: Request) -> Principal | None:
        """The principal of a request's bearer token (or dashboard cookie), or None without a valid one."""
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            token = request.cookies.get(COOKIE, "")
        return self.check(token.strip())

    def check(self, token: str) -> Principal | None:
        """The principal a token belongs to (SHA-256 compared in constant time), or None."""
        if not token or len(token) > MAX_TOKEN_CHARS:
            return None
        digest = hash_token(token)
        for entry in self.tokens():
            if hmac.compare_digest(digest, entry.sha256):
                return Principal(entry.name, not entry.read_only)
        return None


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(401, detail, headers={"WWW-Authenticate": 'Bearer realm="radnode"'})


def reader(request: Request) -> Principal:
    """Dependency: reading needs a valid token unless `api_read_open`. Raises HTTPException 401."""
    auth: Authenticator = request.app.state.auth
    who = auth.identify(request)
    if who is not None:
        return who
    if auth.settings.api_read_open and not _bad_token_given(request):
        return Principal("anonymous", False)
    raise _unauthorized("a valid bearer token is needed (Authorization: Bearer <token>)")


def writer(request: Request) -> Principal:
    """Dependency: changing state needs a token that is not read-only. Raises HTTPException 401 or 403."""
    auth: Authenticator = request.app.state.auth
    who = auth.identify(request)
    if who is None:
        raise _unauthorized("a valid bearer token is needed to change state (Authorization: Bearer <token>)")
    if not who.can_write:
        raise HTTPException(403, f"token {who.name!r} is read-only")
    return who


def _bad_token_given(request: Request) -> bool:
    return request.headers.get("authorization", "").lower().startswith("bearer ")


Reader = Annotated[Principal, Depends(reader)]  # an endpoint parameter: who reads (401 without a token)
Writer = Annotated[Principal, Depends(writer)]  # who changes state (401 without, 403 with a read-only token)
