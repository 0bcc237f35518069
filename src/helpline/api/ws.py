"""``/ws``: live events for counselors and supervisors (token as ``?token=`` or first message)."""

from __future__ import annotations

import asyncio
import contextlib

import orjson
from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from helpline.domain.auth import Principal, Role, authenticate
from helpline.domain.errors import NotAuthenticated, PermissionDenied
from helpline.runtime.core import Core

router = APIRouter()

AUTH_TIMEOUT_S = 10.0


async def _authenticate(ws: WebSocket, core: Core) -> Principal | None:
    token = ws.query_params.get("token")
    try:
        if token is None:
            first = await asyncio.wait_for(ws.receive(), timeout=AUTH_TIMEOUT_S)
            if first["type"] == "websocket.disconnect":
                return None
            # A binary frame is read like a text one (receive_text() would raise KeyError on it).
            data = orjson.loads(first.get("text") or first.get("bytes") or b"")
            token = str(data.get("token", "")) if isinstance(data, dict) else ""
        who = await authenticate(core, token)
        who.require_role(Role.COUNSELOR, Role.SUPERVISOR, Role.ADMIN)
        return who
    except (NotAuthenticated, PermissionDenied, orjson.JSONDecodeError, TimeoutError) as exc:
        reason = getattr(exc, "message", "authentication required")
        await ws.send_text(orjson.dumps({"type": "error", "code": "not_authenticated", "message": reason}).decode())
        await ws.close(code=4401, reason="not authenticated")
        return None


@router.websocket("/ws")
async def events(ws: WebSocket) -> None:
    core: Core = ws.app.state.core
    await ws.accept()
    who = await _authenticate(ws, core)
    if who is None:
        return
    supervisor_site = who.site if who.role in (Role.SUPERVISOR, Role.ADMIN) else None
    queue = core.hub.subscribe(who.id, site=supervisor_site)
    await ws.send_text(
        orjson.dumps(
            {"type": "hello", "user": {"id": who.id, "name": who.name, "role": who.role.value, "site": who.site}}
        ).decode()
    )

    async def pump() -> None:
        while True:
            event = await queue.get()
            await ws.send_text(orjson.dumps(event).decode())

    sender = asyncio.create_task(pump())
    try:
        while True:
            received = await ws.receive()
            if received["type"] == "websocket.disconnect":
                break
            with contextlib.suppress(orjson.JSONDecodeError):
                msg = orjson.loads(received.get("text") or received.get("bytes") or b"")
                if isinstance(msg, dict) and msg.get("type") == "ping":
                    await ws.send_text('{"type":"pong"}')
    except WebSocketDisconnect:
        pass
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
        core.hub.unsubscribe(who.id, queue, site=supervisor_site)
