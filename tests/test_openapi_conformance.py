"""``/openapi.json`` says what the server does, where a generated client would otherwise trip (issue 15.6)."""

from __future__ import annotations

import re
from typing import Any

import httpx

from conftest import Env

SITE_OPERATIONS = [
    ("post", "/sites/{site}/api/token/"),
    ("delete", "/sites/{site}/api/token/"),
    ("post", "/sites/{site}/api/chat/"),
    ("get", "/sites/{site}/api/chat/"),
    ("get", "/sites/{site}/api/chat/{chat_session}/messages/"),
    ("post", "/sites/{site}/api/chat/{chat_session}/close/"),
    ("post", "/sites/{site}/api/chat/{chat_session}/ack/"),
]


def spec_of(env: Env) -> dict[str, Any]:
    spec: dict[str, Any] = httpx.get(f"{env.url}/openapi.json", timeout=30).json()
    return spec


def test_per_site_operations_declare_the_site(env: Env) -> None:
    spec = spec_of(env)
    declared = [(m, p) for p, ops in spec["paths"].items() if "{site}" in p for m in ops]
    assert sorted(declared) == sorted(SITE_OPERATIONS)
    for method, path in SITE_OPERATIONS:
        site = [p for p in spec["paths"][path][method]["parameters"] if p["name"] == "site"]
        assert site and site[0]["in"] == "path" and site[0]["required"] is True, (method, path)
        assert re.fullmatch(site[0]["schema"]["pattern"], "ke"), (method, path)
        assert "404" in spec["paths"][path][method]["responses"], (method, path)


def test_a_nul_in_the_query_is_documented_everywhere(env: Env) -> None:
    spec = spec_of(env)
    bot = env.chatbot()
    amina = env.counselor("amina")
    for path in ("/healthz", "/readyz", "/api/agents/me", "/api/offers/"):
        assert "422" in spec["paths"][path]["get"]["responses"], path
        client = amina.http if path.startswith("/api") else bot.http
        r = client.get(path, params={"q": "a\x00b"})
        assert r.status_code == 422 and r.json()["error"]["fields"] == {"q": ["must not contain NUL characters"]}
    missing = [
        (method, path)
        for path, ops in spec["paths"].items()
        for method, op in ops.items()
        if "422" not in op["responses"]
    ]
    assert missing == []


def test_the_schema_forbids_what_the_server_refuses(env: Env) -> None:
    spec = spec_of(env)
    post = spec["paths"]["/api/chat/"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    message = post["properties"]["chat_message"]
    assert re.fullmatch(message["pattern"], "hello") and not re.fullmatch(message["pattern"], "a\x00b")
    bot = env.chatbot()
    r = bot.send("s1", "a\x00b")
    assert r.status_code == 422 and "chat_message" in r.json()["error"]["fields"]


def test_405_names_every_method_served_at_the_path(env: Env) -> None:
    bot = env.chatbot()
    for path, methods in (
        ("/api/chat/", "GET, POST"),
        ("/open/api/chat/", "GET, POST"),
        ("/sites/ke/api/chat/", "GET, POST"),
        ("/api/token/", "POST, DELETE"),
        ("/api/chat/s1/close/", "POST"),
    ):
        r = bot.http.request("OPTIONS", path)
        assert r.status_code == 405 and r.headers["allow"] == methods, (path, r.headers.get("allow"))
        assert r.json()["error"]["code"] == "method_not_allowed"
