"""The ASGI application: routes, error handling, and the instance's background components."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware

from helpline import console
from helpline.api import cases, counselors, deps, errors, openapi, openchs, ops, supervisor, weni, ws
from helpline.config.settings import Settings
from helpline.config.sites import SiteRegistry
from helpline.runtime.core import Core
from helpline.runtime.logs import install_redaction
from helpline.store.migrate import upgrade
from helpline.worker import Background

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
        app.state.core = core  # the HTTP side's core: Asterisk's presence sink is set on it
        background = Background(core, loops=run_workers)  # the same components `helpline work` starts
        try:
            await background.start()
            yield
        finally:
            await background.stop()
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
    openapi.install(app)
    weni.install(app)  # the Weni contract's error body under /v1
    for prefix in CHATBOT_PREFIXES:
        app.include_router(openchs.router, prefix=prefix, include_in_schema=prefix in ("/api", "/sites/{site}/api"))
    app.include_router(counselors.router, prefix="/api")
    app.include_router(supervisor.router, prefix="/api")
    app.include_router(cases.router, prefix="/api")
    app.include_router(weni.agent_router, prefix="/api")
    for prefix in ("/v1", "/sites/{site}/v1"):
        app.include_router(weni.router, prefix=prefix, include_in_schema=prefix == "/v1")
    console.install(app)
    app.include_router(ws.router)

    app.include_router(ops.router)
    return app
