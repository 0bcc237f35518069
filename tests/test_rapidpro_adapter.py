"""The RapidPro flow_starts adapter against the fake RapidPro, over real loopback HTTP."""

from __future__ import annotations

import asyncio
import email.utils
import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from helpline.config.sites import RapidProConfig
from helpline.delivery.rapidpro import (
    PART_LIMIT,
    Outcome,
    RapidProClient,
    backoff_delay,
    build_flow_start,
    contact_target,
    parse_retry_after,
    split_text,
)
from helpline.testing.fake_rapidpro import DEFAULT_FLOW, FakeRapidPro

CONTACT_UUID = "5e8f3a7c-2b1d-4c6e-8f9a-0b1c2d3e4f5a"


@pytest.fixture(scope="module")
def server() -> Iterator[FakeRapidPro]:
    with FakeRapidPro() as fake:
        yield fake


@pytest.fixture
def rp(server: FakeRapidPro) -> Iterator[FakeRapidPro]:
    server.reset()
    if not server.running:
        server.come_back()
    yield server
    server.reset()


def config(rp: FakeRapidPro, **overrides: Any) -> RapidProConfig:
    values: dict[str, Any] = {
        "base_url": rp.url,
        "token": rp.token,
        "flow": rp.flow,
        "urn_scheme": "telegram",
        "timeout_s": 2.0,
    }
    values.update(overrides)
    return RapidProConfig(**values)


def send(cfg: RapidProConfig, body: dict[str, object]) -> Outcome:
    async def go() -> Outcome:
        async with RapidProClient() as client:
            return await client.send(cfg, body)

    return asyncio.run(go())


def post(
    rp: FakeRapidPro, payload: Any = None, *, raw: bytes | None = None, token: str | None = None
) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if token is None:
        token = rp.token
    if token:
        headers["Authorization"] = f"Token {token}"
    if raw is not None:
        return httpx.post(rp.flow_starts_url, content=raw, headers=headers, timeout=5)
    return httpx.post(rp.flow_starts_url, json=payload, headers=headers, timeout=5)


def message_body(cfg: RapidProConfig, text: str = "hello") -> dict[str, object]:
    target = contact_target(cfg, contact_urn=None, contact_uuid=None, client_id="23343411")
    params = {"event": "message", "conversation_id": "c-1", "message_id": "m-1", "text": text}
    return build_flow_start(cfg, target, params)


# --------------------------------------------------------------------------- accepted


def test_valid_start_is_201_and_recorded_with_exact_body(rp: FakeRapidPro) -> None:
    cfg = config(rp)
    body = message_body(cfg)
    assert body == {
        "flow": rp.flow,
        "urns": ["telegram:23343411"],
        "params": {"event": "message", "conversation_id": "c-1", "message_id": "m-1", "text": "hello"},
    }

    outcome = send(cfg, body)

    assert outcome.kind == "sent" and outcome.status == 201, outcome
    [start] = rp.wait_for(1)
    assert start.status == 201
    assert start.body == body
    assert start.headers["authorization"] == f"Token {rp.token}"
    assert start.headers["content-type"] == "application/json"
    response = start.response
    assert set(response) >= {
        "uuid",
        "flow",
        "status",
        "groups",
        "contacts",
        "params",
        "extra",
        "restart_participants",
        "exclude_active",
        "created_on",
        "modified_on",
    }
    assert response["flow"] == {"uuid": rp.flow, "name": "Helpline events"}
    assert response["status"] == "pending"
    assert response["params"] == response["extra"] == body["params"]
    assert response["restart_participants"] is True and response["exclude_active"] is False
    assert response["uuid"] in outcome.reason


def test_contacts_target_and_extra_field(rp: FakeRapidPro) -> None:
    cfg = config(rp, params_field="extra")
    target = contact_target(cfg, contact_urn=None, contact_uuid=CONTACT_UUID, client_id="9")
    assert target == {"contacts": [CONTACT_UUID]}
    body = build_flow_start(cfg, target, {"event": "closed", "conversation_id": "c-2"})
    assert "extra" in body and "params" not in body

    assert send(cfg, body).kind == "sent"

    [start] = rp.wait_for(1)
    assert start.body == body
    assert start.params == {"event": "closed", "conversation_id": "c-2"}
    assert start.response["contacts"] == [{"uuid": CONTACT_UUID, "name": None}]
    assert start.response["params"] == {"event": "closed", "conversation_id": "c-2"}


def test_contact_target_prefers_urn_then_uuid_then_scheme() -> None:
    cfg = RapidProConfig(base_url="http://x", flow="f", urn_scheme="whatsapp")
    assert contact_target(cfg, contact_urn="telegram:1", contact_uuid=CONTACT_UUID, client_id="7") == {
        "urns": ["telegram:1"]
    }
    assert contact_target(cfg, contact_urn=None, contact_uuid=CONTACT_UUID, client_id="7") == {
        "contacts": [CONTACT_UUID]
    }
    assert contact_target(cfg, contact_urn="", contact_uuid=None, client_id="7") == {"urns": ["whatsapp:7"]}


def test_build_flow_start_refuses_what_rapidpro_would_cut() -> None:
    cfg = RapidProConfig(base_url="http://x", flow="f")
    target = {"urns": ["tel:+254700000000"]}
    build_flow_start(cfg, target, {"text": "x" * PART_LIMIT})
    with pytest.raises(ValueError, match="640"):
        build_flow_start(cfg, target, {"text": "x" * (PART_LIMIT + 1)})
    with pytest.raises(ValueError, match="key"):
        build_flow_start(cfg, target, {"bad-key": "x"})
    with pytest.raises(ValueError):
        build_flow_start(cfg, {"urns": []}, {"text": "x"})


def test_params_are_normalized_like_rapidpro(rp: FakeRapidPro) -> None:
    params: dict[str, Any] = {"bad key-é": "y" * 700, "none": None, "nested": {"a.b": [1, "z"]}}
    params.update({f"k{i}": str(i) for i in range(300)})
    resp = post(rp, {"flow": rp.flow, "urns": ["TEL:+254 700-000 000"], "params": params})

    assert resp.status_code == 201, resp.text
    [start] = rp.accepted
    stored = start.body["params"]
    assert start.body["urns"] == ["tel:+254700000000"]
    assert stored["bad_key__"] == "y" * 640
    assert stored["none"] == ""
    assert stored["nested"] == {"a_b": {"0": 1, "1": "z"}}
    values = 6 + sum(1 for k in stored if k.startswith("k"))  # 4 leaves + 2 containers
    assert values == 256
    assert resp.json()["params"] == stored


# --------------------------------------------------------------------------- validation

FLOW = DEFAULT_FLOW
URN = ["tel:+254700000000"]
VALIDATION_CASES: list[tuple[str, Any, dict[str, Any]]] = [
    ("flow missing", {"urns": URN}, {"flow": ["This field is required."]}),
    ("flow unknown", {"flow": CONTACT_UUID, "urns": URN}, {"flow": [f"No such object: {CONTACT_UUID}"]}),
    (
        "no target",
        {"flow": FLOW, "params": {"a": "b"}},
        {"non_field_errors": ["Must specify at least one group, contact or URN"]},
    ),
    (
        "empty target",
        {"flow": FLOW, "urns": [], "contacts": []},
        {"non_field_errors": ["Must specify at least one group, contact or URN"]},
    ),
    (
        "urns not a list",
        {"flow": FLOW, "urns": "tel:+254700000000"},
        {"urns": ['Expected a list of items but got type "str".']},
    ),
    (
        "too many urns",
        {"flow": FLOW, "urns": [f"tel:+2547000{i:05d}" for i in range(101)]},
        {"urns": ["This field can only contain up to 100 items."]},
    ),
    (
        "urn without scheme",
        {"flow": FLOW, "urns": ["tel:+254700000000", "23343411"]},
        {"urns": {"1": ["Invalid URN: 23343411. Ensure phone numbers contain country codes."]}},
    ),
    (
        "urn unknown scheme",
        {"flow": FLOW, "urns": ["pigeon:12"]},
        {"urns": {"0": ["Invalid URN: pigeon:12. Ensure phone numbers contain country codes."]}},
    ),
    (
        "urn empty path",
        {"flow": FLOW, "urns": ["telegram:"]},
        {"urns": {"0": ["Invalid URN: telegram:. Ensure phone numbers contain country codes."]}},
    ),
    ("contact not a uuid", {"flow": FLOW, "contacts": ["abc"]}, {"contacts": ["No such object: abc"]}),
    (
        "params not an object",
        {"flow": FLOW, "urns": URN, "params": "text"},
        {"params": ["Must be a valid JSON object"]},
    ),
    ("extra not an object", {"flow": FLOW, "urns": URN, "extra": [1, 2]}, {"extra": ["Must be a valid JSON object"]}),
    (
        "several fields at once",
        {"urns": "x", "params": 3},
        {
            "flow": ["This field is required."],
            "urns": ['Expected a list of items but got type "str".'],
            "params": ["Must be a valid JSON object"],
        },
    ),
    ("body not an object", [1, 2], {"non_field_errors": ["Request body should be a single JSON object"]}),
]


@pytest.mark.parametrize(
    ("payload", "expected"), [c[1:] for c in VALIDATION_CASES], ids=[c[0] for c in VALIDATION_CASES]
)
def test_validation_errors_match_rapidpro(rp: FakeRapidPro, payload: Any, expected: dict[str, Any]) -> None:
    resp = post(rp, payload)
    assert resp.status_code == 400
    assert resp.json() == expected
    [record] = rp.received
    assert record.status == 400 and record.response == expected
    assert rp.accepted == []


def test_non_json_body_is_a_parse_error(rp: FakeRapidPro) -> None:
    resp = post(rp, raw=b"{not json")
    assert resp.status_code == 400
    assert resp.json()["detail"].startswith("JSON parse error - ")


@pytest.mark.parametrize(
    ("token", "detail"),
    [
        ("wrong", "Invalid token."),
        ("", "Authentication credentials were not provided."),
    ],
)
def test_bad_token_is_401(rp: FakeRapidPro, token: str, detail: str) -> None:
    resp = post(rp, {"flow": rp.flow, "urns": URN}, token=token)
    assert resp.status_code == 401
    assert resp.json() == {"detail": detail}


def test_bad_token_is_dead_for_the_client(rp: FakeRapidPro) -> None:
    cfg = config(rp, token="not-the-token")
    outcome = send(cfg, message_body(cfg))
    assert outcome == Outcome("dead", 'HTTP 401: {"detail":"Invalid token."}', status=401)


# --------------------------------------------------------------------------- splitting


def test_split_text_keeps_every_character_in_order(rp: FakeRapidPro) -> None:
    rng = random.Random(7)
    words = ["a", "helpline", "counselor", "écoute", "🙂", "kwa", "msaada\n", "x" * 30]
    text = ""
    while len(text) < 2000:
        text += rng.choice(words) + rng.choice([" ", " ", "", "\t"])
    text = text[:2000]

    parts = split_text(text)

    assert "".join(parts) == text
    assert len(parts) == 4
    assert all(0 < len(p) <= PART_LIMIT for p in parts)
    assert all(p[-1].isspace() for p in parts[:-1])  # cut at whitespace when possible

    # Sent as ordered events, RapidPro stores every part uncut.
    cfg = config(rp)
    target = contact_target(cfg, contact_urn=None, contact_uuid=None, client_id="1")
    for i, part in enumerate(parts, 1):
        body = build_flow_start(
            cfg, target, {"event": "message", "text": part, "part": str(i), "parts": str(len(parts))}
        )
        assert send(cfg, body).kind == "sent"
    stored = rp.wait_for(len(parts))
    assert [s.params["part"] for s in stored if s.params] == ["1", "2", "3", "4"]
    assert "".join(s.params["text"] for s in stored if s.params) == text


def test_split_text_edge_cases() -> None:
    assert split_text("") == [""]
    assert split_text("short") == ["short"]
    assert split_text("x" * 640) == ["x" * 640]
    solid = "y" * 1500
    assert split_text(solid) == ["y" * 640, "y" * 640, "y" * 220]
    # The only space is far from the window's end: hard split.
    far_space = "a " + "b" * 1000
    assert [len(p) for p in split_text(far_space)] == [640, 362]
    # Never split a letter from its combining accent.
    accented = split_text("e\u0301" * 700, limit=641)
    assert "".join(accented) == "e\u0301" * 700
    assert [len(p) for p in accented] == [640, 640, 120]
    with pytest.raises(ValueError):
        split_text("abc", limit=0)


# --------------------------------------------------------------------------- outcomes


def test_500_is_retry_and_recorded_but_not_accepted(rp: FakeRapidPro) -> None:
    cfg = config(rp)
    rp.fail_next(1, status=500)

    first = send(cfg, message_body(cfg))
    second = send(cfg, message_body(cfg))

    assert first.kind == "retry" and first.status == 500 and first.retry_after is None
    assert first.reason.startswith("HTTP 500: ")
    assert second.kind == "sent"
    assert [r.status for r in rp.received] == [500, 201]
    assert len(rp.accepted) == 1


def test_429_and_503_retry_after_is_honoured(rp: FakeRapidPro) -> None:
    cfg = config(rp)
    rp.fail_next(1, status=429, retry_after=2)
    rp.fail_next(1, status=503, retry_after=0.5)

    throttled = send(cfg, message_body(cfg))
    unavailable = send(cfg, message_body(cfg))

    assert throttled.kind == "retry" and throttled.status == 429
    assert throttled.retry_after == 2.0
    assert "Request was throttled" in throttled.reason
    assert unavailable.kind == "retry" and unavailable.status == 503
    assert unavailable.retry_after == 0.5
    rng = random.Random(1)
    assert all(backoff_delay(1, retry_after=throttled.retry_after, rng=rng) >= 2.0 for _ in range(50))
    assert rp.received[0].headers["authorization"] == f"Token {rp.token}"
    assert rp.accepted == []


def test_400_is_dead_with_reason(rp: FakeRapidPro) -> None:
    cfg = config(rp)
    body = message_body(cfg)
    body["urns"] = ["not-a-urn"]

    outcome = send(cfg, body)

    assert outcome.kind == "dead" and outcome.status == 400
    assert outcome.reason == (
        'HTTP 400: {"urns":{"0":["Invalid URN: not-a-urn. Ensure phone numbers contain country codes."]}}'
    )


def test_dead_reason_is_cut_to_500_characters(rp: FakeRapidPro) -> None:
    cfg = config(rp)
    rp.fail_next(1, status=422, body="z" * 2000)
    outcome = send(cfg, message_body(cfg))
    assert outcome.kind == "dead"
    assert outcome.reason == "HTTP 422: " + "z" * 500


def test_connection_refused_is_retry_and_come_back_reuses_the_port(rp: FakeRapidPro) -> None:
    cfg = config(rp)
    url = rp.url
    rp.go_down()
    try:
        assert not any(t.name.startswith("fake-rapidpro") for t in threading.enumerate())
        outcome = send(cfg, message_body(cfg))
        assert outcome.kind == "retry" and outcome.status is None
        assert outcome.reason.startswith("ConnectError")
    finally:
        rp.come_back()
    assert rp.url == url
    assert send(cfg, message_body(cfg)).kind == "sent"
    assert len(rp.accepted) == 1


def test_timeout_is_retry_and_the_late_start_is_still_recorded(rp: FakeRapidPro) -> None:
    cfg = config(rp, timeout_s=0.2)
    rp.set_delay(0.6)
    started = time.monotonic()

    outcome = send(cfg, message_body(cfg))

    assert time.monotonic() - started < 0.55
    assert outcome.kind == "retry" and outcome.status is None
    assert outcome.reason.startswith("ReadTimeout")
    # Like a real server that committed the start but answered too late: a duplicate risk.
    [late] = rp.wait_for(1, timeout=3)
    assert late.answered_at - late.at >= 0.55


def test_bad_base_url_is_dead() -> None:
    cfg = RapidProConfig(base_url="ftp://example.invalid", token="t", flow="f")
    outcome = send(cfg, {"flow": "f", "urns": ["tel:+1"]})
    assert outcome.kind == "dead" and "bad RapidPro URL" in outcome.reason


def test_wait_for_times_out_helpfully(rp: FakeRapidPro) -> None:
    post(rp, {"urns": URN})
    with pytest.raises(TimeoutError, match=r"0 accepted of 1 received \(last statuses: 400\)"):
        rp.wait_for(1, timeout=0.05)


# --------------------------------------------------------------------------- backoff


def test_backoff_delay_bounds() -> None:
    rng = random.Random(42)
    for attempt, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (5, 8.0), (8, 60.0), (500, 60.0)]:
        delays = [backoff_delay(attempt, rng=rng) for _ in range(200)]
        assert all(0.0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling * 0.8  # full jitter reaches near the ceiling
    assert all(backoff_delay(1, retry_after=30.0, rng=rng) >= 30.0 for _ in range(20))
    assert backoff_delay(0, base=1.0, cap=5.0, rng=rng) <= 1.0
    assert backoff_delay(3, base=1.0, cap=3.0, rng=rng) <= 3.0


def test_parse_retry_after() -> None:
    now = time.time()
    assert parse_retry_after(None) is None
    assert parse_retry_after("") is None
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after("-5") is None
    later = email.utils.formatdate(now + 30, usegmt=True)
    value = parse_retry_after(later, now=now)
    assert value is not None and 28.0 <= value <= 31.0
    assert parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now=now) == 0.0
