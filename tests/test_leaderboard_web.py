"""The web page without a browser: safe embedding of user strings, the export, the read-only server."""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import re
import threading

import pytest
from leaderboard_samples import write_results

from llamaherd.leaderboard import Registry, export_html, make_server, record_results
from llamaherd.leaderboard.web import json_for_html

XSS_NAMES = ["<script>alert(1)</script>", '</script><img src=x onerror="alert(2)">', "a&b <!-- c --> \u2028"]
SCORES = {"arc": 30.0, "hellaswag": 40.0, "mmlu": 25.0, "truthfulqa": 45.0}


def _fill(db, tmp_path) -> None:
    with Registry(db) as reg:
        for i, name in enumerate(XSS_NAMES):
            record_results(reg, write_results(tmp_path / f"e{i}", name, SCORES))
        reg.upsert_model(XSS_NAMES[0], overwrite=True, notes="<b>bold</b>", license="<i>mit</i>")


def test_json_for_html_escapes_everything_that_could_end_a_script():
    data = {"names": XSS_NAMES, "nan": float("nan")}
    text = json_for_html(data)
    assert not set("<>&\u2028\u2029") & set(text)
    assert json.loads(text) == {"names": XSS_NAMES, "nan": None}


def test_export_embeds_data_safely(tmp_path):
    db = tmp_path / "db.sqlite"
    _fill(db, tmp_path)
    page = export_html(db, tmp_path / "out" / "board.html").read_text()
    assert "alert(" not in page.split('id="board-data">')[0]
    for name in XSS_NAMES:
        assert name not in page
    assert page.count("<script") == 2 and page.count("</script>") == 2  # the data block and the app
    data_block = r'<script type="application/json" id="board-data">(.*?)</script>'
    embedded = re.search(data_block, page, re.DOTALL).group(1)
    data = json.loads(embedded)
    assert {r["name"] for r in data["rows"] if r["kind"] == "measured"} == set(XSS_NAMES)
    assert data["models"][XSS_NAMES[0]]["model"]["notes"] == "<b>bold</b>"
    assert any(r["kind"] == "reported" for r in data["rows"])  # the 2023 rows come along
    # The page's CSP allows exactly its own inline script and style (hashes computed here independently).
    app = re.search(r"<script>(.*?)</script>", page, re.DOTALL).group(1)
    style = re.search(r"<style>(.*?)</style>", page, re.DOTALL).group(1)
    csp = re.search(r'http-equiv="Content-Security-Policy" content="([^"]*)"', page).group(1)
    for source in (app, style):
        digest = base64.b64encode(hashlib.sha256(source.encode()).digest()).decode()
        assert f"'sha256-{digest}'" in csp
    assert "unsafe-inline" not in csp and "default-src 'none'" in csp
    assert "innerHTML" not in app and "insertAdjacentHTML" not in app and "document.write" not in app
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")  # no external resources


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("served")
    db = tmp_path / "db.sqlite"
    _fill(db, tmp_path)
    srv = make_server(db, "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _request(srv, method: str, path: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=10)
    conn.request(method, path, headers=headers or {})
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    return resp.status, dict(resp.getheaders()), body


def test_server_serves_its_assets_and_data(server):
    status, headers, body = _request(server, "GET", "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert b'<script src="app.js">' in body
    assert _request(server, "GET", "/app.js")[1]["Content-Type"].startswith("text/javascript")
    assert _request(server, "GET", "/style.css")[0] == 200
    status, headers, body = _request(server, "GET", "/api/leaderboard.json")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert b"<" not in body
    names = {r["name"] for r in json.loads(body)["rows"]}
    assert set(XSS_NAMES) <= names and "Llama-2-7b-hf" in names
    status, headers, body = _request(server, "HEAD", "/api/leaderboard.json")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0


@pytest.mark.parametrize("path", [
    "/../../etc/passwd", "/..%2f..%2fetc%2fpasswd", "/%2e%2e/%2e%2e/etc/passwd", "/%252e%252e/%252e%252e/etc/passwd",
    "/app.js/../../../etc/passwd", "/..\\..\\etc\\passwd", "/%5c..%5cetc%5cpasswd", "/app.js%00.css",
])
def test_path_traversal_is_rejected(server, path):
    status, _, body = _request(server, "GET", path)
    assert status == 403 and b"root:" not in body


@pytest.mark.parametrize("path", ["/etc/passwd", "//etc/passwd", "/leaderboard.js", "/data/leaderboard.css",
                                  "/open_llm_leaderboard_2023.csv", "/db.sqlite", "/api", "/index.htm"])
def test_anything_else_is_not_found(server, path):
    assert _request(server, "GET", path)[0] == 404


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
def test_server_is_read_only(server, method):
    status, headers, _ = _request(server, method, "/api/leaderboard.json")
    assert status == 405 and headers["Allow"] == "GET, HEAD"


def test_foreign_host_header_is_refused(server):
    """A page on another origin that rebinds its DNS name to 127.0.0.1 cannot read the data."""
    assert _request(server, "GET", "/api/leaderboard.json", {"Host": "evil.example:80"})[0] == 403
    assert _request(server, "GET", "/", {"Host": f"localhost:{server.server_address[1]}"})[0] == 200


def test_api_reports_a_database_broken_while_serving(tmp_path):
    db = tmp_path / "db.sqlite"
    srv = make_server(db, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        for extra in (tmp_path / "db.sqlite-wal", tmp_path / "db.sqlite-shm"):
            extra.unlink(missing_ok=True)
        db.write_bytes(b"garbage" * 100)
        status, _, body = _request(srv, "GET", "/api/leaderboard.json")
        assert status == 500 and b"not an SQLite database" in body
        assert db.read_bytes() == b"garbage" * 100
    finally:
        srv.shutdown()
        srv.server_close()
