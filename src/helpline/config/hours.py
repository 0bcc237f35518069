"""Business hours: when a site is open, in the site's own time zone (``[site.hours]``).

A week of opening intervals per weekday plus holidays (whole local days closed), or ``always``.
Everything here is a pure function of the configuration, a ``ZoneInfo`` and a time in UTC epoch
seconds (the store's time format); wall-clock arithmetic is done in the site's zone, so daylight
saving changes and zones far from UTC need no special care from callers::

    [site.hours]
    mon = ["08:00-17:00"]
    tue = ["08:00-12:30", "13:30-17:00"]
    fri = ["20:00-02:00"]            # overnight: Friday 20:00 to Saturday 02:00
    sat = []
    holidays = ["2026-12-25", 2026-12-26]
"""

from __future__ import annotations

import math
import re
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
DAY_S = 86400
_TIME = re.compile(r"^(\d{1,2}):(\d{2})(?::(\d{2}))?$")
_SEARCH_DAYS = 14  # how far one window of next_open looks ahead
_HORIZON_DAYS = 800  # next_open gives up after this: a site that never opens again

Interval = tuple[float, float]  # [start, end) in epoch seconds


def _seconds(text: str, *, end: bool) -> int:
    m = _TIME.match(text.strip())
    if m is None:
        raise ValueError(f"{text!r} is not a time (HH:MM or HH:MM:SS)")
    h, mi, s = int(m[1]), int(m[2]), int(m[3] or 0)
    if mi > 59 or s > 59 or h > 24 or (h == 24 and (mi or s)) or (h == 24 and not end):
        raise ValueError(f"{text!r} is not a time of day")
    return h * 3600 + mi * 60 + s


def parse_interval(text: str) -> tuple[int, int]:
    """``"08:00-17:00"`` -> seconds after local midnight; an end before the start runs past midnight."""
    start_s, sep, end_s = text.partition("-")
    if not sep:
        raise ValueError(f"{text!r} is not an interval (HH:MM-HH:MM)")
    start, end = _seconds(start_s, end=False), _seconds(end_s, end=True)
    if start == end:
        raise ValueError(f"{text!r} is empty")
    return (start, end) if end > start else (start, end + DAY_S)


class BusinessHours(BaseModel):
    """``always = true`` (the default when no day is listed), or per-weekday opening intervals.

    A weekday that is not listed is closed. A holiday closes its whole local day, including the
    part of an overnight interval that began the evening before.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    always: bool | None = None
    mon: tuple[str, ...] | None = None
    tue: tuple[str, ...] | None = None
    wed: tuple[str, ...] | None = None
    thu: tuple[str, ...] | None = None
    fri: tuple[str, ...] | None = None
    sat: tuple[str, ...] | None = None
    sun: tuple[str, ...] | None = None
    holidays: tuple[date, ...] = Field(default_factory=tuple)

    _week: tuple[tuple[tuple[int, int], ...], ...] = PrivateAttr(default=())

    @model_validator(mode="after")
    def _check(self) -> BusinessHours:
        listed = [getattr(self, d) for d in DAYS]
        given = any(x is not None for x in listed)
        if self.always and given:
            raise ValueError("give either always = true or weekday hours, not both")
        if self.always is False and not given:
            raise ValueError('always = false needs weekday hours (e.g. mon = ["08:00-17:00"])')
        if given:
            week = tuple(tuple(parse_interval(i) for i in (x or ())) for x in listed)
            if not any(week):
                raise ValueError("the site is never open: list at least one opening interval")
        else:
            week = (((0, DAY_S),),) * 7
        self._week = week
        return self

    @property
    def is_always(self) -> bool:
        return not any(getattr(self, d) is not None for d in DAYS)

    def week(self) -> tuple[tuple[tuple[int, int], ...], ...]:
        """Per weekday (Monday first), the opening intervals in seconds after local midnight."""
        return self._week


def _at(day: date, seconds: int, tz: ZoneInfo) -> float:
    """Epoch seconds of ``seconds`` after local midnight of ``day`` (may run into the next days)."""
    d = day + timedelta(days=seconds // DAY_S)
    s = seconds % DAY_S
    return datetime(d.year, d.month, d.day, s // 3600, s % 3600 // 60, s % 60, tzinfo=tz).timestamp()


def _local_date(t: float, tz: ZoneInfo) -> date:
    return datetime.fromtimestamp(t, tz).date()


def _subtract(spans: list[Interval], cut: Interval) -> list[Interval]:
    out: list[Interval] = []
    for s, e in spans:
        if e <= cut[0] or s >= cut[1]:
            out.append((s, e))
            continue
        if s < cut[0]:
            out.append((s, cut[0]))
        if e > cut[1]:
            out.append((cut[1], e))
    return out


def intervals(hours: BusinessHours, tz: ZoneInfo, first: date, last: date) -> list[Interval]:
    """Opening intervals of the intervals starting on local days ``first``..``last``: holidays cut
    out, sorted, overlapping or touching ones merged."""
    spans: list[Interval] = []
    day = first
    week = hours.week()
    while day <= last:
        spans += [(_at(day, s, tz), _at(day, e, tz)) for s, e in week[day.weekday()]]
        day += timedelta(days=1)
    for h in hours.holidays:
        if first - timedelta(days=1) <= h <= last + timedelta(days=1):
            spans = _subtract(spans, (_at(h, 0, tz), _at(h, DAY_S, tz)))
    merged: list[Interval] = []
    for s, e in sorted(x for x in spans if x[1] > x[0]):
        if merged and s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], e))
        else:
            merged.append((s, e))
    return merged


def open_since(hours: BusinessHours, tz: ZoneInfo, t: float) -> float | None:
    """When the opening that ``t`` falls in began (``-inf``: always open); ``None`` when closed."""
    if hours.is_always and not hours.holidays:
        return -math.inf
    today = _local_date(t, tz)
    for s, e in intervals(hours, tz, today - timedelta(days=8), today):
        if s <= t < e:
            return s
    return None


def is_open(hours: BusinessHours, tz: ZoneInfo, t: float) -> bool:
    return open_since(hours, tz, t) is not None


def next_open(hours: BusinessHours, tz: ZoneInfo, t: float) -> float | None:
    """``t`` when open, else when the site opens next; ``None`` if it never opens again."""
    if is_open(hours, tz, t):
        return t
    start = _local_date(t, tz) - timedelta(days=1)
    for _ in range(0, _HORIZON_DAYS, _SEARCH_DAYS):
        for s, _e in intervals(hours, tz, start, start + timedelta(days=_SEARCH_DAYS)):
            if s > t:
                return s
        start += timedelta(days=_SEARCH_DAYS)
    return None


def local_iso(t: float, tz: ZoneInfo) -> str:
    """``2026-01-05T08:00:00+03:00``: a time as the site's clocks show it."""
    return datetime.fromtimestamp(t, tz).isoformat(timespec="seconds")
