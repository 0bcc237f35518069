"""The counselor console (``/console/``) and the supervisor view (``/console/supervisor/``).

Plain HTML, CSS and JavaScript modules served as they are: no front-end build step. The pages
talk to the REST API and ``/ws`` like any other client.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, RedirectResponse
from starlette.staticfiles import StaticFiles
from starlette.types import Message, Receive, Scope, Send

HERE = Path(__file__).parent
STATIC = HERE / "static"

# The pages load only their own scripts and styles, connect only to this origin, and are not framed.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; media-src 'none'; object-src 'none'; base-uri 'none'; "
        "form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    # No page opened from the console keeps a handle on it; no camera, microphone or location.
    "Cross-Origin-Opener-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=(), payment=()",
    # Revalidate every time (ETag): a new release is picked up without a build step's hashed names.
    "Cache-Control": "no-cache",
}


class _Static(StaticFiles):
    """Static files with the console's headers."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]
                message["headers"] = headers
            await send(message)

        await super().__call__(scope, receive, send_with_headers)


def _page(name: str) -> FileResponse:
    return FileResponse(HERE / name, media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)


def install(app: FastAPI) -> None:
    """Serve the console pages and their static files."""

    @app.get("/console", include_in_schema=False)
    async def console_slash() -> RedirectResponse:
        return RedirectResponse("/console/", status_code=308)

    @app.get("/console/", include_in_schema=False)
    async def console_page() -> FileResponse:
        return _page("console.html")

    @app.get("/console/supervisor", include_in_schema=False)
    async def supervisor_slash() -> RedirectResponse:
        return RedirectResponse("/console/supervisor/", status_code=308)

    @app.get("/console/supervisor/", include_in_schema=False)
    async def supervisor_page() -> FileResponse:
        return _page("supervisor.html")

    app.mount("/console/static", _Static(directory=STATIC), name="console-static")
