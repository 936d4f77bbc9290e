"""The status page's HTTP side: its files (``ui/``, served without auth: they hold no data), the
login that trades a one-time code for a session cookie, and the code the CLI asks for with the
token. A session reads only the data endpoints ``make_app`` gives the ``sessions`` verifier to."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tornado.web import RequestHandler, StaticFileHandler

from genmlx.core.http import ApiHandler, ClusterAuth
from genmlx.master.api.ui_auth import COOKIE_NAME, LoginCodes, Sessions

PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; connect-src 'self'; img-src 'self' data:; style-src 'self'; "
        "script-src 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

EXPIRED_LOGIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>GenMLX: sign-in link not valid</title></head>
<body><h1>This sign-in link is not valid</h1>
<p>Sign-in links work once and for 60 seconds. Run <code>genmlx ui</code> again on a machine
that has the cluster's token.</p></body></html>
"""


def ui_root() -> Path:
    """The page's files: ``genmlx/ui`` in a wheel, else ``ui/`` in the source checkout."""
    packaged = Path(__file__).resolve().parents[2] / "ui"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[3] / "ui"


def set_page_headers(handler: RequestHandler) -> None:
    for name, value in PAGE_HEADERS.items():
        handler.set_header(name, value)


class UiFileHandler(StaticFileHandler):
    """The page's files, with its security headers; no directory listing, nothing outside the root."""

    def set_extra_headers(self, path: str) -> None:
        set_page_headers(self)
        self.set_header("Cache-Control", "no-cache")

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        set_page_headers(self)
        self.finish(f"{status_code}\n")


class UiLoginCodeHandler(ApiHandler):
    """``POST /api/v1/ui/login`` (bearer token): a one-time sign-in link for the browser."""

    def initialize(self, auth: ClusterAuth, codes: LoginCodes) -> None:
        super().initialize(auth)
        self.codes = codes

    def post(self) -> None:
        code = self.codes.issue()
        self.set_header("Cache-Control", "no-store")
        self.write_json(200, {"url": f"/ui/login?code={code}", "expiresIn": int(self.codes.ttl_s)})


class UiLoginHandler(RequestHandler):
    """``GET /ui/login?code=CODE``: a session cookie and a 303 to the page, or a 401 page."""

    def initialize(self, codes: LoginCodes, sessions: Sessions) -> None:
        self.codes = codes
        self.sessions = sessions

    def get(self) -> None:
        set_page_headers(self)
        self.set_header("Cache-Control", "no-store")
        if not self.codes.redeem(self.get_query_argument("code", None)):
            self.set_status(401)
            self.set_header("Content-Type", "text/html; charset=utf-8")
            self.finish(EXPIRED_LOGIN_PAGE)
            return
        self.set_cookie(
            COOKIE_NAME,
            self.sessions.mint(),
            path="/",
            max_age=self.sessions.ttl_s,
            httponly=True,
            secure=self.request.protocol == "https",
            samesite="Strict",
        )
        self.redirect("/", status=303)


def ui_routes(auth: ClusterAuth) -> tuple[list[tuple], Sessions]:
    """The page's routes and the session verifier the data endpoints take in their deps."""
    sessions, codes = Sessions(auth.token), LoginCodes()
    root = str(ui_root())
    routes: list[tuple] = [
        (r"/api/v1/ui/login", UiLoginCodeHandler, {"auth": auth, "codes": codes}),
        (r"/ui/login", UiLoginHandler, {"codes": codes, "sessions": sessions}),
        (r"/()", UiFileHandler, {"path": root, "default_filename": "index.html"}),
        (r"/ui/(.+)", UiFileHandler, {"path": root}),
    ]
    return routes, sessions
