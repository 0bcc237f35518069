"""Sites: one helpline per country, loaded from a TOML file (``HELPLINE_SITES``)."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from helpline.config.hours import BusinessHours

Strategy = Literal["ringall", "leastrecent", "fewestchats", "roundrobin", "random"]


class RapidProConfig(BaseModel):
    """Where a site's outbound events go: ``{base_url}/api/v2/flow_starts.json``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: str
    token: str = ""
    token_env: str | None = None
    flow: str
    urn_scheme: str = "tel"
    params_field: Literal["params", "extra"] = "params"
    timeout_s: float = 10.0

    @model_validator(mode="after")
    def _token_from_env(self) -> RapidProConfig:
        if not self.token and self.token_env:
            object.__setattr__(self, "token", os.environ.get(self.token_env, ""))
        return self

    @property
    def flow_starts_url(self) -> str:
        return self.base_url.rstrip("/") + "/api/v2/flow_starts.json"


class AsteriskConfig(BaseModel):
    """A site's Asterisk queue, over AMI: "Join queue" adds the counselor, pause and leave follow, and a
    counselor whose phone is busy (or paused in Asterisk) gets no chat offers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(5038, gt=0, lt=65536)
    username: str
    secret: str = Field("", repr=False)
    secret_env: str | None = None
    queue: str = Field(min_length=1)
    # A counselor's queue interface, from their extension: "PJSIP/{extension}",
    # "Local/{extension}@from-queue/n", ...
    interface: str = "PJSIP/{extension}"
    timeout_s: float = Field(5.0, gt=0)  # connect, login and each action
    reconnect_min_s: float = Field(1.0, gt=0)  # backoff after a lost connection: doubles up to max
    reconnect_max_s: float = Field(30.0, gt=0)
    resync_s: float = Field(60.0, gt=0)  # re-read the queue (QueueStatus) and repair membership
    ping_s: int = Field(10, ge=1)

    @model_validator(mode="after")
    def _check(self) -> AsteriskConfig:
        if not self.secret and self.secret_env:
            object.__setattr__(self, "secret", os.environ.get(self.secret_env, ""))
        if "{extension}" not in self.interface:
            raise ValueError("asterisk.interface must contain {extension}")
        try:
            self.interface.format(extension="1")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"asterisk.interface: only {{extension}} may be substituted ({exc})") from exc
        if any(c in self.queue + self.interface + self.username for c in "\r\n"):
            raise ValueError("asterisk settings may not contain line breaks")
        return self

    def interface_for(self, extension: str) -> str:
        return self.interface.format(extension=extension)


class RoutingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    strategy: Strategy = "ringall"
    offer_timeout_s: float = Field(30.0, gt=0)
    retry_gap_s: float = Field(2.0, ge=0)
    max_chats_per_counselor: int = Field(3, ge=1)
    autopause_on_no_answer: bool = True
    wrapup_s: float = Field(0.0, ge=0)
    # Client notices and overflow (see domain/notices.py and routing/overflow.py).
    position_notice_s: float = Field(0.0, ge=0)  # 0: no position updates
    max_wait_s: float = Field(0.0, ge=0)  # 0: overflow only when nobody is logged in
    overflow_site: str | None = None
    max_overflow_depth: int = Field(2, ge=0)

    @model_validator(mode="after")
    def _overflow(self) -> RoutingConfig:
        if self.max_wait_s > 0 and not self.overflow_site:
            raise ValueError("max_wait_s needs an overflow_site to move the conversation to")
        return self


class SafetyConfig(BaseModel):
    """The safety net (domain/safety.py): nobody waits unanswered without someone knowing.

    Besides the fields, ``fallback_text_<lang>`` keys give the fallback in other languages
    (``fallback_text_sw = "..."``); ``{emergency_numbers}`` in a fallback text is replaced by the
    numbers, comma-separated.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    max_wait_s: float = Field(120.0, ge=0)  # still queued after this: one fallback + an alert (0: off)
    max_wait_high_s: float = Field(60.0, ge=0)  # the same for risk high (0: off)
    reply_within_s: float = Field(180.0, ge=0)  # the child waits for a reply: nudge at 1x, alert at 2x (0: off)
    emergency_numbers: list[str] = Field(default_factory=lambda: ["116"])
    fallback_text: str = Field(
        "We are sorry you are still waiting. A counselor will answer you as soon as possible. "
        "If you are in danger now, call {emergency_numbers}.",
        min_length=1,
        max_length=640,
    )
    language: str = Field("en", pattern=r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})?$")  # the site's default language
    alert_webhook: str | None = Field(None, pattern=r"^https?://")  # alerts POSTed here (signed, via the outbox)
    alert_webhook_secret: str = Field("", repr=False)
    alert_webhook_secret_env: str | None = None

    @model_validator(mode="after")
    def _extras(self) -> SafetyConfig:
        for key, value in (self.model_extra or {}).items():
            if not key.startswith("fallback_text_") or len(key) <= len("fallback_text_"):
                raise ValueError(f"unknown setting {key!r} (only fallback_text_<language> may be added)")
            if not isinstance(value, str) or not 0 < len(value) <= 640:
                raise ValueError(f"{key} must be a text of 1 to 640 characters")
        if not self.alert_webhook_secret and self.alert_webhook_secret_env:
            object.__setattr__(self, "alert_webhook_secret", os.environ.get(self.alert_webhook_secret_env, ""))
        return self

    def max_wait_for(self, risk: str) -> float:
        """Seconds a conversation of ``risk`` may wait in the queue (0: no limit)."""
        return self.max_wait_high_s if risk == "high" else self.max_wait_s

    def fallback_for(self, language: str | None) -> str:
        """The fallback text in ``language`` (``sw``, or ``sw-KE`` falling back to ``sw``), else the default."""
        extra = self.model_extra or {}
        for lang in [language, language.split("-")[0]] if language else []:
            text = extra.get(f"fallback_text_{lang.lower()}")
            if isinstance(text, str):
                return self._fill(text)
        return self._fill(self.fallback_text)

    def _fill(self, text: str) -> str:
        return text.replace("{emergency_numbers}", ", ".join(self.emergency_numbers))


class Site(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    slug: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$")
    name: str
    countries: list[str] = Field(default_factory=list)
    timezone: str = "UTC"
    default: bool = False
    rapidpro: RapidProConfig
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    hours: BusinessHours = Field(default_factory=BusinessHours)
    safety: SafetyConfig = Field(default_factory=SafetyConfig)
    asterisk: AsteriskConfig | None = None  # optional: mirror presence into an Asterisk queue
    # A handover that says no ``risk``: the chatbot hands over the cases it judges high-risk.
    default_risk: Literal["low", "medium", "high"] = "high"
    # RapidPro retries a webhook on a timeout without a message_id: a message with no message_id (nor
    # Idempotency-Key) whose text equals its session's previous message within this many seconds is
    # that message again (200, "duplicate": true, nothing stored). 0: every such message is stored.
    dedupe_window_s: float = Field(30.0, ge=0)

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {value!r}") from exc
        return value

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


class SiteRegistry:
    """The configured sites, looked up by slug or country."""

    def __init__(self, sites: list[Site]) -> None:
        if not sites:
            raise ValueError("at least one site must be configured")
        self._by_slug = {s.slug: s for s in sites}
        if len(self._by_slug) != len(sites):
            raise ValueError("site slugs must be unique")
        defaults = [s for s in sites if s.default]
        if len(defaults) > 1:
            raise ValueError("at most one site may be the default")
        self.default = defaults[0] if defaults else sites[0]
        for s in sites:
            target = s.routing.overflow_site
            if target is not None and (target == s.slug or target not in self._by_slug):
                raise ValueError(f"site {s.slug!r}: overflow_site {target!r} must be another configured site")
        self._by_country: dict[str, Site] = {}
        for s in sites:
            for c in s.countries:
                self._by_country[c.upper()] = s

    def __iter__(self) -> Iterator[Site]:
        return iter(self._by_slug.values())

    def get(self, slug: str) -> Site | None:
        return self._by_slug.get(slug)

    def by_country(self, country: str) -> Site | None:
        return self._by_country.get(country.strip().upper())

    def choose(self, *, path_slug: str | None, location: str | None, home: str | None = None) -> Site | None:
        """The per-site path wins, then the ``location`` country, then ``home`` (the caller's own
        site, if it has one), then the default site.

        Returns ``None`` for an unknown path slug; an unknown country falls back to home or default.
        """
        if path_slug is not None:
            return self.get(path_slug)
        if location:
            found = self.by_country(location)
            if found is not None:
                return found
        return (self.get(home) if home else None) or self.default

    @classmethod
    def from_toml(cls, path: str | Path) -> SiteRegistry:
        """The sites of a TOML file; a file that is missing or wrong raises :class:`SitesFileError`,
        whose message says, in one line, what is wrong and where (file, line or site)."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise SitesFileError(
                f"no sites file at {str(path)!r}: write one with `helpline init`, or give its path "
                "with --sites or HELPLINE_SITES (example: sites.example.toml)"
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise SitesFileError(f"cannot read the sites file {str(path)!r}: {exc}") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise SitesFileError(f"{path}: not valid TOML: {exc}") from None
        entries = data.get("site", [])
        if not isinstance(entries, list):
            raise SitesFileError(f"{path}: each site is a [[site]] table (double brackets)")
        sites: list[Site] = []
        for i, entry in enumerate(entries, start=1):
            try:
                sites.append(Site.model_validate(entry))
            except ValidationError as exc:
                raise SitesFileError(f"{path}: {_first_problem(i, entry, exc)}") from None
        try:
            return cls(sites)
        except ValueError as exc:
            raise SitesFileError(f"{path}: {exc}") from None


class SitesFileError(ValueError):
    """The sites file is missing or wrong; the message is one line, fit to show to its author."""


def _first_problem(i: int, entry: object, exc: ValidationError) -> str:
    """``site 'ke' (#1): rapidpro.flow: Field required (and 1 more problem)``."""
    slug = entry.get("slug") if isinstance(entry, dict) else None
    which = f"site {slug!r} (#{i})" if isinstance(slug, str) else f"site #{i}"
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "(the table)"
    more = exc.error_count() - 1
    tail = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return f"{which}: {where}: {first['msg']}{tail}"
