"""The leaderboard as a web page: a read-only local server and a self-contained HTML export.

The page's assets are package data (no CDN). The server answers GET/HEAD for exactly its own assets and one
JSON endpoint; everything else is 404, traversal attempts 403 and other methods 405. User strings travel only
as JSON (with `<`, `>` and `&` escaped, so no string can close a <script> element) and reach the DOM as text.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from llamaherd.files import atomic_write
from llamaherd.leaderboard.ranking import board_data
from llamaherd.leaderboard.reference import load_reference
from llamaherd.leaderboard.registry import LeaderboardError, Registry, opened

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765
API_PATH = "/api/leaderboard.json"
SERVED_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
              "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_MARKER = re.compile(r"<!--(HEAD|BODY)-->")
_JSON_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def asset(name: str) -> str:
    """One of the page's packaged assets: leaderboard.html, .js or .css."""
    return resources.files("llamaherd").joinpath("data", name).read_text(encoding="utf-8")


def _finite(obj: Any) -> Any:
    """NaN/inf (e.g. a stderr over one item) become null: JSON has no spelling for them."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def json_for_html(obj: Any) -> str:
    """JSON safe to embed in an HTML <script> element: `<`, `>`, `&` and JS line separators as \\u escapes."""
    text = json.dumps(_finite(obj), ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return re.sub("[<>&\u2028\u2029]", lambda m: _JSON_ESCAPES[m.group()], text)


def _sha256_source(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


def render_page(data: dict[str, Any] | None) -> str:
    """The page: with `data`, one self-contained document; without, the served page that fetches the API."""
    if data is None:
        parts = {"HEAD": '<link rel="stylesheet" href="style.css">', "BODY": '<script src="app.js"></script>'}
    else:
        css, js = asset("leaderboard.css"), asset("leaderboard.js")
        csp = (f"default-src 'none'; script-src {_sha256_source(js)}; style-src {_sha256_source(css)}; "
               "img-src data:; base-uri 'none'; form-action 'none'")
        parts = {
            "HEAD": f'<meta http-equiv="Content-Security-Policy" content="{csp}">\n<style>{css}</style>',
            "BODY": f'<script type="application/json" id="board-data">{json_for_html(data)}</script>\n'
                    f"<script>{js}</script>",
        }
    return _MARKER.sub(lambda m: parts[m.group(1)], asset("leaderboard.html"))


def export_html(db: Registry | str | Path | None, out: str | Path) -> Path:
    """Write the self-contained page (reference rows included) atomically to `out`; returns its path."""
    out = Path(out).expanduser()
    with opened(db) as reg:
        load_reference(reg)
        page = render_page(board_data(reg))
    return atomic_write(out, page)


def _is_traversal(path: str) -> bool:
    """`..` segments, backslashes or NUL after up to three rounds of percent-decoding."""
    for _ in range(3):
        if any(seg == ".." for seg in path.split("/")) or "\\" in path or "\x00" in path:
            return True
        decoded = unquote(path)
        if decoded == path:
            return False
        path = decoded
    return True


class LeaderboardHandler(BaseHTTPRequestHandler):
    """GET/HEAD of the page, its two assets and the JSON data; nothing else."""

    server: LeaderboardServer
    server_version = "llamaherd-leaderboard"
    sys_version = ""

    def do_GET(self) -> None:
        self._serve(send_body=True)

    def do_HEAD(self) -> None:
        self._serve(send_body=False)

    def _method_not_allowed(self) -> None:
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, b"read-only: only GET and HEAD\n", "text/plain; charset=utf-8",
                   extra={"Allow": "GET, HEAD"})

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _method_not_allowed

    def _serve(self, send_body: bool) -> None:
        path = urlsplit(self.path).path
        if _is_traversal(path):
            return self._send(HTTPStatus.FORBIDDEN, b"forbidden\n", "text/plain; charset=utf-8", send_body)
        if not self._host_allowed():
            return self._send(HTTPStatus.FORBIDDEN, b"unexpected Host header\n", "text/plain; charset=utf-8",
                              send_body)
        path = unquote(path)
        if path in ("/", "/index.html"):
            body, ctype = render_page(None), "text/html; charset=utf-8"
        elif path == "/app.js":
            body, ctype = asset("leaderboard.js"), "text/javascript; charset=utf-8"
        elif path == "/style.css":
            body, ctype = asset("leaderboard.css"), "text/css; charset=utf-8"
        elif path == API_PATH:
            try:
                with Registry(self.server.db_path) as reg:
                    body, ctype = json_for_html(board_data(reg)), "application/json; charset=utf-8"
            except LeaderboardError as e:  # e.g. the file was replaced while serving: say so, keep serving
                return self._send(HTTPStatus.INTERNAL_SERVER_ERROR, f"{e}\n".encode(), "text/plain; charset=utf-8",
                                  send_body)
        else:
            return self._send(HTTPStatus.NOT_FOUND, b"not found\n", "text/plain; charset=utf-8", send_body)
        self._send(HTTPStatus.OK, body.encode(), ctype, send_body)

    def _host_allowed(self) -> bool:
        """On loopback, only loopback Host names: a DNS-rebinding page cannot read the data."""
        if not self.server.loopback:
            return True
        host = (self.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]").lower()
        return host in ("127.0.0.1", "localhost", "::1")

    def _send(self, status: HTTPStatus, body: bytes, ctype: str, send_body: bool = True,
              extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        headers = {"Content-Type": ctype, "Content-Length": str(len(body)), "Cache-Control": "no-store",
                   "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                   "X-Frame-Options": "DENY", "Content-Security-Policy": SERVED_CSP, **(extra or {})}
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.verbose:
            super().log_message(format, *args)


class LeaderboardServer(ThreadingHTTPServer):
    """The HTTP server; each request opens the database afresh, so the page shows the latest results."""

    daemon_threads = True

    def __init__(self, db_path: Path, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                 verbose: bool = False) -> None:
        self.db_path = db_path
        self.verbose = verbose
        self.loopback = host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")
        super().__init__((host, port), LeaderboardHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"


def make_server(db: str | Path | None = None, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                verbose: bool = False) -> LeaderboardServer:
    """Open (migrating, loading the reference rows) the database, then bind the server; port 0 picks one."""
    with Registry(db) as reg:
        load_reference(reg)
        path = reg.path
    return LeaderboardServer(path, host, port, verbose)
