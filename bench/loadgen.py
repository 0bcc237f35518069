"""The chatbot's load: ``POST /api/chat/`` from its own process over keep-alive connections.

    python -m bench.loadgen continue --url U --token T --sessions FILE --conns 32 \\
        --warmup 3 --duration 10 --out FILE
    python -m bench.loadgen new --url U --token T --prefix s- --count 500 --rate 100 --out FILE

``continue``: every connection posts back to back to the existing conversations listed in
``--sessions`` (round robin), each with a fresh ``message_id``; the text carries the monotonic
send time (``bench t=<ns> m=<0|1>``, ``m=1`` inside the measured window) so the counselors'
WebSockets can time the POST -> WebSocket hop. Throughput counts the responses completed in
the window of ``--duration`` seconds after ``--warmup``.

``new``: ``--count`` new conversations ``<prefix><i>`` at ``--rate`` per second (0: as fast as
``--conns`` allow); records each one's wall-clock send and answer times.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson

from bench.common import arun, percentiles
from bench.rawhttp import HttpConn


def _target(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 80


async def run_continue(args: argparse.Namespace) -> dict[str, Any]:
    host, port = _target(args.url)
    sessions: list[str] = args.session_list
    headers = {"Authorization": f"Token {args.token}"} if args.token else {}
    counter = itertools.count()
    tag = f"lg{os.getpid()}-"
    statuses: Counter[int] = Counter()
    rtts: list[float] = []
    errors: list[str] = []
    done_in_window = 0
    sent_in_window = 0
    t0 = time.monotonic()
    w0 = t0 + args.warmup
    w1 = w0 + args.duration

    async def worker() -> None:
        nonlocal done_in_window, sent_in_window
        conn = HttpConn(host, port)
        await conn.connect()
        while True:
            start = time.monotonic()
            if start >= w1:
                break
            i = next(counter)
            inside = w0 <= start
            body = {
                "chat_sender": "23343411",
                "chat_message": f"bench t={time.monotonic_ns()} m={int(inside)}",
                "chat_session": sessions[i % len(sessions)],
                "chat_source": "WENI",
            }
            if not args.no_message_id:
                body["message_id"] = f"{tag}{i}"
            try:
                status, _ = await conn.request("POST", args.path, orjson.dumps(body), headers)
            except (ConnectionError, asyncio.IncompleteReadError) as exc:
                errors.append(repr(exc))
                conn.close()
                await asyncio.sleep(0.01)
                continue
            end = time.monotonic()
            statuses[status] += 1
            if inside:
                sent_in_window += 1
                rtts.append((end - start) * 1000)
            if w0 <= end < w1:
                done_in_window += 1
        conn.close()

    await asyncio.gather(*(worker() for _ in range(args.conns)))
    return {
        "mode": "continue",
        "conns": args.conns,
        "warmup_s": args.warmup,
        "duration_s": args.duration,
        "completed_in_window": done_in_window,
        "sent_in_window": sent_in_window,
        "rate": done_in_window / args.duration,
        "statuses": {str(k): v for k, v in statuses.items()},
        "rtt_ms": percentiles(rtts),
        "errors": errors[:20],
        "error_count": len(errors),
    }


async def run_new(args: argparse.Namespace) -> dict[str, Any]:
    host, port = _target(args.url)
    headers = {"Authorization": f"Token {args.token}"} if args.token else {}
    records: list[dict[str, Any]] = []
    t0 = time.monotonic() + 0.05
    todo: asyncio.Queue[int] = asyncio.Queue()
    for i in range(args.count):
        todo.put_nowait(i)

    async def worker() -> None:
        conn = HttpConn(host, port)
        await conn.connect()
        while not todo.empty():
            i = todo.get_nowait()
            if args.rate > 0:
                delay = t0 + i / args.rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            session = f"{args.prefix}{i}"
            body = {
                "chat_sender": str(100000 + i),
                "chat_message": f"hello from {session}",
                "chat_session": session,
                "chat_source": "WENI",
                "message_id": f"{session}-0",
                "contact_urn": f"telegram:{100000 + i}",
                "risk": "low",
            }
            sent = time.time()
            status, data = await conn.request("POST", args.path, orjson.dumps(body), headers)
            records.append({"session": session, "sent": sent, "answered": time.time(), "status": status})
            if status not in (200, 201):
                records[-1]["body"] = data.decode(errors="replace")[:300]
        conn.close()

    start = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(min(args.conns, max(1, args.count)))))
    elapsed = time.monotonic() - start
    statuses = Counter(r["status"] for r in records)
    return {
        "mode": "new",
        "count": args.count,
        "elapsed_s": elapsed,
        "rate": len(records) / elapsed if elapsed else 0.0,
        "statuses": {str(k): v for k, v in statuses.items()},
        "rtt_ms": percentiles([(r["answered"] - r["sent"]) * 1000 for r in records]),
        "records": records,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["continue", "new"])
    ap.add_argument("--url", required=True)
    ap.add_argument("--token", default="")
    ap.add_argument("--path", default="/api/chat/")
    ap.add_argument("--out", required=True)
    ap.add_argument("--conns", type=int, default=32)
    ap.add_argument("--sessions", help="continue: JSON list of chat_session values")
    ap.add_argument("--warmup", type=float, default=3.0)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--no-message-id", action="store_true", help="continue: post without message_id")
    ap.add_argument("--prefix", default="s-")
    ap.add_argument("--count", type=int, default=100)
    ap.add_argument("--rate", type=float, default=0.0)
    args = ap.parse_args()
    args.session_list = json.loads(Path(args.sessions).read_text()) if args.sessions else []
    result = arun(run_continue(args) if args.mode == "continue" else run_new(args))
    Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
