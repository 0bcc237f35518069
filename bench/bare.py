"""The bare ASGI baseline: the same server and JSON parser, one INSERT, nothing else.

``POST /api/chat/`` reads the body, parses it with orjson (as ``helpline.api.deps.read_json``
does), INSERTs one row into a one-table database through an engine made by
``helpline.store.db.make_engine`` (same pool, same SQLite pragmas and ``BEGIN IMMEDIATE``), and
answers 201 with a small JSON body. No auth, no validation, no domain logic: the ceiling that
helpline's own throughput is compared with.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from sqlalchemy import Column, Float, Integer, MetaData, String, Table, Text, insert
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from helpline.store.db import make_engine

metadata = MetaData()
bare_messages = Table(
    "bench_bare_messages",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("chat_session", String(128)),
    Column("message_id", String(128)),
    Column("text", Text),
    Column("created_at", Float),
)


def create_bare_app(database_url: str, *, writer_lock: bool = False) -> Starlette:
    """``writer_lock``: serialize the INSERT transactions in-process with an ``asyncio.Lock`` (an
    experiment: what SQLite gains when writers wait on the lock instead of in its busy handler)."""
    engine: AsyncEngine | None = None
    lock: Any = asyncio.Lock() if writer_lock else contextlib.nullcontext()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        nonlocal engine
        engine = make_engine(database_url)
        async with engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
        try:
            yield
        finally:
            await engine.dispose()

    async def post_chat(request: Request) -> Response:
        data = orjson.loads(await request.body())
        assert engine is not None
        message_id = data.get("message_id") or str(uuid.uuid4())
        async with lock, engine.begin() as conn:
            await conn.execute(
                insert(bare_messages).values(
                    chat_session=data["chat_session"],
                    message_id=message_id,
                    text=data["chat_message"],
                    created_at=time.time(),
                )
            )
        body = {"status": "success", "chat_session": data["chat_session"], "message_id": message_id}
        return Response(orjson.dumps(body), status_code=201, media_type="application/json")

    async def healthz(request: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    return Starlette(
        routes=[Route("/api/chat/", post_chat, methods=["POST"]), Route("/healthz", healthz)],
        lifespan=lifespan,
    )
