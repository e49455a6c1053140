"""Who may use the page and where: its address, its token, the cookie that carries it, the Host rule, and how a decision names
the credential it was made with.

Decisions belong to people, and a job can reach loopback (a ``host``-network job shares it), so every request
needs the page's token, on loopback too: ``EXECUTOR_UI_TOKEN``, or else a random token made at first start
in ``$EXECUTOR_HOME/ui-token`` (mode 0600, never inside any container; ``executor review url`` prints the
address with it). It goes in ``Authorization: Bearer`` or ``?token=`` once (a browser then keeps it in a
strict same-site cookie). On loopback only loopback ``Host`` names are served (no DNS rebinding).

Must never: let a request without the token reach a route, keep the token in the address bar, or reveal it
(a decision records its fingerprint).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path
from urllib.parse import parse_qsl, urlencode

from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from ...addresses import is_loopback
from ...errors import ConfigError
from ...settings import Settings

COOKIE = "executor_ui_token"
TOKEN_FILE = "ui-token"


def page_token(settings: Settings) -> str:
    """The token every request needs: ``EXECUTOR_UI_TOKEN``, or the state root's own, made once at random."""
    if settings.ui_token is not None:
        return settings.ui_token.get_secret_value()
    path = settings.home / TOKEN_FILE
    settings.home.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        return _read_token(path)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_urlsafe(32) + "\n")
    return _read_token(path)


def _read_token(path: Path) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd) as fh:
        token = fh.read().strip()
    if len(token) < 16:
        raise ConfigError(f"{path} holds no usable token (remove it: the executor makes a new one)")
    return token


def fingerprint(token: str) -> str:
    """How a decision names the credential it was made with, without revealing it."""
    return "token sha256:" + hashlib.sha256(token.encode()).hexdigest()[:12]


class Guard:
    """ASGI middleware: token, Host and refusal rules in front of every route."""

    def __init__(self, app: ASGIApp, host: str, token: str) -> None:
        self.app, self.host, self.token = app, host, token
        self.loopback = is_loopback(host)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        refusal = self._refusal(request)
        if refusal is not None:
            await PlainTextResponse(refusal, status_code=403)(scope, receive, send)
            return
        given = request.query_params.get("token")
        if given is not None:
            # A token in the URL: keep it in a cookie and drop it from the address bar (and history).
            query = urlencode([(k, v) for k, v in parse_qsl(request.url.query) if k != "token"])
            response = RedirectResponse(request.url.path + (f"?{query}" if query else ""), status_code=303)
            response.set_cookie(COOKIE, given, httponly=True, samesite="strict",
                                secure=request.url.scheme == "https")
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _refusal(self, request: Request) -> str | None:
        if self.loopback:
            name = (request.url.hostname or "").strip("[]")
            if not (is_loopback(name) or name == self.host):
                return "refused: this page answers only to loopback host names\n"
        given = request.query_params.get("token") or request.cookies.get(COOKIE) or ""
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            return ("refused: a valid token is required (Authorization: Bearer TOKEN, or ?token=TOKEN once; "
                    "`executor review url` prints the address with it)\n")
        return None


def web_url(settings: Settings) -> str | None:
    """Where the page is reached (for links in notifications); None when it is off."""
    if settings.ui_port is None:
        return None
    host = settings.ui_host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.ui_port}"
