"""A real helpline server on a loopback port, in a background thread: for tests, benches and the demo."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import uvicorn

from helpline.app import create_app
from helpline.config.settings import Settings
from helpline.config.sites import SiteRegistry
from helpline.domain.auth import Principal, Role, create_user
from helpline.runtime.core import Core
from helpline.worker import work

T = TypeVar("T")


def free_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    # proto=IPPROTO_TCP, not the default 0: asyncio sets TCP_NODELAY on accepted connections only when
    # the listening socket says it is TCP; without it every response waits ~40 ms (Nagle + delayed ACK).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    return sock


class LiveServer:
    def __init__(self, settings: Settings, sites: SiteRegistry, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.settings = settings
        self.sites = sites
        self.app = create_app(settings, sites)
        self._sock = free_socket(host, port)
        self.host, self.port = self._sock.getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"
        self.ws_url = f"ws://{self.host}:{self.port}/ws"
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def start(self, timeout: float = 30.0) -> LiveServer:
        config = uvicorn.Config(self.app, log_level="warning", lifespan="on", ws="websockets-sansio")
        self._server = uvicorn.Server(config)

        def run() -> None:
            self.loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self.loop)
            assert self._server is not None
            self.loop.run_until_complete(self._server.serve(sockets=[self._sock]))
            self.loop.close()

        self._thread = threading.Thread(target=run, name=f"helpline-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("helpline server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._sock.close()

    def __enter__(self) -> LiveServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def core(self) -> Core:
        core: Core = self.app.state.core
        return core

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """Run a coroutine on the server's own event loop and return its result."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def create_user(
        self,
        username: str,
        password: str,
        role: str,
        site: str | None = None,
        name: str | None = None,
        extension: str | None = None,
    ) -> Principal:
        return self.call(
            create_user(
                self.core,
                username=username,
                password=password,
                role=Role(role),
                site=site,
                name=name,
                extension=extension,
            )
        )


class LiveWorker:
    """``helpline work`` (PostgreSQL) in a background thread, on its own event loop, until :meth:`stop`."""

    def __init__(self, settings: Settings, sites: SiteRegistry) -> None:
        self.settings = settings
        self.sites = sites
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._ready = threading.Event()

    def start(self, timeout: float = 30.0) -> LiveWorker:
        async def run() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            self._ready.set()
            await work(self.settings, self.sites, self._stop)

        def thread() -> None:
            try:
                asyncio.run(run())
            except BaseException as exc:  # raised again by stop()
                self._error = exc
            finally:
                self._ready.set()

        self._thread = threading.Thread(target=thread, name="helpline-worker", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout) or self._error is not None:
            raise RuntimeError("helpline worker did not start") from self._error
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Set the worker's stop event (as SIGTERM does) and wait until it has stopped."""
        if self._thread is None:
            return
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):  # its loop has closed already: it stopped on its own
                self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise RuntimeError("helpline worker did not stop")
        self._thread = None
        if self._error is not None:
            raise self._error

    def __enter__(self) -> LiveWorker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
