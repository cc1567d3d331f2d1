"""What no front forwards, whichever parsed the head: a request's version, Host fields,
transfer codings and Upgrade, as RFC 9112 has them and llhttp leaves them to us. One policy
for the lean front (`lean.py`, which checks each only when the head calls for it) and the
aiohttp front (`runtime.answering`, which checks them all at once, `head_refusal`).

Each answers the refusal, or None when the request may go on; the front answers it and
closes the connection: what follows a head it will not take cannot be read as a request.
"""

from __future__ import annotations

from .errors import RequestRejected

# llhttp reads HTTP/0.9 (a request line with no version) and 2.0 request lines too.
SERVED_VERSIONS = ("1.1", "1.0")


def not_served(version: str) -> RequestRejected:
    """RFC 9110 15.6.6: a version the router does not serve (not in SERVED_VERSIONS)."""
    return RequestRejected(
        505, "http_version_not_supported", f"HTTP/{version} is not served here: 1.1 and 1.0 are"
    )


def upgrade_refused() -> RequestRejected:
    return RequestRejected(400, "upgrade_refused", "the router does not switch protocols (Upgrade)")


def hosts_refusal(hosts: int, version: str) -> RequestRejected | None:
    """RFC 9112 3.2: more than one Host, or none in an HTTP/1.1 request (a caller that sends
    two could have the router route by one and Node read the other)."""
    if hosts > 1:
        return RequestRejected(400, "bad_request", "the request has more than one Host field")
    if hosts == 0 and version == "1.1":
        return RequestRejected(400, "bad_request", "an HTTP/1.1 request needs a Host field")
    return None


def coding_refusal(codings: bytes) -> RequestRejected | None:
    """RFC 9112 6.1: any transfer coding but `chunked` alone (`codings`: every
    Transfer-Encoding field's, as one list). The fronts decode chunks and nothing else: a
    body sent on with another coding dropped would be read by Node as what it is not."""
    if codings.strip().lower() == b"chunked":
        return None
    return RequestRejected(
        501, "transfer_coding_not_supported", "the router takes no transfer coding but chunked"
    )


def head_refusal(
    version: str, hosts: int, codings: bytes | None, upgrade: bool
) -> RequestRejected | None:
    """All of the above for one head (`codings` None: no Transfer-Encoding), in the lean
    front's order."""
    if upgrade:
        return upgrade_refused()
    if (refused := hosts_refusal(hosts, version)) is not None:
        return refused
    if codings is not None and (refused := coding_refusal(codings)) is not None:
        return refused
    return None if version in SERVED_VERSIONS else not_served(version)


__all__ = [
    "SERVED_VERSIONS",
    "coding_refusal",
    "head_refusal",
    "hosts_refusal",
    "not_served",
    "upgrade_refused",
]
