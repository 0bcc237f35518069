"""A chatbot client of the OpenCHS-style API, as Weni's flows call it (real HTTP on loopback)."""

from __future__ import annotations

import uuid
from typing import Any

import httpx


class FakeChatbot:
    def __init__(
        self, base_url: str, username: str, password: str, *, prefix: str = "/api", source: str = "WENI"
    ) -> None:
        self.http = httpx.Client(base_url=base_url, timeout=30)
        self.username = username
        self.password = password
        self.prefix = prefix
        self.source = source
        self.token: str | None = None

    def login(self) -> str:
        r = self.http.post(f"{self.prefix}/token/", json={"username": self.username, "password": self.password})
        r.raise_for_status()
        self.token = str(r.json()["token"])
        self.http.headers["Authorization"] = f"Token {self.token}"
        return self.token

    def send(
        self,
        chat_session: str,
        text: str,
        *,
        sender: str | int = "23343411",
        message_id: str | None = None,
        **extra: Any,
    ) -> httpx.Response:
        body: dict[str, Any] = {
            "chat_sender": sender,
            "chat_message": text,
            "chat_session": chat_session,
            "chat_source": self.source,
            "message_id": message_id or str(uuid.uuid4()),
            **extra,
        }
        return self.http.post(f"{self.prefix}/chat/", json=body)

    def close(self, chat_session: str) -> httpx.Response:
        return self.http.post(f"{self.prefix}/chat/{chat_session}/close/", json={"chat_source": self.source})

    def ack(self, chat_session: str, message_id: str, status: str) -> httpx.Response:
        return self.http.post(
            f"{self.prefix}/chat/{chat_session}/ack/", json={"message_id": message_id, "status": status}
        )

    def messages(self, chat_session: str) -> httpx.Response:
        return self.http.get(f"{self.prefix}/chat/{chat_session}/messages/")

    def chats(self, **params: Any) -> httpx.Response:
        return self.http.get(f"{self.prefix}/chat/", params=params)

    def aclose(self) -> None:
        self.http.close()
