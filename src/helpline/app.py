"""The ASGI application: routes, error handling and the background loops."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware

from helpline import console
from helpline.api import cases, counselors, deps, errors, openchs, ops, supervisor, weni, ws
from helpline.config.settings import Settings
from helpline.config.sites import SiteRegistry
from helpline.domain.retention import run_retention
from helpline.routing.asterisk import AsteriskPresence
from helpline.runtime import gcpolicy
from helpline.runtime.core import Core
from helpline.runtime.logs import install_redaction
from helpline.store.checkpoint import WalCheckpointer
from helpline.store.db import sqlite_path
from helpline.store.migrate import upgrade
from helpline.worker import Workers, cancel_all, start_listener

CHATBOT_PREFIXES = ("/api", "/open/api", "/sites/{site}/api", "/sites/{site}/open/api")


def create_app(
    settings: Settings | None = None, sites: SiteRegistry | None = None, *, run_workers: bool = True
) -> FastAPI:
    settings = settings or Settings()
    sites = sites or SiteRegistry.from_toml(settings.sites)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        install_redaction()  # after uvicorn has configured its loggers
        core = Core(settings, sites)
        await upgrade(core.engine)
        app.state.core = core
        tasks: list[asyncio.Task[Any]] = []
        wal = sqlite_path(settings.database_url)
        if wal is not None:
            tasks.append(asyncio.create_task(WalCheckpointer(wal).run(), name="wal-checkpoint"))
        listener = await start_listener(core)
        if listener is not None:
            tasks.append(listener)
        workers = Workers(core)
        if run_workers:
            workers.start()  # hunting and delivery, unless the settings leave them to other instances
            phones = AsteriskPresence.for_core(core)  # sites with [site.asterisk]
            if phones is not None:
                core.presence_sink = phones
                tasks.append(asyncio.create_task(phones.run(), name="asterisk"))
            if settings.retention_days > 0:
                tasks.append(asyncio.create_task(run_retention(core), name="retention"))
        restore_gc: Callable[[], None] | None = None
        if settings.gc_freeze:
            gcpolicy.freeze()
        if settings.gc_full_collection_s > 0:
            restore_gc = gcpolicy.schedule_full_collections()
            tasks.append(asyncio.create_task(gcpolicy.run_full_collections(settings.gc_full_collection_s), name="gc"))
        try:
            yield
        finally:
            if restore_gc is not None:
                restore_gc()
            await workers.stop()
            await cancel_all(tasks)
            await core.close()

    app = FastAPI(
        title="helpline",
        version="0.1.0",
        summary="Bridges a chatbot platform (Weni/RapidPro) to child-helpline counselors (OpenCHS).",
        lifespan=lifespan,
        dependencies=[Depends(deps.refuse_nul)],  # PostgreSQL stores no NUL character: 4xx, not 503
    )
    origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
    if origins:  # none by default: the console is same-origin and needs no CORS
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST", "PUT", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "X-Request-Id"],
            max_age=600,
        )
    errors.install(app)
    weni.install(app)  # the Weni contract's error body under /v1
    for prefix in CHATBOT_PREFIXES:
        app.include_router(openchs.router, prefix=prefix, include_in_schema=prefix in ("/api", "/sites/{site}/api"))
    app.include_router(counselors.router, prefix="/api")
    app.include_router(supervisor.router, prefix="/api")
    app.include_router(cases.router, prefix="/api")
    for prefix in ("/v1", "/sites/{site}/v1"):
        app.include_router(weni.router, prefix=prefix, include_in_schema=prefix == "/v1")
    console.install(app)
    app.include_router(ws.router)

    app.include_router(ops.router)
    return app
