"""Business hours: the pure computation (open now? next opening?) across weekends, holidays, time
zones and daylight saving; then, end to end, the out-of-hours notice and the hunt once it opens."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from pydantic import ValidationError

from conftest import Env
from helpline.config.hours import BusinessHours, is_open, local_iso, next_open, open_since, parse_interval
from helpline.config.sites import Site, SiteRegistry
from helpline.testing.fake_rapidpro import FakeRapidPro
from routing_support import (
    assert_params_valid,
    cheap_passwords,  # noqa: F401  (autouse)
    events_of,
    notices,
    offer_for,
    site_toml,
    ts,
    wait_notice,
)
from support import assert_no_event

NAIROBI = ZoneInfo("Africa/Nairobi")  # UTC+3, no daylight saving
NEW_YORK = ZoneInfo("America/New_York")  # UTC-5, UTC-4 from 2026-03-08
TOKYO = ZoneInfo("Asia/Tokyo")  # UTC+9

OFFICE = {d: ["08:00-17:00"] for d in ("mon", "tue", "wed", "thu", "fri")}


def hours(**kw: Any) -> BusinessHours:
    return BusinessHours.model_validate(kw)


def at(tz: ZoneInfo, year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> float:
    return datetime(year, month, day, hour, minute, second, tzinfo=tz).timestamp()


# --------------------------------------------------------------------------- configuration


def test_intervals_parse_with_overnight_and_midnight_ends() -> None:
    assert parse_interval("08:00-17:00") == (8 * 3600, 17 * 3600)
    assert parse_interval("8:30-12:00:30") == (8 * 3600 + 1800, 12 * 3600 + 30)
    assert parse_interval("00:00-24:00") == (0, 86400)
    assert parse_interval("20:00-02:00") == (20 * 3600, 26 * 3600)  # into the next day
    for bad in ("08:00", "25:00-26:00", "08:60-09:00", "24:00-02:00", "24:30-01:00", "10:00-10:00", "8-17"):
        with pytest.raises(ValueError):
            parse_interval(bad)


def test_hours_validation() -> None:
    assert hours().is_always
    assert hours(always=True).is_always
    assert not hours(mon=["08:00-17:00"]).is_always
    bad: dict[str, Any]
    for bad in (
        {"always": True, "mon": ["08:00-17:00"]},  # both
        {"always": False},  # closed for ever
        {"mon": [], "sat": []},  # never open either
        {"mon": ["8am-5pm"]},
        {"mon": ["08:00-17:00"], "funday": ["08:00-17:00"]},
        {"holidays": ["not a date"]},
    ):
        with pytest.raises(ValidationError):
            hours(**bad)
    assert hours(mon=["08:00-17:00"], holidays=["2026-12-25", date(2026, 12, 26)]).holidays == (
        date(2026, 12, 25),
        date(2026, 12, 26),
    )


def test_a_site_needs_a_known_time_zone() -> None:
    base = {"slug": "ke", "name": "Kenya", "rapidpro": {"base_url": "http://rp", "flow": "f"}}
    assert Site.model_validate(base | {"timezone": "Africa/Nairobi"}).zone == NAIROBI
    with pytest.raises(ValidationError, match="unknown time zone"):
        Site.model_validate(base | {"timezone": "Mars/Olympus_Mons"})


# --------------------------------------------------------------------------- open and next opening


def test_next_opening_across_a_weekend() -> None:
    h = hours(**OFFICE, sat=[])
    friday_evening = at(NAIROBI, 2026, 1, 2, 17, 30)  # a Friday
    assert not is_open(h, NAIROBI, friday_evening)
    opens = next_open(h, NAIROBI, friday_evening)
    assert opens == at(NAIROBI, 2026, 1, 5, 8, 0)  # Monday 08:00 in Nairobi ...
    assert opens == datetime(2026, 1, 5, 5, 0, tzinfo=UTC).timestamp()  # ... 05:00 UTC
    assert local_iso(opens, NAIROBI) == "2026-01-05T08:00:00+03:00"
    assert next_open(h, NAIROBI, at(NAIROBI, 2026, 1, 3, 12, 0)) == opens  # Saturday noon
    # The start is in, the end is out.
    assert is_open(h, NAIROBI, at(NAIROBI, 2026, 1, 5, 8, 0))
    assert not is_open(h, NAIROBI, at(NAIROBI, 2026, 1, 5, 17, 0))
    assert is_open(h, NAIROBI, at(NAIROBI, 2026, 1, 5, 16, 59, 59))
    assert next_open(h, NAIROBI, at(NAIROBI, 2026, 1, 5, 12, 0)) == at(NAIROBI, 2026, 1, 5, 12, 0)  # open: now
    assert open_since(h, NAIROBI, at(NAIROBI, 2026, 1, 5, 12, 0)) == at(NAIROBI, 2026, 1, 5, 8, 0)
    assert open_since(h, NAIROBI, friday_evening) is None


def test_the_same_hours_in_different_time_zones() -> None:
    h = hours(**OFFICE)
    instant = datetime(2026, 1, 6, 13, 30, tzinfo=UTC).timestamp()  # Tuesday 13:30 UTC
    assert is_open(h, NAIROBI, instant)  # 16:30 in Nairobi
    assert not is_open(h, TOKYO, instant)  # 22:30 in Tokyo
    assert is_open(h, NEW_YORK, instant)  # 08:30 in New York
    assert not is_open(h, NAIROBI, instant + 1800)  # 17:00 in Nairobi: the end is out
    assert next_open(h, TOKYO, instant) == datetime(2026, 1, 6, 23, 0, tzinfo=UTC).timestamp()  # Wed 08:00 JST
    assert local_iso(next_open(h, TOKYO, instant) or 0, TOKYO) == "2026-01-07T08:00:00+09:00"


def test_next_opening_over_a_daylight_saving_change() -> None:
    h = hours(**OFFICE)
    friday = at(NEW_YORK, 2026, 3, 6, 18, 0)  # EST (UTC-5); clocks go forward on Sunday 8 March
    opens = next_open(h, NEW_YORK, friday)
    assert opens == datetime(2026, 3, 9, 12, 0, tzinfo=UTC).timestamp()  # 08:00 EDT, not 13:00 UTC
    assert local_iso(opens or 0, NEW_YORK) == "2026-03-09T08:00:00-04:00"
    assert (
        next_open(h, NEW_YORK, at(NEW_YORK, 2026, 3, 5, 18, 0)) == datetime(2026, 3, 6, 13, 0, tzinfo=UTC).timestamp()
    )


def test_holidays_close_whole_local_days_even_overnight_ones() -> None:
    h = hours(**OFFICE, holidays=["2026-01-05"])  # Monday
    assert next_open(h, NAIROBI, at(NAIROBI, 2026, 1, 2, 18, 0)) == at(NAIROBI, 2026, 1, 6, 8, 0)
    night = hours(fri=["20:00-02:00"], holidays=["2026-01-03"])  # Friday night into a Saturday holiday
    assert is_open(night, NAIROBI, at(NAIROBI, 2026, 1, 2, 23, 0))
    assert not is_open(night, NAIROBI, at(NAIROBI, 2026, 1, 3, 1, 0))
    assert open_since(night, NAIROBI, at(NAIROBI, 2026, 1, 2, 23, 0)) == at(NAIROBI, 2026, 1, 2, 20, 0)
    assert next_open(night, NAIROBI, at(NAIROBI, 2026, 1, 3, 1, 0)) == at(NAIROBI, 2026, 1, 9, 20, 0)


def test_always_open_unless_a_holiday() -> None:
    h = hours()
    t = at(NAIROBI, 2026, 1, 3, 3, 0)
    assert is_open(h, NAIROBI, t) and next_open(h, NAIROBI, t) == t
    assert open_since(h, NAIROBI, t) == -math.inf
    xmas = hours(always=True, holidays=["2026-12-25"])
    assert not is_open(xmas, NAIROBI, at(NAIROBI, 2026, 12, 25, 12, 0))
    assert next_open(xmas, NAIROBI, at(NAIROBI, 2026, 12, 25, 12, 0)) == at(NAIROBI, 2026, 12, 26, 0, 0)
    assert open_since(xmas, NAIROBI, at(NAIROBI, 2026, 12, 26, 9, 0)) == at(NAIROBI, 2026, 12, 26, 0, 0)


# --------------------------------------------------------------------------- end to end


def noon_zone() -> tuple[str, ZoneInfo]:
    """A fixed-offset zone where it is around noon now: an interval starting in a few seconds and
    running 23 hours is then the only opening near now, whatever the time of day of the test."""
    offset = 12 - datetime.now(UTC).hour  # -11 .. 12
    name = "Etc/GMT" if offset == 0 else f"Etc/GMT{-offset:+d}"  # Etc/GMT-3 is UTC+3
    return name, ZoneInfo(name)


def test_a_closed_site_tells_the_client_when_it_opens_and_does_not_hunt_or_overflow(
    make_env: Callable[..., Env],
) -> None:
    zone = ZoneInfo("Africa/Dar_es_Salaam")
    today = datetime.now(zone).date()
    days = [today + timedelta(days=d) for d in (-1, 0, 1)]  # closed around now, whatever the hour
    env = make_env(
        offer_timeout_s=5,
        extra=f"""
overflow_site = "ke"
[site.hours]
mon = ["00:00-24:00"]
tue = ["00:00-24:00"]
wed = ["00:00-24:00"]
thu = ["00:00-24:00"]
fri = ["00:00-24:00"]
sat = ["00:00-24:00"]
sun = ["00:00-24:00"]
holidays = {[d.isoformat() for d in days]!r}
""".replace("'", '"'),
    )
    bot = env.chatbot()
    zawadi = env.counselor("zawadi", site="tz", name="Zawadi")  # in the queue, but the site is closed
    amina = env.counselor("amina", site="ke", name="Amina", join=False)
    assert amina.presence("paused", "lunch").status_code == 200  # ke is staffed: an overflow could go there

    for i, risk in enumerate(("low", "high")):
        r = bot.send(f"closed-{i}", "hello?", location="TZ", risk=risk, contact_urn=f"whatsapp:25570000{i}")
        assert r.status_code == 201 and r.json()["delivery"] == "queued", r.text
    opens = datetime.combine(days[-1] + timedelta(days=1), datetime.min.time(), zone).isoformat()
    first = wait_notice(env.rapidpro, "closed-0", "out_of_hours")
    assert first == {
        "event": "out_of_hours",
        "conversation_id": "closed-0",
        "next_open": opens,
        "position": "1",
        "site": "C-Sema Tanzania",
    }
    assert wait_notice(env.rapidpro, "closed-1", "out_of_hours")["position"] == "1"  # high risk: ahead
    start = next(s for s in env.rapidpro.accepted if (s.params or {}).get("conversation_id") == "closed-0")
    assert "extra" in start.body and start.urns == ["whatsapp:255700000"]  # the tz site's RapidPro

    # Nobody is offered anything; with nobody logged in, still nothing overflows (closed is closed).
    assert_no_event(zawadi, "offer", within=0.6)
    assert zawadi.presence("offline").status_code == 200
    assert_no_event(amina, "offer", within=0.8)
    # The chatbot sees them queued; each was told once.
    for session in ("closed-0", "closed-1"):
        assert events_of(env.rapidpro, session) == ["out_of_hours"]
        assert bot.chats(chat_session=session).json()["results"][0]["status"] == "queued"
    assert_params_valid(env.rapidpro)

    # A transfer to the closed site is refused.
    bot.send("ke-1", "hi", location="KE")
    assert amina.join_queue().status_code == 200
    offer = offer_for(amina, "ke-1")
    assert amina.read_offer(offer["id"]).status_code == 200
    r = amina.http.post(f"/api/conversations/{offer['conversation']['id']}/transfer/", json={"site": "tz"})
    assert r.status_code == 409 and opens in r.json()["error"]["message"], r.text


def test_conversations_wait_for_the_opening_then_are_queued_and_hunted(
    make_env: Callable[..., Env], rapidpro: FakeRapidPro
) -> None:
    zone_name, zone = noon_zone()
    opening = math.ceil(time.time()) + 2.0
    start = datetime.fromtimestamp(opening, zone)
    end = start + timedelta(hours=23)  # past midnight: yesterday's opening ended an hour ago
    interval = f"{start:%H:%M:%S}-{end:%H:%M:%S}"
    week = "".join(f'{d} = ["{interval}"]\n' for d in ("mon", "tue", "wed", "thu", "fri", "sat", "sun"))
    env = make_env(
        offer_timeout_s=5,
        extra=site_toml(rapidpro, "ug", name="Sauti Uganda", countries=("UG",), timezone=zone_name, hours=week),
    )
    assert SiteRegistry.from_toml(env.server.settings.sites).get("ug") is not None
    bot = env.chatbot()
    okello = env.counselor("okello", site="ug", name="Okello")
    assert bot.send("dawn", "is anyone there", location="UG").status_code == 201

    told = wait_notice(env.rapidpro, "dawn", "out_of_hours")
    assert told["next_open"] == start.isoformat(timespec="seconds")
    assert told["site"] == "Sauti Uganda" and told["position"] == "1"
    assert time.time() < opening, "the test machine was too slow for this opening time"
    assert_no_event(okello, "offer", within=max(0.0, opening - time.time() - 0.2))

    offer = offer_for(okello, "dawn", timeout=5)
    assert ts(offer["created_at"]) >= opening
    assert ts(offer["created_at"]) < opening + 1.0  # the hunter woke at the opening, not by chance
    queued = wait_notice(env.rapidpro, "dawn", "queued")
    assert queued == {
        "event": "queued",
        "conversation_id": "dawn",
        "position": "1",
        "estimated_wait_s": "60",
        "site": "Sauti Uganda",
    }
    assert okello.read_offer(offer["id"]).status_code == 200
    wait_notice(env.rapidpro, "dawn", "assigned")
    assert events_of(env.rapidpro, "dawn")[:3] == ["out_of_hours", "queued", "assigned"]
    assert [p["event"] for p in notices(env.rapidpro, "dawn")].count("out_of_hours") == 1
