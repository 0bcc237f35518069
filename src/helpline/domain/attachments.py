"""Attachments: URL references carried with a message (both ways), never the files themselves.

A message stores its attachments as a JSON list of ``{"url", "content_type", "filename", "size",
"id", "metadata"}`` (only the keys given). The URL must be ``http(s)``; the declared size may not
exceed ``attachment_max_bytes`` (Weni's default download limit is 10 MB); what a counselor sends must
declare a content type among ``attachment_content_types`` (``image/*``-style patterns). What a
client sends is kept whatever its type: a child's message is never refused for its attachment.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from helpline.config.settings import Settings
from helpline.domain.errors import Invalid

MAX_ATTACHMENTS = 10
URL_MAX = 2048
_TOKEN = r"[a-z0-9][a-z0-9!#$&^_.+-]{0,126}"
_MIME_RE = re.compile(rf"^{_TOKEN}/{_TOKEN}$")
_KEYS = ("id", "url", "content_type", "filename", "size", "metadata")


class AttachmentError(Invalid):
    """An attachment the limits refuse (422)."""

    def __init__(self, code: str, message: str, *, fields: dict[str, Any] | None = None) -> None:
        super().__init__(message, fields=fields)
        self.code = code


def patterns(value: str) -> list[str]:
    """``"image/*,application/pdf"`` -> ``["image/*", "application/pdf"]``."""
    return [p.strip().lower() for p in value.split(",") if p.strip()]


GEO = re.compile(r"^geo:-?\d{1,2}(\.\d+)?,-?\d{1,3}(\.\d+)?([,;]\S*)?$")
"""A shared location as RapidPro writes it (RFC 5870): ``geo:-2.9,-79.0``."""


def is_location(url: str) -> bool:
    return GEO.match(url) is not None


def _is_web(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def type_allowed(content_type: str, allowed: Iterable[str]) -> bool:
    major = content_type.split("/", 1)[0]
    return any(p in ("*", "*/*", content_type) or p == f"{major}/*" for p in allowed)


def normalize(
    items: Sequence[Mapping[str, Any]], *, max_bytes: int, allowed_types: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """Check a list of attachments against the limits and return it cleaned (known keys only).

    ``allowed_types`` given: every attachment must declare one of them (what counselors send).
    Raises :class:`AttachmentError` (``invalid_attachment``, ``attachment_too_large``,
    ``unsupported_attachment``, ``too_many_attachments``).
    """
    if len(items) > MAX_ATTACHMENTS:
        raise AttachmentError(
            "too_many_attachments",
            f"at most {MAX_ATTACHMENTS} attachments per message",
            fields={"attachments": [f"at most {MAX_ATTACHMENTS}"]},
        )
    out: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        where = f"attachments.{i}"
        url = item.get("url")
        if not (isinstance(url, str) and len(url) <= URL_MAX and (is_location(url) or _is_web(url))):
            scheme = urlsplit(url).scheme if isinstance(url, str) else ""
            got = f" ({scheme}: is not one)" if scheme and scheme not in ("http", "https", "geo") else ""
            raise AttachmentError(
                "invalid_attachment",
                f"attachment {i}: the url must be an http(s) URL or a geo: location of at most "
                f"{URL_MAX} characters{got}",
                fields={f"{where}.url": ["an http(s) URL or geo:LAT,LON"]},
            )
        clean: dict[str, Any] = {k: item[k] for k in _KEYS if item.get(k) is not None}
        ctype = clean.get("content_type")
        if ctype is not None:
            ctype = str(ctype).split(";", 1)[0].strip().lower()
            if not _MIME_RE.match(ctype) and not (ctype == "geo" and is_location(url)):  # RapidPro's location
                raise AttachmentError(
                    "invalid_attachment",
                    f"attachment {i}: {clean['content_type']!r} is not a content type",
                    fields={f"{where}.content_type": ["a type/subtype content type"]},
                )
            clean["content_type"] = ctype
        if allowed_types is not None and (ctype is None or not type_allowed(ctype, allowed_types)):
            raise AttachmentError(
                "unsupported_attachment",
                f"attachment {i}: content type {ctype!r} is not allowed (allowed: {', '.join(allowed_types)})",
                fields={f"{where}.content_type": [f"one of {', '.join(allowed_types)}"]},
            )
        size = clean.get("size")
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
            raise AttachmentError(
                "invalid_attachment",
                f"attachment {i}: size must be a whole number of bytes",
                fields={f"{where}.size": ["bytes"]},
            )
        if size is not None and size > max_bytes:
            raise AttachmentError(
                "attachment_too_large",
                f"attachment {i} has {size} bytes; the limit is {max_bytes}",
                fields={f"{where}.size": [f"at most {max_bytes} bytes"], "max_bytes": max_bytes},
            )
        out.append(clean)
    return out


def dumps(items: Sequence[Mapping[str, Any]]) -> str | None:
    """The stored form: a JSON list, or ``None`` for no attachment."""
    return json.dumps(list(items), ensure_ascii=False) if items else None


def loads(stored: str | None) -> list[dict[str, Any]]:
    if not stored:
        return []
    value = json.loads(stored)
    return [dict(v) for v in value] if isinstance(value, list) else []


def from_counselor(items: Sequence[Mapping[str, Any]], settings: Settings) -> list[dict[str, Any]]:
    """A counselor's attachments, checked against the size limit and the allowed content types."""
    return normalize(
        items,
        max_bytes=settings.attachment_max_bytes,
        allowed_types=patterns(settings.attachment_content_types),
    )
