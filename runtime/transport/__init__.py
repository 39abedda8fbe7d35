"""Transport between cameras and the pipeline, behind a small protocol.

The pipeline and the orchestrator see only :class:`FrameReceiver` (raw multipart messages
in) and :class:`MessageSender` (multipart messages out); the ZeroMQ implementation is in
:mod:`.sockets` (``Receiver`` / ``Sender``), the wire format in :mod:`.wire`. Another
transport (a shared-memory ring) implements the same two methods.
"""

from __future__ import annotations

from typing import Protocol


class FrameReceiver(Protocol):
    def drain(self, timeout_ms: int | None = None, limit: int = 1000) -> list[list]:
        """Everything queued now, waiting up to ``timeout_ms`` for the first message."""

    def close(self) -> None: ...


class MessageSender(Protocol):
    def send(self, parts: list) -> bool:
        """True when queued; False when a live link dropped it; every_part raises TimeoutError."""

    def close(self) -> None: ...


__all__ = ["FrameReceiver", "MessageSender"]
