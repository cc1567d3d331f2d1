"""`Authorization: Bearer <token>` for the admin API and /metrics."""

from __future__ import annotations

import hmac


def bearer_token(header: str | None) -> str | None:
    """The credentials of `Authorization: Bearer <token>`; the scheme is case-insensitive
    (RFC 7235 2.1)."""
    if header is None:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def token_matches(presented: str, expected: str) -> bool:
    # Constant-time, on bytes: compare_digest refuses non-ASCII str, and a header may carry
    # anything; surrogatepass encodes every str aiohttp can hand us.
    return hmac.compare_digest(
        presented.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass")
    )
