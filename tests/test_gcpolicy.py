"""The garbage collector's schedule (helpline.runtime.gcpolicy): full collections when we say, not under load."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from typing import Any

from helpline.runtime import gcpolicy
from support import wait_until


def test_full_collections_run_on_the_schedule_and_never_on_pythons_count() -> None:
    full: list[float] = []

    def seen(phase: str, info: dict[str, Any]) -> None:
        if phase == "start" and info["generation"] == 2:
            full.append(1.0)

    before = gc.get_threshold()
    gc.callbacks.append(seen)
    restore = gcpolicy.schedule_full_collections()
    try:
        assert gc.get_threshold()[:2] == before[:2] and gc.get_threshold()[2] > 10**9
        # Plenty of young collections (cycles made and dropped), and no full one of Python's own.
        for _ in range(200_000):
            a: list[Any] = []
            a.append(a)
        assert full == []

        async def two_rounds() -> None:
            task = asyncio.create_task(gcpolicy.run_full_collections(0.05))
            try:  # a full collection of a big test process can take a while
                await wait_until(lambda: len(full) >= 2, timeout=20, interval=0.05, message="two full collections")
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

        asyncio.run(two_rounds())
        assert len(full) >= 2  # the schedule's own, every 0.05 s
    finally:
        restore()
        gc.callbacks.remove(seen)
    assert gc.get_threshold() == before
