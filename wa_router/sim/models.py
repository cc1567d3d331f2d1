"""Value objects of the simulated instance and the fake WhatsApp identifiers it hands out."""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, overload

# Statuses as Blazz spells them (lowercase; upper-case ones belong to WAHA).
QR_SCANNING = "qr_scanning"
AUTHENTICATED = "authenticated"
CONNECTED = "connected"
DISCONNECTED = "disconnected"
ERROR = "error"


@dataclass
class SimSession:
    session_id: str
    workspace_id: int | str = 1
    status: str = QR_SCANNING
    phone_number: str | None = None
    connected_at: str | None = None
    last_activity: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """The shape of one entry of `GET /api/sessions`."""
        return {
            "session_id": self.session_id,
            "workspace_id": self.workspace_id,
            "status": self.status,
            "phone_number": self.phone_number,
            "connected_at": self.connected_at,
        }


class Headers(dict[str, str]):
    """Header names kept as the client sent them; lookups ignore case (RFC 9110 §5.1),
    so a test can ask for `X-Forwarded-For` whatever casing the router used."""

    def _key(self, name: object) -> object:
        if isinstance(name, str) and not super().__contains__(name):
            lowered = name.lower()
            for key in self:
                if key.lower() == lowered:
                    return key
        return name

    def __getitem__(self, name: str) -> str:
        return super().__getitem__(str(self._key(name)))

    def __contains__(self, name: object) -> bool:
        return super().__contains__(self._key(name))

    @overload
    def get(self, name: str, default: None = None, /) -> str | None: ...
    @overload
    def get(self, name: str, default: str, /) -> str: ...
    @overload
    def get(self, name: str, default: Any, /) -> Any: ...
    def get(self, name: str, default: Any = None, /) -> Any:
        return super().get(str(self._key(name)), default)


@dataclass(frozen=True)
class Received:
    """One request as it arrived (recorded before any simulated delay or hang)."""

    method: str
    path: str
    query: dict[str, str]
    json: Any | None  # the parsed body; None when empty or not JSON
    headers: dict[str, str]  # a `Headers`: case-insensitive lookups


def now_iso() -> str:
    """`new Date().toISOString()`: UTC, milliseconds, a `Z`."""
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def fake_phone(session_id: str) -> str:
    """A stable Indonesian-looking number per session id (Blazz's users are mostly +62)."""
    digits = int(hashlib.sha256(session_id.encode()).hexdigest()[:12], 16) % 10**10
    return f"628{digits:010d}"


def fake_qr(session_id: str) -> str:
    return f"2@{uuid.uuid4().hex}{uuid.uuid4().hex},{session_id},sim=="


def new_message_id(recipient_phone: str) -> str:
    """whatsapp-web.js `msg.id._serialized` shape: fromMe_chatId_messageId."""
    return f"true_{recipient_phone}@c.us_3EB0{uuid.uuid4().hex[:16].upper()}"
