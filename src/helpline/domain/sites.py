"""Sites: one helpline per country, loaded from a TOML file (``HELPLINE_SITES``)."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

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


class RoutingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    strategy: Strategy = "ringall"
    offer_timeout_s: float = Field(30.0, gt=0)
    retry_gap_s: float = Field(2.0, ge=0)
    max_chats_per_counselor: int = Field(3, ge=1)
    autopause_on_no_answer: bool = True
    wrapup_s: float = Field(0.0, ge=0)


class Site(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    slug: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,31}$")
    name: str
    countries: list[str] = Field(default_factory=list)
    timezone: str = "UTC"
    default: bool = False
    rapidpro: RapidProConfig
    routing: RoutingConfig = Field(default_factory=RoutingConfig)


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
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        return cls([Site.model_validate(s) for s in data.get("site", [])])
