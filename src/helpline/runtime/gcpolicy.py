"""When Python's garbage collector may pause the event loop.

A full (oldest-generation) collection walks every tracked object: ~100 ms of a busy server's
event loop, at moments Python picks, i.e. under load (it was the tail of bench.inbound's and
bench.scale's latencies). So, once the server has started:

* ``gc.freeze()``: what exists then (the interpreter's, the libraries' and the app's long-lived
  objects) is left out of every later collection;
* full collections happen on a schedule (every ``interval_s``), never by Python's own count. The
  young generations are collected as usual, so short-lived cycles go at once; what survives them
  waits at most ``interval_s`` for its full collection.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable

# Full collections start when this many middle-generation collections have happened: never, in
# practice (a count every few seconds at most would take decades).
_NEVER = 2**31 - 1


def freeze() -> None:
    gc.collect()
    gc.freeze()


def schedule_full_collections() -> Callable[[], None]:
    """Python stops starting full collections; returns the call that restores its thresholds."""
    before = gc.get_threshold()
    gc.set_threshold(before[0], before[1], _NEVER)
    return lambda: gc.set_threshold(*before)


async def run_full_collections(interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        gc.collect()
