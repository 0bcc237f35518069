"""A counselor client: REST calls plus a live WebSocket whose events are collected in a thread."""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

Event = dict[str, Any]


class FakeCounselor:
    def __init__(self, base_url: str, username: str, password: str) -> None:
        self.base_url = base_url
        self.http = httpx.Client(base_url=base_url, timeout=30)
        self.username = username
        self.password = password
        self.token: str | None = None
        self.events: list[Event] = []
        self._inbox: queue.Queue[Event] = queue.Queue()
        self._ws: ClientConnection | None = None
        self._reader: threading.Thread | None = None
        self._lock = threading.Lock()

    # -- session --------------------------------------------------------------------------------
    def login(self) -> str:
        r = self.http.post("/api/token/", json={"username": self.username, "password": self.password})
        r.raise_for_status()
        self.token = str(r.json()["token"])
        self.http.headers["Authorization"] = f"Token {self.token}"
        return self.token

    def connect(self) -> Event:
        """Open ``/ws`` with the token and return the ``hello`` event."""
        ws_url = self.base_url.replace("http://", "ws://") + f"/ws?token={self.token}"
        opened = threading.Event()
        failure: list[BaseException] = []

        def read() -> None:
            try:
                with connect(ws_url, open_timeout=10) as ws:
                    self._ws = ws
                    opened.set()
                    for raw in ws:
                        event = json.loads(raw)
                        with self._lock:
                            self.events.append(event)
                        self._inbox.put(event)
            except ConnectionClosed:
                pass
            except Exception as exc:  # surfaced to connect()'s caller
                failure.append(exc)
            finally:
                opened.set()

        self._reader = threading.Thread(target=read, name=f"ws-{self.username}", daemon=True)
        self._reader.start()
        opened.wait(15)
        if failure:
            raise failure[0]
        return self.wait_for("hello")

    def disconnect(self) -> None:
        if self._ws is not None:
            self._ws.close()
        if self._reader is not None:
            self._reader.join(timeout=5)
        self._ws = None

    def close_all(self) -> None:
        self.disconnect()
        self.http.close()

    # -- events ---------------------------------------------------------------------------------
    def wait_for(self, type_: str, predicate: Callable[[Event], bool] | None = None, timeout: float = 10.0) -> Event:
        """The next event of ``type_`` (matching ``predicate``); earlier non-matching ones are skipped."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                with self._lock:
                    seen = [e.get("type") for e in self.events]
                raise TimeoutError(f"{self.username}: no {type_!r} event within {timeout}s; saw {seen}")
            try:
                event = self._inbox.get(timeout=left)
            except queue.Empty:
                continue
            if event.get("type") == type_ and (predicate is None or predicate(event)):
                return event

    def of_type(self, type_: str) -> list[Event]:
        with self._lock:
            return [e for e in self.events if e.get("type") == type_]

    # -- REST -----------------------------------------------------------------------------------
    def presence(self, status: str, reason: str | None = None) -> httpx.Response:
        return self.http.put("/api/agents/me/presence", json={"status": status, "reason": reason})

    def join_queue(self) -> httpx.Response:
        return self.presence("available")

    def read_offer(self, offer_id: int) -> httpx.Response:
        return self.http.post(f"/api/offers/{offer_id}/read")

    def decline_offer(self, offer_id: int) -> httpx.Response:
        return self.http.post(f"/api/offers/{offer_id}/decline")

    def reply(self, conversation_id: str, text: str) -> httpx.Response:
        return self.http.post(f"/api/conversations/{conversation_id}/messages/", json={"text": text})

    def mark_read(self, conversation_id: str) -> httpx.Response:
        return self.http.post(f"/api/conversations/{conversation_id}/read/")

    def close(self, conversation_id: str, reason: str = "resolved") -> httpx.Response:
        return self.http.post(f"/api/conversations/{conversation_id}/close/", json={"reason": reason})

    def messages(self, conversation_id: str) -> httpx.Response:
        return self.http.get(f"/api/conversations/{conversation_id}/messages/")
