"""A minimal HTTP/1.1 keep-alive client on asyncio streams, so the load generator costs little CPU.

Only what the benchmarks need: one request at a time per connection, ``Content-Length`` (or
chunked) responses, a reconnect when a reused connection turns out to be closed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping


class HttpConn:
    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._host_line = f"Host: {host}:{port}\r\n".encode()

    async def connect(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port, limit=1 << 20)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None

    async def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, bytes]:
        """Send one request and return ``(status, body)``; reconnects once if the kept-alive
        connection was closed by the server before it answered anything."""
        reused = self._writer is not None
        try:
            return await self._request(method, path, body, headers)
        except (ConnectionError, asyncio.IncompleteReadError):
            self.close()
            if not reused:
                raise
            return await self._request(method, path, body, headers)

    async def _request(
        self, method: str, path: str, body: bytes | None, headers: Mapping[str, str] | None
    ) -> tuple[int, bytes]:
        if self._writer is None:
            await self.connect()
        assert self._reader is not None and self._writer is not None
        head = [f"{method} {path} HTTP/1.1\r\n".encode(), self._host_line]
        if headers:
            head.append("".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode())
        if body is not None:
            head.append(b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body))
        head.append(b"\r\n")
        if body is not None:
            head.append(body)
        self._writer.write(b"".join(head))
        raw = await self._reader.readuntil(b"\r\n\r\n")
        status = int(raw[9:12])
        lower = raw.lower()
        i = lower.find(b"\r\ncontent-length:")
        if i >= 0:
            j = lower.index(b"\r\n", i + 2)
            n = int(lower[i + 17 : j])
            data = await self._reader.readexactly(n) if n else b""
        elif b"transfer-encoding: chunked" in lower:
            chunks = []
            while True:
                size = int((await self._reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
                if size == 0:
                    await self._reader.readuntil(b"\r\n")
                    break
                chunks.append(await self._reader.readexactly(size))
                await self._reader.readexactly(2)
            data = b"".join(chunks)
        else:
            data = b""
        if b"\r\nconnection: close" in lower:
            self.close()
        return status, data


class HttpPool:
    """A fixed number of keep-alive connections shared by many tasks."""

    def __init__(self, host: str, port: int, size: int) -> None:
        self._free: asyncio.Queue[HttpConn] = asyncio.Queue()
        for _ in range(size):
            self._free.put_nowait(HttpConn(host, port))

    async def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, bytes]:
        conn = await self._free.get()
        try:
            return await conn.request(method, path, body, headers)
        except BaseException:
            conn.close()
            raise
        finally:
            self._free.put_nowait(conn)
