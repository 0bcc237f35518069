"""``helpline``: serve, work, migrate, createuser, issuetoken, signing-secret, purge, demo."""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated

import structlog
import typer
from rich.console import Console

from helpline.config.settings import Settings
from helpline.config.sites import SiteRegistry
from helpline.domain.auth import Role, create_user, issue_service_token, new_signing_secret, set_signing_secret
from helpline.domain.errors import DomainError
from helpline.domain.views import iso
from helpline.runtime.core import Core
from helpline.store.migrate import upgrade

app = typer.Typer(help="helpline: the chatbot <-> child-helpline bridge", no_args_is_help=True)
console = Console()


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


def _settings(sites: str | None) -> Settings:
    settings = Settings()
    if sites:
        settings = settings.model_copy(update={"sites": sites})
    return settings


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8000,
    sites: Annotated[str | None, typer.Option(help="sites TOML file (default: $HELPLINE_SITES)")] = None,
) -> None:
    """Run the HTTP/WebSocket server with its hunting and delivery loops."""
    import uvicorn

    from helpline.app import create_app

    settings = _settings(sites)
    configure_logging(settings.log_level)
    uvicorn.run(
        create_app(settings), host=host, port=port, log_level=settings.log_level.lower(), ws="websockets-sansio"
    )


@app.command()
def work(
    sites: Annotated[str | None, typer.Option(help="sites TOML file (default: $HELPLINE_SITES)")] = None,
) -> None:
    """Run the hunting and delivery loops without an HTTP server (PostgreSQL; HELPLINE_RUN_HUNTER and
    HELPLINE_RUN_OUTBOX say which), beside `helpline serve` instances that leave them to it."""
    import uvloop

    from helpline.store.db import is_sqlite
    from helpline.worker import work as run

    settings = _settings(sites)
    if is_sqlite(settings.database_url):
        console.print("[red]helpline work needs PostgreSQL: with SQLite, `helpline serve` runs every loop[/red]")
        raise typer.Exit(2)
    configure_logging(settings.log_level)
    uvloop.run(run(settings, SiteRegistry.from_toml(settings.sites)))


@app.command()
def migrate(sites: Annotated[str | None, typer.Option(help="sites TOML file")] = None) -> None:
    """Create or upgrade the schema."""
    settings = _settings(sites)

    async def run() -> None:
        core = Core(settings, SiteRegistry.from_toml(settings.sites))
        try:
            await upgrade(core.engine)
        finally:
            await core.close()

    asyncio.run(run())
    console.print("[green]schema is up to date[/green]")


@app.command()
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

    async def run() -> None:
        core = Core(settings, SiteRegistry.from_toml(settings.sites))
        try:
            await upgrade(core.engine)
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
        finally:
            await core.close()

    try:
        asyncio.run(run())
    except DomainError as exc:
        console.print(f"[red]error:[/red] {exc.message}")
        raise typer.Exit(2) from exc
    if secret is not None:
        typer.echo(f"signing secret (shown once): {secret}")


@app.command()
def issuetoken(
    username: Annotated[str, typer.Option(help="the account, e.g. the chatbot user of a Weni project")],
    ttl_days: Annotated[float, typer.Option(help="lifetime in days")] = 365,
    sites: Annotated[str | None, typer.Option(help="sites TOML file")] = None,
) -> None:
    """Issue a long-lived API token (a Weni project's api_token); prints only the token on stdout."""
    settings = _settings(sites)

    async def run() -> tuple[str, float]:
        core = Core(settings, SiteRegistry.from_toml(settings.sites))
        try:
            await upgrade(core.engine)
            return await issue_service_token(core, username=username, ttl_s=ttl_days * 86400)
        finally:
            await core.close()

    try:
        token, expires_at = asyncio.run(run())
    except DomainError as exc:
        console.print(f"[red]error:[/red] {exc.message}")
        raise typer.Exit(2) from exc
    typer.echo(token)
    Console(stderr=True).print(f"token for [bold]{username}[/bold], valid until {iso(expires_at)}")


@app.command("signing-secret")
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
        console.print("[red]error:[/red] give exactly one of --generate, --set SECRET, --clear")
        raise typer.Exit(2)
    if clear and keep_previous:
        console.print("[red]error:[/red] --keep-previous goes with --generate or --set")
        raise typer.Exit(2)
    secret = new_signing_secret() if generate else set_
    settings = _settings(sites)

    async def run() -> None:
        core = Core(settings, SiteRegistry.from_toml(settings.sites))
        try:
            await upgrade(core.engine)
            await set_signing_secret(core, username=username, secret=secret, keep_previous=keep_previous)
        finally:
            await core.close()

    try:
        asyncio.run(run())
    except DomainError as exc:
        console.print(f"[red]error:[/red] {exc.message}")
        raise typer.Exit(2) from exc
    err = Console(stderr=True)
    if secret is None:
        err.print(f"[bold]{username}[/bold] no longer signs its requests")
        return
    if generate:
        typer.echo(secret)  # stdout: only the secret, shown this once
    kept = " (the previous secret stays valid until the next change)" if keep_previous else ""
    err.print(f"[bold]{username}[/bold] now signs its requests with the new secret{kept}")


@app.command()
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

    async def run() -> PurgeReport:
        core = Core(settings, SiteRegistry.from_toml(settings.sites))
        try:
            await upgrade(core.engine)
            return await run_purge(core, days=n, dry_run=dry_run)
        finally:
            await core.close()

    report = asyncio.run(run())
    verb = "would purge" if dry_run else "purged"
    console.print(
        f"{verb} {report.conversations} conversation(s) closed before {iso(report.cutoff)} "
        f"({report.messages} message(s)) and {report.outbox_events} outbox event(s)"
    )


@app.command()
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
