"""Waiting in tests: the one way to poll until something happens, or to check it keeps not happening.

The tests drive a live server over real sockets, so what they check happens a little later than
what they did. They wait for it with these helpers, never with a hand-written loop. On timeout each
raises AssertionError saying what was awaited and for how long, so a test that waits still fails,
and says why. An exception raised by a condition (an assertion too) ends the wait at once.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

from helpline.testing.fake_counselor import FakeCounselor

T = TypeVar("T")
Event = dict[str, Any]
Pred = Callable[[Event], bool]
Message = str | Callable[[], str]  # what is awaited; a function is asked only when the time is up


def _text(message: Message) -> str:
    return message() if callable(message) else message


async def wait_until(
    condition: Callable[[], T | Awaitable[T | None] | None],
    *,
    timeout: float = 5.0,  # noqa: ASYNC109  (asyncio.timeout's TimeoutError would not say what was awaited)
    interval: float = 0.02,
    message: Message = "the condition",
) -> T:
    """Call ``condition`` (sync or async) every ``interval`` until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout
    while True:
        found = condition()
        if inspect.isawaitable(found):
            found = await found
        if found:
            return cast(T, found)
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {_text(message)}")
        await asyncio.sleep(interval)


def wait_until_sync(
    condition: Callable[[], T | None],
    *,
    timeout: float = 5.0,
    interval: float = 0.02,
    message: Message = "the condition",
) -> T:
    """:func:`wait_until` for a test that is not async (it blocks its thread while it waits)."""
    deadline = time.monotonic() + timeout
    while True:
        found = condition()
        if found:
            return found
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {_text(message)}")
        time.sleep(interval)


def holds_for(
    condition: Callable[[], object], within: float, *, interval: float = 0.02, message: Message = "the condition"
) -> None:
    """Assert ``condition`` stays truthy for ``within`` seconds: checked every ``interval``, and at the end."""
    started = time.monotonic()
    deadline = started + within
    while True:
        if not condition():
            raise AssertionError(f"{_text(message)}, {time.monotonic() - started:.2f}s into {within}s")
        left = deadline - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(interval, left))


def eventually(check: Callable[[], T], timeout: float = 10.0) -> T:
    """Retry ``check`` (which asserts) until it passes, and return what it returned. If the time is
    up first, its last AssertionError is raised, caused by the timeout."""
    failed: list[AssertionError] = []

    def passes() -> tuple[T] | None:
        try:
            return (check(),)
        except AssertionError as exc:
            failed[:] = [exc]
            return None

    try:
        return wait_until_sync(passes, timeout=timeout, interval=0.05, message=f"{check.__qualname__} to pass")[0]
    except AssertionError as timed_out:
        raise failed[-1] from timed_out


# --------------------------------------------------------------------------- counselors' WebSockets


def find(c: FakeCounselor, type_: str, pred: Pred | None = None) -> Event | None:
    """The first event of ``type_`` (matching ``pred``) this counselor's WebSocket received so far."""
    return next((e for e in c.of_type(type_) if pred is None or pred(e)), None)


def wait_event(c: FakeCounselor, type_: str, pred: Pred | None = None, timeout: float = 5.0) -> Event:
    """The first event of ``type_`` (matching ``pred``) this counselor's WebSocket ever received."""

    def seen() -> str:
        return f"a {type_!r} event to {c.username}; saw {[(e.get('type'), e.get('reason')) for e in c.events]}"

    return wait_until_sync(lambda: find(c, type_, pred), timeout=timeout, interval=0.01, message=seen)


def assert_no_event(c: FakeCounselor, type_: str, pred: Pred | None = None, *, within: float) -> None:
    """No event of ``type_`` (matching ``pred``) reaches this counselor for ``within`` seconds."""
    holds_for(
        lambda: find(c, type_, pred) is None,
        within,
        message=lambda: f"{c.username} got an unexpected {type_!r}: {find(c, type_, pred)}",
    )
