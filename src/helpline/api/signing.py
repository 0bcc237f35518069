"""Signed inbound requests: HMAC-SHA256 over a timestamp, the method, the target and the raw body.

A chatbot account may hold a signing secret (``helpline signing-secret``). Then every request it
authenticates with its token carries two headers::

    X-Helpline-Timestamp: 1764000000.123
    X-Helpline-Signature: sha256=<hex HMAC-SHA256(secret, signed_bytes(...))>

where the signed bytes are ``"<timestamp>\\n<METHOD>\\n<path?query>\\n"`` followed by the raw body
bytes (nothing for a bodyless request). The first three parts hold no newline (an HTTP request line
cannot), so the string parses one way only: a signature made for one method, path, query or body is
worth nothing for another. The key is the secret's UTF-8 bytes, exactly as printed by the CLI.

The timestamp is unix seconds, an integer or with up to 6 decimals; it must be within ``tolerance``
of the server's clock. A valid signature is accepted once: the :class:`ReplayCache` remembers it
until its timestamp leaves the tolerance window, after which the timestamp alone refuses it. So two
identical requests (a poll, a retry) need two timestamps: milliseconds, as :func:`signature_headers`
writes them, keep them apart. The cache is one instance's memory; on PostgreSQL the caller then
claims the signature for every instance (``helpline.domain.signatures``), with :func:`replayed`
when another instance had it first.

Pure functions and one small class: no web framework here (``helpline.api.deps`` wires it in).
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import re
from collections.abc import Iterable, Mapping
from typing import Any

TIMESTAMP_HEADER = "X-Helpline-Timestamp"
SIGNATURE_HEADER = "X-Helpline-Signature"
SCHEME = "sha256="
DEFAULT_TOLERANCE_S = 300.0

_TIMESTAMP = re.compile(r"[0-9]{1,12}(?:\.[0-9]{1,6})?")
_SIGNATURE = re.compile(r"sha256=([0-9a-fA-F]{64})")


class SignatureError(Exception):
    """A request a signing account sent without a valid, fresh, first-seen signature.

    ``code`` is the error code the API answers with (status 401): ``signature_required``,
    ``bad_signature``, ``stale_timestamp`` or ``replayed``.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def signed_bytes(timestamp: str, method: str, target: str, body: bytes) -> bytes:
    """What is signed: ``"<timestamp>\\n<METHOD>\\n<path?query>\\n" + body``."""
    return f"{timestamp}\n{method.upper()}\n{target}\n".encode() + body


def sign(secret: str, timestamp: str, method: str, target: str, body: bytes = b"") -> str:
    """The ``X-Helpline-Signature`` value: ``sha256=<64 lowercase hex>``."""
    mac = hmac.new(secret.encode(), signed_bytes(timestamp, method, target, body), hashlib.sha256)
    return SCHEME + mac.hexdigest()


def signature_headers(secret: str, method: str, target: str, body: bytes = b"", *, at: float) -> dict[str, str]:
    """Both headers for a request made at ``at`` (unix seconds, written to the millisecond)."""
    timestamp = f"{at:.3f}"
    return {TIMESTAMP_HEADER: timestamp, SIGNATURE_HEADER: sign(secret, timestamp, method, target, body)}


def target_of(scope: Mapping[str, Any]) -> str:
    """The request target as the client sent it: the raw path, then ``?query`` when there is one.

    ASGI's ``raw_path`` (undecoded, without the query) when the server gives it, else ``path``.
    """
    raw = scope.get("raw_path")
    path = raw.decode("latin-1") if isinstance(raw, bytes) and raw else str(scope.get("path", ""))
    query = scope.get("query_string", b"")
    if isinstance(query, bytes) and query:
        return f"{path}?{query.decode('latin-1')}"
    return path


def verify(
    secrets: Iterable[str],
    *,
    timestamp: str | None,
    signature: str | None,
    method: str,
    target: str,
    body: bytes,
    now: float,
    tolerance: float = DEFAULT_TOLERANCE_S,
) -> tuple[str, float]:
    """Check one request against the account's secret(s) (the new one, and the previous one while rotating).

    Returns ``(digest, until)``: the signature's lowercase hex, and the time until which it must be
    remembered to refuse a replay (the end of its timestamp's window). Raises :class:`SignatureError`.
    The replay check itself is the caller's (:class:`ReplayCache`), after this one has passed: only
    genuine signatures are remembered.
    """
    if not timestamp or not signature:
        missing = [name for name, value in ((TIMESTAMP_HEADER, timestamp), (SIGNATURE_HEADER, signature)) if not value]
        raise SignatureError("signature_required", f"this account signs its requests: {' and '.join(missing)} missing")
    timestamp = timestamp.strip()
    if not _TIMESTAMP.fullmatch(timestamp):
        raise SignatureError("bad_signature", f"{TIMESTAMP_HEADER} must be unix seconds")
    at = float(timestamp)
    if abs(now - at) > tolerance:
        raise SignatureError(
            "stale_timestamp",
            f"{TIMESTAMP_HEADER} is {now - at:+.0f} s from the server's clock (tolerance {tolerance:g} s)",
        )
    found = _SIGNATURE.fullmatch(signature.strip())
    if found is None:
        raise SignatureError("bad_signature", f"{SIGNATURE_HEADER} must be 'sha256=<64 hex digits>'")
    given = found.group(1).lower()
    ok = False
    for secret in secrets:
        expected = sign(secret, timestamp, method, target, body).removeprefix(SCHEME)
        # Every secret is tried (no early exit): the time taken tells nothing about which matched.
        ok |= hmac.compare_digest(expected, given)
    if not ok:
        raise SignatureError("bad_signature", "the signature does not match this request")
    return given, at + tolerance


def replay_key(account: str, digest: str) -> str:
    """What identifies one accepted signature: ``"<account>:<lowercase hex digest>"``."""
    return f"{account}:{digest}"


def replayed() -> SignatureError:
    """The error for a signature already accepted (by this instance or, on PostgreSQL, another one)."""
    return SignatureError("replayed", "this signature was already used: sign each request afresh")


class ReplayCache:
    """Signatures already accepted, each until the end of its timestamp's window (one per instance).

    In memory: a dict for the lookups and a heap of expiries, so forgetting old entries costs
    ``O(log n)`` each, spread over the calls. Its size is bounded by the signed traffic of one
    tolerance window (only valid signatures enter).
    """

    def __init__(self) -> None:
        self._until: dict[str, float] = {}
        self._expiries: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._until)

    def _forget(self, now: float) -> None:
        while self._expiries and self._expiries[0][0] < now:
            until, key = heapq.heappop(self._expiries)
            if self._until.get(key) == until:
                del self._until[key]

    def seen(self, key: str, until: float, now: float) -> bool:
        """Whether ``key`` was already accepted (a replay); if not, remember it until ``until``.

        Check and record in one step with no ``await`` between: under asyncio two copies of one
        request sent at once cannot both pass.
        """
        self._forget(now)
        if key in self._until:
            return True
        self._until[key] = until
        heapq.heappush(self._expiries, (until, key))
        return False

    def discard(self, key: str) -> None:
        """Forget ``key`` at once: its request was not accepted after all (the shared claim failed).

        Its heap entry stays until it expires; :meth:`_forget` then finds no matching entry.
        """
        self._until.pop(key, None)


def check(
    cache: ReplayCache,
    secrets: Iterable[str],
    *,
    account: str,
    timestamp: str | None,
    signature: str | None,
    method: str,
    target: str,
    body: bytes,
    now: float,
    tolerance: float = DEFAULT_TOLERANCE_S,
) -> tuple[str, float]:
    """:func:`verify`, then refuse a signature ``account`` has already used here (``replayed``).

    Returns ``(key, until)``: the signature's :func:`replay_key`, now in ``cache``, and the end of its
    window, for the caller's claim across instances (PostgreSQL).
    """
    digest, until = verify(
        secrets,
        timestamp=timestamp,
        signature=signature,
        method=method,
        target=target,
        body=body,
        now=now,
        tolerance=tolerance,
    )
    key = replay_key(account, digest)
    if cache.seen(key, until, now):
        raise replayed()
    return key, until
