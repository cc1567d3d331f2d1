"""Which of Node's calls to Laravel go on, and how: one decision per request path. Pure.

Everything under `webhooks.passthrough_prefix` (`/api/whatsapp/`) comes here. Laravel
trims a trailing slash and its routing does not mind repeated ones, so every spelling it
would route to the webhook controller (`/webjs/`, `/webhooks//webjs`, another case) is a
webhook and is verified as one: a forged event cannot slip past the signature check by
spelling. Node's other calls go on only when they are on the exact list of routes Node
makes (`PASSTHROUGH_ROUTES`); anything else, and any path with dot segments (raw or
percent-encoded), empty segments or an encoded slash, is refused and never reaches Laravel.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote

WEBHOOK, PASS, REFUSE = "webhook", "pass", "refuse"

# Node's calls that carry the webhooks' signature (node-pool-api.md: "the same signing is
# used for POST /api/whatsapp/chats/sync"): verified here before they go on, so no stranger
# reaching the router can spend Laravel's per-IP allowance, which is the router's.
SIGNED_ROUTES: frozenset[tuple[str, str]] = frozenset({("POST", "/api/whatsapp/chats/sync")})

# (method, path template): `{id}` is one segment (a session id).
PASSTHROUGH_ROUTES: tuple[tuple[str, str], ...] = (
    ("GET", "/api/whatsapp/accounts/active"),
    ("POST", "/api/whatsapp/chats/sync"),
    ("POST", "/api/whatsapp/sessions/{id}/mark-disconnected"),
    ("POST", "/api/whatsapp/mobile-activity"),
)


@dataclass(frozen=True, slots=True)
class Decision:
    kind: str  # WEBHOOK | PASS | REFUSE
    status: int = 200  # of a refusal: 400 (malformed) or 404 (no such route)
    reason: str = ""
    signed: bool = False  # PASS: Node signs it as it signs webhooks (`SIGNED_ROUTES`)


def decide_path(
    method: str,
    raw_path: str,
    webhook_path: str,
    routes: tuple[tuple[str, str], ...] = PASSTHROUGH_ROUTES,
) -> Decision:
    """What to do with `method raw_path` (the path as sent, still percent-encoded)."""
    segments = raw_path.split("/")[1:]
    decoded = [unquote(s) for s in segments]
    if any(d in (".", "..") for d in decoded):
        return Decision(REFUSE, 400, "dot segments in the path")
    if any("/" in d or "\\" in d for d in decoded):
        return Decision(REFUSE, 400, "an encoded slash in the path")
    # As Laravel routes it: repeated slashes collapse, a trailing one goes.
    canonical = "/" + "/".join(d for d in decoded if d)
    if canonical.lower() == webhook_path.rstrip("/").lower():
        return Decision(WEBHOOK)
    if "" in segments[:-1] or (len(segments) > 1 and segments[-1] == ""):
        return Decision(REFUSE, 400, "empty segments in the path")
    for route_method, template in routes:
        if route_method == method and _matches(template, decoded):
            return Decision(PASS, signed=(route_method, template) in SIGNED_ROUTES)
    return Decision(REFUSE, 404, f"{method} {canonical} is not a call Node makes to Laravel")


def _matches(template: str, decoded: list[str]) -> bool:
    parts = template.split("/")[1:]
    if len(parts) != len(decoded):
        return False
    return all(p == d or (p == "{id}" and d) for p, d in zip(parts, decoded, strict=True))
