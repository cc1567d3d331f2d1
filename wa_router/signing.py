"""Node's webhook signature, in one place: the router's intake verifies with it, the
backlog re-signs with it, the simulated instances and Laravel stand-in sign and check with it.

    X-HMAC-Signature = lowercase hex HMAC-SHA256(secret, X-Timestamp + raw body)

(`utils/webhookNotifier.js`, `VerifyWhatsAppHmac.php`: the two simply concatenated, over
the raw bytes, never re-serialised JSON.)
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

from .errors import RequestRejected

TIMESTAMP = "X-Timestamp"
SIGNATURE = "X-HMAC-Signature"
INSTANCE_URL = "X-Instance-Url"


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """Node's signature: lowercase hex HMAC-SHA256(secret, timestamp + raw body)."""
    return hmac.new(secret.encode(), timestamp.encode() + body, hashlib.sha256).hexdigest()


def verify(
    headers: Mapping[str, str], body: bytes, secrets: tuple[str, ...], now: float, window_s: float
) -> int:
    """The webhook's timestamp if its signature holds; RequestRejected(401, reason) if not."""
    ts_raw = headers.get(TIMESTAMP)
    sig = headers.get(SIGNATURE)
    if not ts_raw or not sig:
        raise _unauthorized("missing_headers", f"{TIMESTAMP} and {SIGNATURE} are required")
    # ASCII digits only: str.isdigit() and int() take any script's digits ("١٧٩٦..."),
    # which Laravel's (int) cast reads as 0.
    if not (ts_raw.isascii() and ts_raw.isdigit()) or len(ts_raw) > 12:
        raise _unauthorized("bad_timestamp", f"{TIMESTAMP} must be Unix seconds")
    ts = int(ts_raw)
    if now - ts > window_s:
        raise _unauthorized("stale_timestamp", f"{TIMESTAMP} is older than {window_s:g} s")
    if ts - now > window_s:
        raise _unauthorized("future_timestamp", f"{TIMESTAMP} is ahead by over {window_s:g} s")
    # Compare with every secret (rotation), constant-time each (RFC 2104 says nothing of
    # timing; hmac.compare_digest is what keeps the comparison from leaking a prefix).
    # On bytes: compare_digest refuses a str that is not ASCII (a TypeError, once a 500),
    # and a header may carry any byte (surrogatepass encodes every str).
    presented = sig.encode("utf-8", "surrogatepass")
    good = False
    for secret in secrets:
        good |= hmac.compare_digest(sign(secret, ts_raw, body).encode(), presented)
    if not good:
        raise _unauthorized("bad_signature", "the signature does not match the body")
    return ts


def _unauthorized(reason: str, message: str) -> RequestRejected:
    return RequestRejected(401, "unauthorized", message, reason=reason)
