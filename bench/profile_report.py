"""Summarize a ``py-spy record --format raw`` (collapsed stacks) profile as text.

    python -m bench.profile_report bench/profiles/inbound-sqlite.txt [--top 30]

Prints the functions with the most samples on top of the stack (self) and in the stack
(inclusive), plus inclusive figures for a few helpline entry points.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]*)(?::(?P<line>\d+))?\)$")


def _short(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    file = m.group("file")
    for marker in ("site-packages/", "src/", "lib/python3.11/"):
        if marker in file:
            file = file.split(marker, 1)[1]
            break
    return f"{m.group('func')} ({file})"


def load(path: Path) -> list[tuple[list[str], int]]:
    stacks: list[tuple[list[str], int]] = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        stack, _, count = line.rpartition(" ")
        frames = [_short(f) for f in stack.split(";") if f]
        stacks.append((frames, int(count)))
    return stacks


# Frames worth a line of their own (substring match, a stack counted once per marker).
MARKERS = [
    ("SQLite busy handler (sleeping for a lock)", "sqlite3InvokeBusyHandler"),
    ("event loop idle (epoll)", "epoll_pwait"),
    ("aiosqlite: opening a connection (new thread)", "Connection.__await__ (aiosqlite"),
    ("aiosqlite worker threads", "_connection_worker_thread"),
    ("uvicorn access log + logging", "Logger.handle (logging"),
    ("helpline authenticate", "authenticate (helpline"),
    ("helpline inbound (POST /api/chat/'s store)", "(helpline/domain/inbound.py)"),
    ("helpline Hunter", "Hunter."),
    ("helpline OutboxWorker", "OutboxWorker."),
    ("httpx client (RapidPro)", "AsyncClient.send (httpx"),
    ("FastAPI dependency solving", "solve_dependencies (fastapi"),
    ("WebSocket permessage-deflate", "PerMessageDeflate"),
    ("SQLAlchemy ORM flush", "Session._flush (sqlalchemy"),
    ("SQLAlchemy statement compile", "_compile_w_cache (sqlalchemy"),
]


def report(path: Path, top: int = 30) -> str:
    stacks = load(path)
    total = sum(c for _, c in stacks) or 1
    self_c: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    for frames, count in stacks:
        if frames:
            self_c[frames[-1]] += count
            threads[frames[0]] += count
        for f in set(frames):
            incl[f] += count
    out = [f"{path}: {total} samples (non-idle, all threads)", "", "top of stack (self):"]
    out += [f"  {c / total:6.1%}  {f}" for f, c in self_c.most_common(top)]
    out += ["", "inclusive (in the stack):"]
    out += [f"  {c / total:6.1%}  {f}" for f, c in incl.most_common(top * 2)]
    out += ["", "selected frames (inclusive):"]
    for label, needle in MARKERS:
        n = sum(c for frames, c in stacks if any(needle in f for f in frames))
        if n:
            out.append(f"  {n / total:6.1%}  {label}")
    out += ["", "by thread root:"]
    out += [f"  {c / total:6.1%}  {f}" for f, c in threads.most_common(8)]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", type=Path)
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    print(report(args.path, args.top))


if __name__ == "__main__":
    main()
