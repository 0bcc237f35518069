"""A ``helpline serve``-equivalent server (or the bare baseline) in its own process.

    python -m bench.server --app helpline --db URL --sites FILE --port P
    python -m bench.server --app bare --db URL --port P

Like ``helpline serve``: structlog JSON logs at ``HELPLINE_LOG_LEVEL`` (INFO), uvicorn with its
access log, ``ws="websockets-sansio"``, and uvloop + httptools when installed (uvicorn's "auto"
picks them too; named here so the figures say what ran). ``--set key=value`` overrides a
``Settings`` field (e.g. ``--set poll_interval_s=0.5``).
"""

from __future__ import annotations

import argparse
import importlib.util
from typing import Any

import uvicorn


def _single_sqlite_connection() -> None:
    """SQLite: one pooled connection (pool_size=1, no overflow): every unit of work waits its turn
    in the pool instead of in SQLite's busy handler, and no connection is opened per request."""
    from sqlalchemy.ext.asyncio import create_async_engine as original

    import helpline.store.db as db_mod

    def create_async_engine(url: str, **kw: Any) -> Any:
        if db_mod.is_sqlite(url):
            kw |= {"pool_size": 1, "max_overflow": 0, "pool_timeout": 60}
        return original(url, **kw)

    setattr(db_mod, "create_async_engine", create_async_engine)  # noqa: B010


def _auth_cache() -> None:
    """Cache ``authenticate`` results per token for 5 s (revocation then takes up to 5 s)."""
    import time

    import helpline.api.deps as deps_mod
    import helpline.api.ws as ws_mod
    import helpline.domain.auth as auth_mod

    original = auth_mod.authenticate
    cache: dict[str, tuple[float, Any]] = {}

    async def authenticate(core: Any, token: str) -> Any:
        hit = cache.get(token)
        now = time.monotonic()
        if hit is not None and hit[0] > now:
            return hit[1]
        who = await original(core, token)
        cache[token] = (now + 5.0, who)
        return who

    deps_mod.authenticate = authenticate  # type: ignore[attr-defined]
    ws_mod.authenticate = authenticate  # type: ignore[attr-defined]


def _outbox_message_ref_index() -> None:
    """An index on ``outbox(message_ref, status)``, created after the migrations: the count in
    ``_update_message_status`` then stops scanning every pending row."""
    import helpline.app as app_mod
    import helpline.store.migrate as migrate_mod

    original = migrate_mod.upgrade

    async def upgrade(engine: Any, revision: str = "head") -> None:
        await original(engine, revision)
        from sqlalchemy import text

        async with engine.begin() as conn:
            await conn.execute(
                text("CREATE INDEX IF NOT EXISTS ix_bench_outbox_message_ref ON outbox (message_ref, status)")
            )

    migrate_mod.upgrade = upgrade
    app_mod.upgrade = upgrade  # type: ignore[attr-defined]


def _gc_off() -> None:
    """No cyclic garbage collection at all (to see whether its pauses make the latency tail)."""
    import gc

    gc.disable()


def _candidates_cached() -> None:
    """Hunting reuses each site's candidate list for 5 s (wrong: capacities go stale), to size
    what counting every counselor's conversations in each round costs at scale."""
    import time

    import helpline.routing.hunt as hunt_mod
    from helpline.routing import presence

    original = presence.candidates
    cache: dict[str, tuple[float, Any]] = {}

    async def candidates(session: Any, site: Any, t: float) -> Any:
        hit = cache.get(site.slug)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        found = await original(session, site, t)
        cache[site.slug] = (time.monotonic() + 5.0, found)
        return found

    setattr(hunt_mod, "candidates", candidates)  # noqa: B010 (the hunter's own reference)


def _trace_offers() -> None:
    """Timestamps (wall clock) along an offer's way, as JSON lines in ``bench/.work/trace-offers.jsonl``:
    hunter woken, round start and end, each offer event delivered to the hub (after the commit,
    directly or back from PostgreSQL's bus) and handed to its WebSocket."""
    import json
    import time
    from pathlib import Path

    import orjson

    import helpline.api.ws as ws_mod
    import helpline.routing.hunt as hunt_mod
    import helpline.runtime.core as core_mod
    from helpline.runtime.events import EventHub

    out = (Path(__file__).parent / ".work" / "trace-offers.jsonl").open("w", buffering=1)

    def trace(what: str, **data: Any) -> None:
        out.write(json.dumps({"what": what, "t": time.time(), **data}) + "\n")

    step = hunt_mod.Hunter.step

    async def traced_step(self: Any) -> float:
        trace("round_start", woken=self.core.hunter_wakeup.is_set())
        try:
            return await step(self)
        finally:
            trace("round_end")

    hunt_mod.Hunter.step = traced_step  # type: ignore[method-assign]
    publish = EventHub.publish

    def traced_publish(self: Any, user_id: int, event: Any) -> None:
        if event.get("type") == "offer":
            offer = event["offer"]
            queued = offer["conversation"].get("queued_at")
            trace("publish", offer=offer["id"], created=offer.get("created_at"), queued=queued)
        publish(self, user_id, event)

    EventHub.publish = traced_publish  # type: ignore[method-assign]

    class _Orjson:  # what helpline.api.ws uses of orjson, noting each offer it serialises
        JSONDecodeError = orjson.JSONDecodeError
        loads = staticmethod(orjson.loads)

        @staticmethod
        def dumps(obj: Any) -> bytes:
            if isinstance(obj, dict) and obj.get("type") == "offer":
                trace("ws_send", offer=obj["offer"]["id"])
            return orjson.dumps(obj)

    setattr(ws_mod, "orjson", _Orjson)  # noqa: B010
    wakeup_set = core_mod.Core.deliver

    def traced_deliver(self: Any, msg: Any) -> None:
        if "hunter" in msg.get("wake", ()):
            trace("bus_wake")
        wakeup_set(self, msg)

    core_mod.Core.deliver = traced_deliver  # type: ignore[method-assign]


def _trace_sql() -> None:
    """With ``trace-offers``: every statement's start and end, with its asyncio task (heavy: it
    slows the server down several times; for the order of things, not their duration)."""
    import asyncio
    import json
    import time
    from pathlib import Path

    out = (Path(__file__).parent / ".work" / "trace-sql.jsonl").open("w", buffering=1)

    def trace(what: str, **data: Any) -> None:
        out.write(json.dumps({"what": what, "t": time.time(), **data}) + "\n")

    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    def task_name() -> str:
        try:
            task = asyncio.current_task()
        except RuntimeError:
            return "-"
        return task.get_name() if task is not None else "-"

    @event.listens_for(Engine, "before_cursor_execute")
    def before(conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool) -> None:
        trace("sql_start", sql=" ".join(statement.split())[:60], task=task_name())

    @event.listens_for(Engine, "after_cursor_execute")
    def after(conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: bool) -> None:
        trace("sql_end", task=task_name())


EXPERIMENTS = {
    "trace-offers": _trace_offers,
    "trace-sql": _trace_sql,
    "candidates-cached": _candidates_cached,
    "gc-off": _gc_off,
    "sqlite-single-connection": _single_sqlite_connection,
    "auth-cache": _auth_cache,
    "outbox-message-ref-index": _outbox_message_ref_index,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--app", choices=["helpline", "bare"], default="helpline")
    ap.add_argument("--db", required=True, help="database URL")
    ap.add_argument("--sites", help="sites TOML (helpline only)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--no-access-log", action="store_true", help="turn uvicorn's access log off")
    ap.add_argument("--bare-writer-lock", action="store_true", help="bare: serialize INSERTs with an asyncio.Lock")
    ap.add_argument(
        "--experiment",
        action="append",
        default=[],
        choices=sorted(EXPERIMENTS),
        help="monkeypatch a candidate fix into this process (never used for the recorded figures)",
    )
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a Settings override")
    args = ap.parse_args()

    from helpline.cli import configure_logging
    from helpline.config.settings import Settings

    overrides: dict[str, Any] = {"database_url": args.db}
    if args.sites:
        overrides["sites"] = args.sites
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = value
    settings = Settings(**overrides)
    configure_logging(settings.log_level)

    for name in args.experiment:
        EXPERIMENTS[name]()

    app: Any
    if args.app == "helpline":
        from helpline.app import create_app

        app = create_app(settings)
    else:
        from bench.bare import create_bare_app

        app = create_bare_app(args.db, writer_lock=args.bare_writer_lock)

    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        loop="uvloop" if importlib.util.find_spec("uvloop") else "auto",
        http="httptools" if importlib.util.find_spec("httptools") else "auto",
        ws="websockets-sansio",
        log_level=settings.log_level.lower(),
        access_log=not args.no_access_log,
        backlog=4096,
    )
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
