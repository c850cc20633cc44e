"""`/docs` works on a machine with no internet: Swagger UI's page names only this server's URLs, and this server
answers each of them with Swagger UI's script, style and icon (from the `fastapi-swagger` package)."""
from __future__ import annotations

import re
from urllib.parse import urlsplit

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from tests.conftest import make_settings


@pytest.fixture
def api(tmp_path):
    with TestClient(create_app(make_settings(tmp_path, "sqlite", "filesystem")),
                    raise_server_exceptions=False) as c:
        yield c


def page_urls(html: str) -> list[str]:
    """Every URL the page makes the browser fetch: src and href attributes, and the spec's `url:`."""
    return re.findall(r'(?:src|href)="([^"]*)"', html) + re.findall(r"\burl: '([^']*)'", html)


def test_docs_page_names_only_same_origin_urls_and_each_one_answers(api):
    resp = api.get("/docs")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    html = resp.text
    assert "SwaggerUIBundle(" in html
    assert "http://" not in html and "https://" not in html and "//cdn" not in html, html
    urls = page_urls(html)
    assert len(urls) == 4, urls  # style, icon, script, spec
    for url in urls:
        parts = urlsplit(url)
        assert url.startswith("/") and not url.startswith("//") and not parts.scheme and not parts.netloc, url

    by_kind = {}
    for url in urls:
        got = api.get(url)
        assert got.status_code == 200, (url, got.text[:200])
        by_kind[url.rsplit(".", 1)[-1]] = got
    js, css, png, spec = by_kind["js"], by_kind["css"], by_kind["png"], by_kind["json"]
    assert js.headers["content-type"].startswith("text/javascript") and len(js.content) > 500_000
    assert b"SwaggerUIBundle" in js.content
    assert b"oas31" in js.content  # Swagger UI 5: it renders this app's OpenAPI 3.1 spec (4.x could not)
    assert css.headers["content-type"].startswith("text/css") and b".swagger-ui" in css.content
    assert b"sourceMappingURL" not in css.content  # it would send the browser after a file nobody serves
    assert png.headers["content-type"] == "image/png" and png.content.startswith(b"\x89PNG")
    assert spec.json()["openapi"].startswith("3.1")


def test_docs_assets_revalidate_and_unknown_names_are_404(api):
    first = api.get("/docs/assets/swagger-ui.css")
    etag = first.headers["etag"]
    again = api.get("/docs/assets/swagger-ui.css", headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.content == b"" and again.headers["etag"] == etag
    for name in ("nope.js", "..%2Fpyproject.toml", "__init__.py", "x" * 65):
        resp = api.get(f"/docs/assets/{name}")
        assert resp.status_code in (404, 422), (name, resp.status_code)
        assert "error" in resp.json()


def test_redoc_is_not_offered_and_the_docs_routes_are_not_in_the_spec(api):
    assert api.get("/redoc").status_code == 404  # its page would load its script and fonts from CDNs
    paths = api.get("/openapi.json").json()["paths"]
    assert not [p for p in paths if p.startswith("/docs")]
