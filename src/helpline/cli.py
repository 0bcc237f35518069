"""``helpline``: init, serve, work, migrate, createuser, issuetoken, signing-secret, purge, demo.

Every error a user can cause (no sites file, a wrong one, a bad database URL, a database that does
not answer, an unknown site or user) ends in one line on stderr that says what to do, and exit code
2; ``helpline --debug COMMAND`` shows the traceback instead.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, ParamSpec, TypeVar

import structlog
import typer
from pydantic import ValidationError
from rich.console import Console
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError

from helpline.config.settings import Settings
from helpline.config.sites import SiteRegistry, SitesFileError
from helpline.domain.auth import Role, create_user, issue_service_token, new_signing_secret, set_signing_secret
from helpline.domain.errors import DomainError
from helpline.domain.views import iso
from helpline.runtime.core import Core
from helpline.store.db import is_sqlite
from helpline.store.migrate import upgrade

app = typer.Typer(
    help="helpline: the chatbot <-> child-helpline bridge", no_args_is_help=True, pretty_exceptions_enable=False
)
console = Console()
P = ParamSpec("P")
T = TypeVar("T")
_debug = False


class UserError(Exception):
    """An error the user can fix; its message is the one line that says how."""


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="on an error, show its traceback")] = False) -> None:
    global _debug
    _debug = debug


def _explain(exc: BaseException) -> str | None:
    """The one line for an error a user can cause; None for anything else (a bug: its traceback)."""
    if isinstance(exc, UserError | SitesFileError):
        return str(exc)
    if isinstance(exc, DomainError):
        return exc.message
    if isinstance(exc, ValidationError) and exc.title == "Settings":
        first = exc.errors()[0]
        name = "HELPLINE_" + "_".join(str(part) for part in first["loc"]).upper()
        return f"{name}: {first['msg']} (got {first.get('input')!r})"
    return None


def friendly(command: Callable[P, T]) -> Callable[P, T]:
    """Turn the errors a user can cause into one line on stderr and exit code 2."""

    @functools.wraps(command)
    def run(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return command(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except Exception as exc:
            line = _explain(exc)
            if line is None or _debug:
                raise
            typer.echo(f"error: {line}", err=True)
            raise typer.Exit(2) from None

    return run


def _shown_url(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "(not a URL)"


DRIVERS = {"sqlite": "sqlite+aiosqlite", "postgresql": "postgresql+asyncpg", "postgres": "postgresql+asyncpg"}


def check_database_url(url: str) -> None:
    """A URL of one of the two stores helpline runs on, with its async driver; else a UserError."""
    usable = "give sqlite+aiosqlite:///./helpline.db or postgresql+asyncpg://USER@HOST:5432/DATABASE"
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise UserError(f"HELPLINE_DATABASE_URL is not a database URL: {usable}") from None
    if parsed.drivername in DRIVERS.values():
        return
    backend = parsed.get_backend_name()
    if backend in DRIVERS:
        fixed = parsed.set(drivername=DRIVERS[backend]).render_as_string(hide_password=True)
        raise UserError(f"HELPLINE_DATABASE_URL needs the async driver: {fixed!r}")
    raise UserError(f"HELPLINE_DATABASE_URL: helpline runs on SQLite or PostgreSQL, not {backend!r}: {usable}")


@asynccontextmanager
async def open_core(settings: Settings) -> AsyncIterator[Core]:
    """The core of a command, its schema up to date; a database that cannot be used is a UserError."""
    check_database_url(settings.database_url)
    core = Core(settings, SiteRegistry.from_toml(settings.sites))
    try:
        try:
            await upgrade(core.engine)
        except (OSError, DBAPIError) as exc:
            raise UserError(_unreachable(settings.database_url, _shown_url(settings.database_url), exc)) from exc
        yield core
    finally:
        await core.close()


def _unreachable(url: str, shown: str, exc: BaseException) -> str:
    reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if is_sqlite(url):
        return f"cannot open the SQLite database {shown!r} ({reason}): check that its folder exists and is writable"
    return (
        f"cannot use the database {shown!r} ({reason}): check HELPLINE_DATABASE_URL, "
        "that PostgreSQL is running and that the database exists"
    )


def run_with_core(settings: Settings, work: Callable[[Core], Awaitable[T]]) -> T:
    """Run ``work`` on a fresh core (schema upgraded), then close it."""

    async def main() -> T:
        async with open_core(settings) as core:
            return await work(core)

    return asyncio.run(main())


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(message)s")
    # httpx logs one INFO line per request ("HTTP Request: POST ..."): one per outbox event.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
    )


async def _nothing(core: Core) -> None:
    return None


def _settings(sites: str | None) -> Settings:
    settings = Settings()
    if sites:
        settings = settings.model_copy(update={"sites": sites})
    return settings


SITES_TEMPLATE = """\
# helpline's sites: one [[site]] per helpline (one country each). Written by `helpline init`;
# README.md explains every key; sites.example.toml (in the source) has two sites.
[[site]]
slug = "{slug}"                     # in URLs (/sites/{slug}/api/...) and case numbers
name = "{name}"
countries = ["{country}"]           # ISO 3166-1 alpha-2: a handover's `location` picks the site
timezone = "{timezone}"
default = true                      # where a handover without a known location goes
default_risk = "high"               # a handover without "risk": the chatbot hands over high-risk cases
dedupe_window_s = 30                # the same text again within 30 s, without message_id: a retry (0: off)

[site.rapidpro]                     # where counselor messages go: {{base_url}}/api/v2/flow_starts.json
base_url = "{rapidpro_url}"
token_env = "HELPLINE_{env_slug}_RAPIDPRO_TOKEN"   # the RapidPro API token, read from this variable
flow = "00000000-0000-4000-8000-000000000000"      # the UUID of the flow that carries our events
urn_scheme = "telegram"             # chat_sender 23343411 -> telegram:23343411 when no contact_urn
params_field = "params"             # "extra" for older RapidPro servers

[site.routing]
strategy = "leastrecent"            # ringall | leastrecent | fewestchats | roundrobin | random
offer_timeout_s = 30                # an unread offer goes to the next counselor after this
max_chats_per_counselor = 3
"""


@app.command()
@friendly
def init(
    path: Annotated[Path, typer.Option("--sites", help="where to write the sites file")] = Path("sites.toml"),
    slug: Annotated[str, typer.Option(help="the site's short name (a-z, 0-9, - and _)")] = "ke",
    name: Annotated[str, typer.Option(help="the helpline's name")] = "Child Helpline",
    country: Annotated[str, typer.Option(help="its country (ISO 3166-1 alpha-2)")] = "KE",
    timezone: Annotated[str, typer.Option(help="its time zone")] = "Africa/Nairobi",
    rapidpro_url: Annotated[str, typer.Option(help="its RapidPro server")] = "https://rapidpro.example.org",
    force: Annotated[bool, typer.Option("--force", help="overwrite an existing file")] = False,
) -> None:
    """Write a commented sites file for one helpline, then print the next commands."""
    if path.exists() and not force:
        raise UserError(f"{str(path)!r} exists already: edit it, or give --force to write a new one over it")
    text = SITES_TEMPLATE.format(
        slug=slug,
        name=name.replace('"', "'"),
        country=country.upper(),
        timezone=timezone,
        rapidpro_url=rapidpro_url,
        env_slug=slug.upper().replace("-", "_"),
    )
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from exc
    try:
        SiteRegistry.from_toml(path)  # what it wrote must load: a bad --slug or --timezone says so now
    except SitesFileError:
        path.unlink()
        raise
    shown = "" if path == Path("sites.toml") else f" --sites {path}"
    variable = f"HELPLINE_{slug.upper().replace('-', '_')}_RAPIDPRO_TOKEN"
    typer.echo(f"wrote {path} (site {slug!r}); put the RapidPro token in {variable}. Next:")
    for line in (
        f"helpline migrate{shown}",
        f"helpline createuser --role chatbot --username weni --password '…'{shown}",
        f"helpline createuser --role counselor --username amina --password '…' --name Amina{shown}",
        f"helpline serve{shown}",
    ):
        typer.echo(f"  {line}")


@app.command()
@friendly
def serve(
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8000,
    sites: Annotated[str | None, typer.Option(help="sites TOML file (default: $HELPLINE_SITES)")] = None,
) -> None:
    """Run the HTTP/WebSocket server and the background components (hunting, delivery, Asterisk, retention)."""
    import uvicorn

    from helpline.app import create_app

    settings = _settings(sites)
    registry = SiteRegistry.from_toml(settings.sites)
    run_with_core(settings, _nothing)  # a database that cannot be used: one line now, not a failed startup
    configure_logging(settings.log_level)
    uvicorn.run(
        create_app(settings, registry),
        host=host,
        port=port,
        log_level=settings.log_level.lower(),
        ws="websockets-sansio",
    )


@app.command()
@friendly
def work(
    sites: Annotated[str | None, typer.Option(help="sites TOML file (default: $HELPLINE_SITES)")] = None,
) -> None:
    """Run an instance's background components without an HTTP server (PostgreSQL), as `serve` does:
    hunting and delivery (HELPLINE_RUN_HUNTER and HELPLINE_RUN_OUTBOX say which), Asterisk, retention."""
    import uvloop

    from helpline.worker import work as run

    settings = _settings(sites)
    if is_sqlite(settings.database_url):
        raise UserError("helpline work needs PostgreSQL: with SQLite, `helpline serve` runs every loop")
    registry = SiteRegistry.from_toml(settings.sites)
    run_with_core(settings, _nothing)
    configure_logging(settings.log_level)
    uvloop.run(run(settings, registry))


@app.command()
@friendly
def migrate(sites: Annotated[str | None, typer.Option(help="sites TOML file")] = None) -> None:
    """Create or upgrade the schema."""
    run_with_core(_settings(sites), _nothing)
    console.print("[green]schema is up to date[/green]")


@app.command()
@friendly
def createuser(
    role: Annotated[Role, typer.Option(help="chatbot, counselor, supervisor or admin")],
    username: Annotated[str, typer.Option()],
    password: Annotated[str, typer.Option()],
    site: Annotated[str | None, typer.Option(help="site slug ('*': all sites); default: the default site")] = None,
    name: Annotated[str | None, typer.Option(help="pseudonym shown to clients")] = None,
    extension: Annotated[
        str | None, typer.Option(help="phone extension: the counselor's Asterisk queue interface, if the site has one")
    ] = None,
    signing_secret: Annotated[
        bool,
        typer.Option(
            "--signing-secret", help="chatbot: generate a signing secret, printed once; every request must be signed"
        ),
    ] = False,
    sites: Annotated[str | None, typer.Option(help="sites TOML file")] = None,
) -> None:
    """Create a user."""
    settings = _settings(sites)
    secret = new_signing_secret() if signing_secret else None

    async def run(core: Core) -> None:
        who = await create_user(
            core,
            username=username,
            password=password,
            role=role,
            site=site,
            name=name,
            extension=extension,
            signing_secret=secret,
        )
        console.print(f"created {who.role.value} [bold]{who.username}[/bold] (site {who.site}, id {who.id})")

    run_with_core(settings, run)
    if secret is not None:
        typer.echo(f"signing secret (shown once): {secret}")


@app.command()
@friendly
def issuetoken(
    username: Annotated[str, typer.Option(help="the account, e.g. the chatbot user of a Weni project")],
    ttl_days: Annotated[float, typer.Option(help="lifetime in days")] = 365,
    sites: Annotated[str | None, typer.Option(help="sites TOML file")] = None,
) -> None:
    """Issue a long-lived API token (a Weni project's api_token); prints only the token on stdout."""
    settings = _settings(sites)

    token, expires_at = run_with_core(
        settings, lambda core: issue_service_token(core, username=username, ttl_s=ttl_days * 86400)
    )
    typer.echo(token)
    Console(stderr=True).print(f"token for [bold]{username}[/bold], valid until {iso(expires_at)}")


@app.command("signing-secret")
@friendly
def signing_secret(
    username: Annotated[str, typer.Option(help="the chatbot account")],
    generate: Annotated[bool, typer.Option("--generate", help="set a new random secret and print it once")] = False,
    set_: Annotated[
        str | None, typer.Option("--set", help="set this secret (32..100 of A-Z a-z 0-9 _ . ~ + / = -)")
    ] = None,
    clear: Annotated[bool, typer.Option("--clear", help="remove the secret: requests need no signature")] = False,
    keep_previous: Annotated[
        bool,
        typer.Option("--keep-previous", help="rotation: the current secret stays valid too until the next change"),
    ] = False,
    sites: Annotated[str | None, typer.Option(help="sites TOML file")] = None,
) -> None:
    """Set, rotate or clear the secret a chatbot account signs its requests with (HMAC-SHA256).

    With a secret, every request the account authenticates with its token must carry
    X-Helpline-Timestamp and X-Helpline-Signature (see README, "Signed requests"). Running servers
    pick the change up within 5 seconds.
    """
    if (generate, set_ is not None, clear).count(True) != 1:
        raise UserError("give exactly one of --generate, --set SECRET, --clear")
    if clear and keep_previous:
        raise UserError("--keep-previous goes with --generate or --set")
    secret = new_signing_secret() if generate else set_
    settings = _settings(sites)

    run_with_core(
        settings, lambda core: set_signing_secret(core, username=username, secret=secret, keep_previous=keep_previous)
    )
    err = Console(stderr=True)
    if secret is None:
        err.print(f"[bold]{username}[/bold] no longer signs its requests")
        return
    if generate:
        typer.echo(secret)  # stdout: only the secret, shown this once
    kept = " (the previous secret stays valid until the next change)" if keep_previous else ""
    err.print(f"[bold]{username}[/bold] now signs its requests with the new secret{kept}")


@app.command()
@friendly
def purge(
    days: Annotated[
        int | None,
        typer.Option(min=0, help="purge conversations closed more than N days ago (default: $HELPLINE_RETENTION_DAYS)"),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="only count what would be purged")] = False,
    sites: Annotated[str | None, typer.Option(help="sites TOML file")] = None,
) -> None:
    """Empty the texts and client identifiers of conversations closed more than N days ago (keeps statistics)."""
    from helpline.domain.retention import PurgeReport
    from helpline.domain.retention import purge as run_purge

    settings = _settings(sites)
    n = settings.retention_days if days is None else days
    if n <= 0:
        console.print("retention is off (0 days keeps everything): set HELPLINE_RETENTION_DAYS or give --days N")
        return

    report: PurgeReport = run_with_core(settings, lambda core: run_purge(core, days=n, dry_run=dry_run))
    verb = "would purge" if dry_run else "purged"
    console.print(
        f"{verb} {report.conversations} conversation(s) closed before {iso(report.cutoff)} "
        f"({report.messages} message(s)) and {report.outbox_events} outbox event(s)"
    )


@app.command()
@friendly
def demo(
    port: Annotated[int, typer.Option(help="port of the helpline server on 127.0.0.1 (0: any free port)")] = 8000,
    seconds: Annotated[float, typer.Option(help="keep serving this long after the script (0: until Ctrl-C)")] = 0,
) -> None:
    """Everything embedded (SQLite, a fake RapidPro, a scripted chatbot and counselors): watch a conversation."""
    import helpline.testing.demo

    code = helpline.testing.demo.run_demo(port=port, seconds=seconds, console=console)
    if code:
        raise typer.Exit(code)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
