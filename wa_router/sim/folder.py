"""The shared session folder of Blazz's PM2 setup, seen from the simulated instances.

In production the four PM2 processes share `./sessions/{workspace}/{session}` (LocalAuth).
Two facts about it matter around restarts, and only those are modelled:

- **Saved login.** Once a session has been connected, its login data is on disk, so any
  instance that creates the session again logs in without a QR. Logout (a DELETE on the
  holder) removes it, and so does a DELETE on an instance that does *not* hold the session:
  Node deletes the folder of a session it does not know, which is the owner's login.
- **One WhatsApp Web login, one live client.** When a second copy of a session becomes
  connected, WhatsApp drops the older one (reason CONFLICT) a moment later: "the last
  `session_ready` wins". The folder remembers which instance's copy connected last, so the
  newcomer can tell the previous one to go.

One `SessionFolder` is passed to several `SimInstance(folder=...)`; without one an instance
behaves as before (nothing saved, no takeover).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .instance import SimInstance


class SessionFolder:
    def __init__(self, *, conflict_delay_s: float = 1.0) -> None:
        # How long both copies stay connected before WhatsApp drops the older one: long
        # enough for a sync to see the duplicate, as it does against the real pool.
        self.conflict_delay_s = conflict_delay_s
        self.logins: set[str] = set()
        # (session id, instance name) of every DELETE that removed a login from an instance
        # that did not hold the session: the thing a router must never cause.
        self.deleted_by: list[tuple[str, str]] = []
        # (session id, instance name) of every logout by the holder (DELETE of a held one).
        self.logged_out_by: list[tuple[str, str]] = []
        self._connected_on: dict[str, SimInstance] = {}

    def __repr__(self) -> str:
        return f"<SessionFolder logins={len(self.logins)} deleted_by={len(self.deleted_by)}>"

    # -- saved login ----------------------------------------------------------------------

    def save_login(self, session_id: str) -> None:
        """Seed a saved login (a session that was connected before the pool started)."""
        self.logins.add(session_id)

    def has_login(self, session_id: str) -> bool:
        return session_id in self.logins

    def remove_login(self, session_id: str, by: SimInstance, *, held: bool) -> None:
        """What a DELETE does to the disk; `held` says whether `by` had the session."""
        self.logins.discard(session_id)
        (self.logged_out_by if held else self.deleted_by).append((session_id, by.name))
        if self._connected_on.get(session_id) is by:
            del self._connected_on[session_id]

    # -- the last connected copy ------------------------------------------------------------

    def connected_on(self, session_id: str) -> SimInstance | None:
        """The instance whose copy of the session became connected last (it may be gone)."""
        return self._connected_on.get(session_id)

    def claim(self, session_id: str, instance: SimInstance) -> SimInstance | None:
        """`instance`'s copy just became connected: save the login, record it as the last
        one, and return the previous instance when its copy is still connected there (that
        copy is the one WhatsApp drops)."""
        self.logins.add(session_id)
        previous = self._connected_on.get(session_id)
        self._connected_on[session_id] = instance
        if previous is None or previous is instance or not previous.holds_connected(session_id):
            return None
        return previous
