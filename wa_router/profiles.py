"""How an upstream API speaks: where the status probe is, which statuses mean "owned here",
how "session not here" looks, where the api key goes, and its default route rules.

`blazz` is the whatsapp-service of the Laravel project Blazz (node-pool-api.md): api key in
the query on GET and in the JSON body otherwise. `simple` is the simplified form of the
design card, `/session/{id}/...` with an `X-Api-Key` header.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from urllib.parse import urlencode

from multidict import CIMultiDict

from .config import NotHereConfig, ProfileConfig, RouteRuleConfig
from .forward import UpstreamRequest
from .stores.base import Status

# Node's own per-route timeouts (routes/index.js): sessions 60 s, send 45 s, health 5 s,
# else 30 s. Waiting as long as Node does lets Node's own 408 reach the caller first; a
# send past its 45 s does not get one: the process dies instead (node-pool-api.md, "A slow
# send kills Node"), which the router sees as a dropped connection (502, not re-sent: the
# message may be out) and as the instance down.
SESSIONS_S = 60.0
SEND_S = 45.0
HEALTH_S = 5.0
OTHER_S = 30.0
# How long a request may wait for its session, under Laravel's own caller timeouts
# (node-pool-api.md): status checks 3 s, creates 10 s; sends (30 s) take parking.max_wait_s.
STATUS_WAIT_S = 2.0
CREATE_WAIT_S = 8.0

BLAZZ_RULES: tuple[RouteRuleConfig, ...] = (
    RouteRuleConfig("health", "/health", ("GET", "HEAD"), "pool_health", "none", "", HEALTH_S),
    RouteRuleConfig(
        "health_detail", "/health/**", ("GET", "HEAD"), "any_instance", "none", "", HEALTH_S
    ),
    RouteRuleConfig(
        "sessions_list", "/api/sessions", ("GET",), "pool_list", "none", "", SESSIONS_S
    ),
    RouteRuleConfig(
        "sessions_create",
        "/api/sessions",
        ("POST",),
        "create",
        "body",
        "session_id",
        SESSIONS_S,
        max_wait_s=CREATE_WAIT_S,
    ),
    # reconnect / regenerate-qr / restore recreate the session where it is; restore of a
    # session the pool has lost is placed like a create.
    RouteRuleConfig(
        "sessions_restore",
        "/api/sessions/{session}/restore",
        ("POST",),
        "create",
        "path",
        "",
        SESSIONS_S,
        max_wait_s=CREATE_WAIT_S,
    ),
    # These disconnect or delete: a Blazz instance that does not hold the session deletes
    # its folder for a DELETE, so the target is asked first whether it holds it.
    RouteRuleConfig(
        "sessions_delete",
        "/api/sessions/{session}",
        ("DELETE",),
        "session",
        "path",
        "",
        SESSIONS_S,
        max_wait_s=STATUS_WAIT_S,
        verify_holder=True,
    ),
    RouteRuleConfig(
        "sessions_reconnect",
        "/api/sessions/{session}/reconnect",
        ("POST",),
        "session",
        "path",
        "",
        SESSIONS_S,
        max_wait_s=STATUS_WAIT_S,
        verify_holder=True,
    ),
    RouteRuleConfig(
        "sessions_regenerate_qr",
        "/api/sessions/{session}/regenerate-qr",
        ("POST",),
        "session",
        "path",
        "",
        SESSIONS_S,
        max_wait_s=STATUS_WAIT_S,
        verify_holder=True,
    ),
    RouteRuleConfig(
        "sessions_one",
        "/api/sessions/{session}/**",
        (),
        "session",
        "path",
        "",
        SESSIONS_S,
        max_wait_s=STATUS_WAIT_S,
    ),
    RouteRuleConfig(
        "messages_validate",
        "/api/messages/{session}/validate",
        ("GET",),
        "session",
        "path",
        "",
        OTHER_S,
        max_wait_s=STATUS_WAIT_S,
    ),
    RouteRuleConfig(
        "messages_send",
        "/api/messages/*",
        ("POST",),
        "session",
        "body",
        "session_id",
        SEND_S,
        needs_connected=True,
    ),
    RouteRuleConfig(
        "messages_other",
        "/api/messages/**",
        (),
        "session",
        "body",
        "session_id",
        OTHER_S,
        needs_connected=True,
    ),
    # The simplified form works against the same pool when callers use it.
    RouteRuleConfig("simple_session", "/session/{session}/**", (), "session", "path", "", OTHER_S),
)

SIMPLE_RULES: tuple[RouteRuleConfig, ...] = (
    RouteRuleConfig("health", "/health", ("GET", "HEAD"), "pool_health", "none", "", HEALTH_S),
    RouteRuleConfig("sessions_list", "/sessions", ("GET",), "pool_list", "none", "", OTHER_S),
    RouteRuleConfig(
        "session_start", "/session/{session}/start", ("POST",), "create", "path", "", SESSIONS_S
    ),
    RouteRuleConfig("session_one", "/session/{session}/**", (), "session", "path", "", OTHER_S),
)


@dataclass(frozen=True, slots=True)
class NotHere:
    """One answer that means the session is not usable on the instance that gave it."""

    http_status: int
    contains: str  # lower case; "" matches any body
    means: Status  # GONE or DISCONNECTED


# 421 Misdirected Request (RFC 9110 15.5.20) is the generic way. Blazz answers 404 for an
# unknown path too (`Endpoint not found`), so a 404 counts only when its body says
# `Session not found`. Its send routes check `Session not connected` (400) before anything
# goes to WhatsApp (SessionManager.js), so that answer was not processed either.
BLAZZ_NOT_HERE = (
    NotHere(421, "", Status.GONE),
    NotHere(404, "session not found", Status.GONE),
    NotHere(400, "session not connected", Status.DISCONNECTED),
)
SIMPLE_NOT_HERE = BLAZZ_NOT_HERE


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    status_path: str
    list_path: str
    health_path: str
    owning_statuses: tuple[str, ...]  # ranked, best first, lower case
    api_key_query: str | None
    api_key_field: str | None
    api_key_header: str | None
    rules: tuple[RouteRuleConfig, ...]
    not_here_answers: tuple[NotHere, ...] = BLAZZ_NOT_HERE
    # HTTP statuses whose body must be read to tell "not here" from a real answer (made
    # once: it is asked for every answer).
    not_here_statuses: frozenset[int] = field(init=False)

    def __post_init__(self) -> None:
        statuses = frozenset(n.http_status for n in self.not_here_answers)
        object.__setattr__(self, "not_here_statuses", statuses)

    def status_of(self, status: object) -> Status | None:
        """The directory's status for what an instance reported: the best owning status is
        `connected`, `authenticated` is itself, other owning ones are a login stage, and
        anything else means the instance does not hold it usable."""
        rank = self.rank(status)
        if rank == 0:
            return Status.CONNECTED
        if rank is None:
            return Status.DISCONNECTED if isinstance(status, str) else None
        assert isinstance(status, str)
        return Status.AUTHENTICATED if status.lower() == "authenticated" else Status.QR_SCANNING

    def rank(self, status: object) -> int | None:
        """0 for the best owning status, None when `status` does not mean "owned here"."""
        if not isinstance(status, str):
            return None
        try:
            return self.owning_statuses.index(status.lower())
        except ValueError:
            return None

    def status_path_for(self, session: str) -> str:
        return self.status_path.replace("{session}", session)

    def get_request(self, path: str, api_key: str | None, timeout_s: float) -> UpstreamRequest:
        """A GET of the router's own (probe, listing) carrying `api_key` where Node reads
        it: the query on Blazz (its header is ignored: why the original sync got 401)."""
        headers: CIMultiDict[str] = CIMultiDict()
        if api_key is not None:
            if self.api_key_query:
                path += "?" + urlencode({self.api_key_query: api_key})
            if self.api_key_header:
                headers[self.api_key_header] = api_key
        return UpstreamRequest("GET", path, headers, b"", timeout_s)

    def not_here(self, http_status: int, body: bytes) -> Status | None:
        """What the answer says of the session on the instance that gave it, when it is one
        of the profile's "not here" answers (the request was not processed); else None."""
        for nh in self.not_here_answers:
            if nh.http_status == http_status and (not nh.contains or _says(body, nh.contains)):
                return nh.means
        return None

    def says_not_here(self, http_status: int, body: bytes) -> bool:
        return self.not_here(http_status, body) is not None


def _says(body: bytes, text: str) -> bool:
    """Whether the JSON body's `error` or `message` contains `text` (non-JSON: the bytes)."""
    try:
        doc = json.loads(body)
    except ValueError:
        return text.encode() in body.lower()
    if not isinstance(doc, dict):
        return False
    return any(isinstance(doc.get(k), str) and text in doc[k].lower() for k in ("error", "message"))


_DEFAULTS: dict[str, Profile] = {
    "blazz": Profile(
        name="blazz",
        status_path="/api/sessions/{session}/status",
        list_path="/api/sessions",
        health_path="/health",
        owning_statuses=("connected", "authenticated", "qr_scanning"),
        api_key_query="api_key",
        api_key_field="api_key",
        api_key_header=None,
        rules=BLAZZ_RULES,
    ),
    "simple": Profile(
        name="simple",
        status_path="/session/{session}/status",
        list_path="/sessions",
        health_path="/health",
        owning_statuses=("connected", "authenticated", "qr_scanning"),
        api_key_query=None,
        api_key_field=None,
        api_key_header="X-Api-Key",
        rules=SIMPLE_RULES,
        not_here_answers=SIMPLE_NOT_HERE,
    ),
}


def build_profile(cfg: ProfileConfig, rules: tuple[RouteRuleConfig, ...] | None) -> Profile:
    base = _DEFAULTS[cfg.name]
    return Profile(
        name=base.name,
        status_path=cfg.status_path or base.status_path,
        list_path=cfg.list_path or base.list_path,
        health_path=cfg.health_path or base.health_path,
        owning_statuses=tuple(s.lower() for s in cfg.owning_statuses)
        if cfg.owning_statuses
        else base.owning_statuses,
        api_key_query=cfg.api_key_query if cfg.api_key_query is not None else base.api_key_query,
        api_key_field=cfg.api_key_field if cfg.api_key_field is not None else base.api_key_field,
        api_key_header=cfg.api_key_header
        if cfg.api_key_header is not None
        else base.api_key_header,
        rules=rules if rules is not None else base.rules,
        not_here_answers=_not_here(cfg.not_here)
        if cfg.not_here is not None
        else base.not_here_answers,
    )


def _not_here(items: tuple[NotHereConfig, ...]) -> tuple[NotHere, ...]:
    return tuple(NotHere(n.http_status, n.contains.lower(), Status(n.means)) for n in items)
