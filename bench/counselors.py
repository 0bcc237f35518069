"""Counselors in their own process: one WebSocket each, offers read (or left to lapse), timings.

    python -m bench.counselors --url http://127.0.0.1:P --users users.json [--pool 8]

``users.json`` is a list of ``{"username", "token", "site", "read", ...}`` (see
``bench.common.write_users``). At start every counselor opens ``/ws?token=...``, then joins the
queue (``PUT /api/agents/me/presence``); the process prints ``{"event": "ready", ...}``.

While running it:

* reads each ``offer`` at once (``POST /api/offers/<id>/read``) when its user has ``read``;
* records every ``offer`` and ``offer_withdrawn`` event with its wall-clock arrival time;
* times every client message ``bench t=<ns> m=1`` from the load generator: monotonic arrival
  minus the monotonic send time in the text (one machine, one ``CLOCK_MONOTONIC``).

It is driven by JSON lines on stdin, answering each with one JSON line on stdout:
``status``, ``latency`` (``"reset": true`` to start a new sample), ``dump`` (``"path"``),
``clear``, ``quit``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from bench.common import arun, percentiles
from bench.rawhttp import HttpPool


def epoch(iso: str) -> float:
    return datetime.datetime.fromisoformat(iso).timestamp()


@dataclass
class State:
    connected: int = 0
    disconnects: int = 0
    offers: list[dict[str, Any]] = field(default_factory=list)
    withdrawn: list[dict[str, Any]] = field(default_factory=list)
    reads: Counter[int] = field(default_factory=Counter)
    read_errors: int = 0
    events: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)  # ms, messages with m=1
    messages_m1: int = 0

    def status(self) -> dict[str, Any]:
        return {
            "connected": self.connected,
            "disconnects": self.disconnects,
            "offers": len(self.offers),
            "withdrawn": len(self.withdrawn),
            "reads_ok": self.reads.get(200, 0),
            "reads": {str(k): v for k, v in self.reads.items()},
            "read_errors": self.read_errors,
            "events": dict(self.events),
            "messages_m1": self.messages_m1,
        }


class Runner:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        parts = urlsplit(args.url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.ws_base = f"ws://{self.host}:{self.port}/ws?token="
        self.users: list[dict[str, Any]] = json.loads(Path(args.users).read_text())
        self.pool = HttpPool(self.host, self.port, args.pool)
        self.st = State()
        self.tasks: set[asyncio.Task[Any]] = set()
        self._all_connected = asyncio.Event()
        self._connect_gate = asyncio.Semaphore(args.connect_concurrency)

    def spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def read_offer(self, token: str, offer_id: int) -> None:
        try:
            status, _ = await self.pool.request(
                "POST", f"/api/offers/{offer_id}/read", b"", {"Authorization": f"Token {token}"}
            )
            self.st.reads[status] += 1
        except (ConnectionError, asyncio.IncompleteReadError):
            self.st.read_errors += 1

    async def counselor(self, user: dict[str, Any]) -> None:
        st = self.st
        compression = None if self.args.no_compression else "deflate"
        async with self._connect_gate:
            ws = await connect(self.ws_base + user["token"], compression=compression, max_size=None, open_timeout=60)
            await ws.recv()  # hello
        st.connected += 1
        if st.connected == len(self.users):
            self._all_connected.set()
        try:
            async for raw in ws:
                arrived_ns = time.monotonic_ns()
                wall = time.time()
                ev = orjson.loads(raw)
                kind = ev.get("type", "?")
                st.events[kind] += 1
                if kind == "message":
                    text = ev["message"]["text"]
                    if text.startswith("bench t=") and text.endswith("m=1"):
                        sent_ns = int(text[8:].split(" ", 1)[0])
                        st.latencies.append((arrived_ns - sent_ns) / 1e6)
                        st.messages_m1 += 1
                elif kind == "offer":
                    offer = ev["offer"]
                    conv = offer["conversation"]
                    st.offers.append(
                        {
                            "offer_id": offer["id"],
                            "user": user["username"],
                            "site": conv["site"],
                            "session": conv["chat_session"],
                            "conversation_id": conv["id"],
                            "queued_at": epoch(conv["queued_at"]),
                            "created_at": epoch(offer["created_at"]),
                            "deadline": epoch(offer["deadline"]),
                            "arrived": wall,
                        }
                    )
                    if user.get("read", True):
                        self.spawn(self.read_offer(user["token"], offer["id"]))
                elif kind == "offer_withdrawn":
                    st.withdrawn.append(
                        {
                            "offer_id": ev["offer_id"],
                            "user": user["username"],
                            "conversation_id": ev["conversation_id"],
                            "reason": ev.get("reason"),
                            "arrived": wall,
                        }
                    )
        except ConnectionClosed:
            pass
        finally:
            st.disconnects += 1
            await ws.close()

    async def join_queue(self, user: dict[str, Any]) -> None:
        status, body = await self.pool.request(
            "PUT",
            "/api/agents/me/presence",
            b'{"status":"available"}',
            {"Authorization": f"Token {user['token']}"},
        )
        if status != 200:
            raise RuntimeError(f"presence for {user['username']}: {status} {body[:200]!r}")

    async def command(self, cmd: dict[str, Any]) -> dict[str, Any] | None:
        st = self.st
        name = cmd.get("cmd")
        if name == "status":
            return st.status()
        if name == "latency":
            out = {"latency_ms": percentiles(st.latencies), "messages_m1": st.messages_m1}
            if cmd.get("reset"):
                st.latencies = []
                st.messages_m1 = 0
            return out
        if name == "dump":
            data = json.dumps({"offers": st.offers, "withdrawn": st.withdrawn})
            await asyncio.to_thread(Path(cmd["path"]).write_text, data)
            return {"offers": len(st.offers), "withdrawn": len(st.withdrawn)}
        if name == "clear":
            st.offers, st.withdrawn = [], []
            return {"ok": True}
        if name == "quit":
            return None
        return {"error": f"unknown command {name!r}"}

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        for user in self.users:
            self.spawn(self.counselor(user))
        await asyncio.wait_for(self._all_connected.wait(), timeout=self.args.connect_timeout)
        connected_s = time.monotonic() - started
        for i in range(0, len(self.users), 50):
            await asyncio.gather(*(self.join_queue(u) for u in self.users[i : i + 50]))
        emit({"event": "ready", "connected": self.st.connected, "connect_s": connected_s})

        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while True:
            line = await reader.readline()
            if not line:
                break
            answer = await self.command(json.loads(line))
            if answer is None:
                emit({"ok": True})
                break
            emit(answer)
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True)
    ap.add_argument("--users", required=True)
    ap.add_argument("--pool", type=int, default=8, help="HTTP connections for offer reads and presence")
    ap.add_argument("--connect-concurrency", type=int, default=50)
    ap.add_argument("--connect-timeout", type=float, default=300.0)
    ap.add_argument("--no-compression", action="store_true", help="do not offer permessage-deflate")
    args = ap.parse_args()
    arun(Runner(args).run())


if __name__ == "__main__":
    main()
