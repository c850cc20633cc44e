"""The dashboard page: served without a key and without data, under a strict CSP, and absent from the OpenAPI spec."""
from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from app.main import create_app


@pytest.fixture(params=["open", "required"])
def page_client(request, settings):
    with TestClient(create_app(settings.model_copy(update={"auth": request.param})),
                    raise_server_exceptions=False) as c:
        yield c


def test_page_and_assets_need_no_key_and_carry_a_strict_csp(page_client):
    page = page_client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["default-src"] == "'none'" and directives["script-src"] == "'self'"
    assert directives["connect-src"] == "'self'" and "unsafe" not in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    html = page.text
    # every script is a file of this origin: no inline script, no event-handler attributes, nothing from elsewhere
    scripts = re.findall(r"<script([^>]*)>(.*?)</script>", html, flags=re.S)
    assert scripts and all('src="/dashboard/' in attrs and not body.strip() for attrs, body in scripts)
    assert not re.search(r"\son[a-z]+=", html) and "style=" not in html
    assert not re.search(r"(src|href)=\"(https?:)?//", html)
    for name, ctype in (("app.js", "text/javascript"), ("app.css", "text/css")):
        asset = page_client.get(f"/dashboard/{name}")
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(ctype)
        assert asset.headers["content-security-policy"] == csp and len(asset.content) > 500
        text = asset.text.replace('"http://www.w3.org/2000/svg"', "")  # the SVG namespace is a name, not a fetch
        assert "http://" not in text and "https://" not in text
    js = page_client.get("/dashboard/app.js").text
    assert "innerHTML" not in js and "eval(" not in js  # text goes in with textContent only
    # no style attribute either (the CSP refuses inline style): styles come from app.css or the CSSOM
    assert not re.search(r"""setAttribute\(\s*["']style|\bstyle:\s*["'`]""", js)


def test_the_page_has_a_report_with_a_download_and_a_comparison(page_client):
    """The parts the browser test drives (tests/e2e/test_dashboard.py): the report, its artifact download, the
    distillation's comparison; a job's report is #/jobs/<id> on this same page."""
    html = page_client.get("/").text
    for part in ('id="job-panel"', 'id="artifact-download"', 'id="comparison"', 'id="params-line"',
                 'id="metrics"', 'id="chart"', 'id="jobs-box"'):
        assert part in html, part
    js = page_client.get("/dashboard/app.js").text
    assert "#/jobs/" in js and "hashchange" in js and "popstate" in js


def test_unknown_asset_is_a_json_404(page_client):
    resp = page_client.get("/dashboard/../app/core/config.py")
    assert resp.status_code == 404
    resp = page_client.get("/dashboard/secret.py")
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found"


def test_dashboard_routes_are_not_in_the_openapi_spec(page_client):
    paths = page_client.get("/openapi.json").json()["paths"]
    assert "/" not in paths and not any(p.startswith("/dashboard") for p in paths)
    assert "/v1/jobs" in paths


def test_files_are_revalidated_with_an_etag(page_client):
    for path in ("/", "/dashboard/app.js", "/dashboard/app.css"):
        first = page_client.get(path)
        etag = first.headers["etag"]
        assert first.headers["cache-control"] == "no-cache" and etag.startswith('"')
        again = page_client.get(path, headers={"If-None-Match": etag})
        assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag
        assert again.headers["content-security-policy"] == first.headers["content-security-policy"]
        other = page_client.get(path, headers={"If-None-Match": '"0000"'})
        assert other.status_code == 200 and other.content == first.content
