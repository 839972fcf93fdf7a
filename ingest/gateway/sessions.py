"""Agent sessions held by one gateway, and the presence they imply."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field

from proto import agent_pb2
from yakpanel.pki import NodeIdentity


class QueueFull(Exception):
    """The agent is not draining its commands; the session is closed to resync."""


@dataclass
class Session:
    session_id: str
    identity: NodeIdentity
    serial: str
    queue_size: int
    last_heartbeat: float = field(default_factory=time.monotonic)
    outbox: asyncio.Queue[agent_pb2.GatewayMessage | None] = field(init=False)
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    close_reason: str = ""

    def __post_init__(self) -> None:
        self.outbox = asyncio.Queue(maxsize=self.queue_size)

    def deliver(self, message: agent_pb2.GatewayMessage) -> None:
        try:
            self.outbox.put_nowait(message)
        except asyncio.QueueFull:
            raise QueueFull(self.session_id) from None

    def close(self, reason: str) -> None:
        if not self.closed.is_set():
            self.close_reason = reason
            self.closed.set()
            # Wake the writer so the stream ends now.
            while True:
                try:
                    self.outbox.put_nowait(None)
                    break
                except asyncio.QueueFull:
                    self.outbox.get_nowait()


def new_session_id() -> str:
    return uuid.uuid4().hex


class SessionTable:
    """server_id → the session this gateway holds for it (at most one)."""

    def __init__(self) -> None:
        self._by_server: dict[uuid.UUID, Session] = {}
        # server_id → pending offline announcement for a session that just ended.
        self._grace: dict[uuid.UUID, asyncio.TimerHandle] = {}

    def __len__(self) -> int:
        return len(self._by_server)

    def get(self, server_id: uuid.UUID) -> Session | None:
        return self._by_server.get(server_id)

    def all(self) -> list[Session]:
        return list(self._by_server.values())

    def add(self, session: Session) -> Session | None:
        """Register a session; returns the one it replaces (the same server, reconnected)."""
        server_id = session.identity.server_id
        pending = self._grace.pop(server_id, None)
        if pending is not None:
            pending.cancel()
        previous = self._by_server.get(server_id)
        self._by_server[server_id] = session
        return previous

    def remove(self, session: Session) -> bool:
        current = self._by_server.get(session.identity.server_id)
        if current is session:
            del self._by_server[session.identity.server_id]
            return True
        return False

    def hold_offline(self, server_id: uuid.UUID, handle: asyncio.TimerHandle) -> None:
        old = self._grace.pop(server_id, None)
        if old is not None:
            old.cancel()
        self._grace[server_id] = handle

    def release_offline(self, server_id: uuid.UUID) -> None:
        self._grace.pop(server_id, None)

    def cancel_all(self) -> None:
        for handle in self._grace.values():
            handle.cancel()
        self._grace.clear()
