"""Cross-origin access: none by default; with ``HELPLINE_CORS_ORIGINS`` only the origins listed.
And the console's pages carry their security headers (the console keeps its token in
sessionStorage, never in a cookie, so no cross-site request carries a credential by itself)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx
import pytest

from conftest import PASSWORD, Env

ALLOWED = "https://console.example.org"
OTHER_ALLOWED = "https://ops.example.org"
EVIL = "https://evil.example.com"


@pytest.fixture
def http() -> Iterator[Callable[[Env], httpx.Client]]:
    made: list[httpx.Client] = []

    def make(env: Env) -> httpx.Client:
        c = httpx.Client(base_url=env.url, timeout=30)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def preflight(c: httpx.Client, path: str, origin: str, method: str = "POST") -> httpx.Response:
    return c.options(
        path,
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": "authorization,content-type",
        },
    )


def cors_headers(r: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in r.headers.items() if k.lower().startswith("access-control-")}


def test_no_cross_origin_access_by_default(make_env: Callable[..., Env], http: Callable[[Env], httpx.Client]) -> None:
    env = make_env()
    c = http(env)
    for origin in (ALLOWED, EVIL):
        assert cors_headers(c.get("/healthz", headers={"Origin": origin})) == {}
        r = c.post("/api/token/", json={"username": "x", "password": "y" * 8}, headers={"Origin": origin})
        assert r.status_code == 401 and cors_headers(r) == {}
        r = preflight(c, "/api/chat/", origin)
        assert r.status_code == 405 and cors_headers(r) == {}


def test_only_the_configured_origins(make_env: Callable[..., Env], http: Callable[[Env], httpx.Client]) -> None:
    env = make_env(settings={"cors_origins": f"{ALLOWED}, {OTHER_ALLOWED}"})
    env.user("amina", "counselor", site="ke")
    c = http(env)

    # A disallowed origin gets no CORS header at all: its browser will not hand it the answer.
    r = c.post("/api/token/", json={"username": "amina", "password": PASSWORD}, headers={"Origin": EVIL})
    assert r.status_code == 200 and cors_headers(r) == {}
    r = preflight(c, "/api/conversations/x/messages/", EVIL)
    assert r.status_code == 400 and cors_headers(r).get("access-control-allow-origin") is None

    # An allowed one: preflight, then the real call (errors included), with the token in a header.
    for origin in (ALLOWED, OTHER_ALLOWED):
        r = preflight(c, "/api/conversations/x/messages/", origin)
        assert r.status_code == 200, r.text
        h = cors_headers(r)
        assert h["access-control-allow-origin"] == origin
        assert "POST" in h["access-control-allow-methods"]
        assert {"authorization", "content-type"} <= {
            x.strip().lower() for x in h["access-control-allow-headers"].split(",")
        }
        assert "access-control-allow-credentials" not in h  # a token header, never cookies
    r = c.post("/api/token/", json={"username": "amina", "password": PASSWORD}, headers={"Origin": ALLOWED})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ALLOWED
    token = r.json()["token"]
    r = c.get("/api/agents/me", headers={"Origin": ALLOWED, "Authorization": f"Token {token}"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ALLOWED
    r = c.get("/api/agents/me", headers={"Origin": ALLOWED})
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == ALLOWED
    r = c.get("/api/agents/me", headers={"Origin": EVIL, "Authorization": f"Token {token}"})
    assert r.status_code == 200 and cors_headers(r) == {}


def test_console_pages_carry_security_headers(
    make_env: Callable[..., Env], http: Callable[[Env], httpx.Client]
) -> None:
    env = make_env()
    c = http(env)
    for path in ("/console/", "/console/supervisor/", "/console/static/lib.js"):
        r = c.get(path)
        assert r.status_code == 200, path
        csp = r.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "default-src 'self'" in csp, path
        assert r.headers["x-frame-options"] == "DENY"
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["referrer-policy"] == "no-referrer"
        assert r.headers["cross-origin-opener-policy"] == "same-origin"
        assert "microphone=()" in r.headers["permissions-policy"]
        assert "set-cookie" not in r.headers
