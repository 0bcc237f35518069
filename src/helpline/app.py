"""The ASGI application: routes, error handling, and the instance's background components."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

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

Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]


def create_app(
    settings: Settings | None = None, sites: SiteRegistry | None = None, *, run_workers: bool = True
) -> FastAPI:
    """The app; ``run_workers=False`` leaves out the loops (hunter, outbox, Asterisk, purge)."""
    settings = settings or Settings()
    sites = sites or SiteRegistry.from_toml(settings.sites)
    app = FastAPI(
        title="helpline",
        version="0.1.0",
        summary="Bridges a chatbot platform (Weni/RapidPro) to child-helpline counselors (OpenCHS).",
        lifespan=instance_lifespan(settings, sites, loops=run_workers),
        dependencies=[Depends(deps.refuse_nul)],  # PostgreSQL stores no NUL character: 4xx, not 503
    )
    allow_origins(app, settings.cors_origins)
    errors.install(app)
    openapi.install(app)
    weni.install(app)  # the Weni contract's error body under /v1
    include_routes(app)
    return app


def instance_lifespan(settings: Settings, sites: SiteRegistry, *, loops: bool) -> Lifespan:
    """The lifespan: the core, its schema brought up to date, and its background components
    (worker.Background: the same ones ``helpline work`` starts) for as long as the app runs."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        install_redaction()  # after uvicorn has configured its loggers
        core = Core(settings, sites)
        await upgrade(core.engine)
        app.state.core = core  # the HTTP side's core: Asterisk's presence sink is set on it
        background = Background(core, loops=loops)
        try:
            await background.start()
            yield
        finally:
            await background.stop()
            await core.close()

    return lifespan


def allow_origins(app: FastAPI, cors_origins: str) -> None:
    """CORS for the listed origins; none by default: the console is same-origin and needs no CORS."""
    origins = [o.strip() for o in cors_origins.split(",") if o.strip()]
    if origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST", "PUT", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "X-Request-Id"],
            max_age=600,
        )


def include_routes(app: FastAPI) -> None:
    """Every router: the chatbot API under its four prefixes, counselors, supervisors, cases, Weni
    (``/v1`` and per site), the console, the WebSocket, and ops (health, metrics)."""
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
