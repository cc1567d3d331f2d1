"""The heads no front forwards (`refusals.py`), as a table: version, Host fields, transfer
codings, Upgrade, and the order they are checked in."""

from __future__ import annotations

import pytest

from wa_router.refusals import head_refusal

# (version, Host fields, Transfer-Encoding codings or None, Upgrade) -> (status, error) | None
CASES: list[tuple[str, int, bytes | None, bool, tuple[int, str] | None]] = [
    ("1.1", 1, None, False, None),
    ("1.0", 0, None, False, None),  # HTTP/1.0 needs no Host
    ("1.1", 1, b"chunked", False, None),
    ("1.1", 1, b" Chunked ", False, None),
    ("1.1", 0, None, False, (400, "bad_request")),
    ("1.1", 2, None, False, (400, "bad_request")),
    ("1.0", 2, None, False, (400, "bad_request")),
    ("1.1", 1, b"gzip, chunked", False, (501, "transfer_coding_not_supported")),
    ("1.1", 1, b"gzip,chunked", False, (501, "transfer_coding_not_supported")),
    ("1.1", 1, b"chunked, chunked", False, (501, "transfer_coding_not_supported")),
    ("1.1", 1, b"", False, (501, "transfer_coding_not_supported")),
    ("2.0", 1, None, False, (505, "http_version_not_supported")),
    ("0.9", 0, None, False, (505, "http_version_not_supported")),
    ("1.1", 1, None, True, (400, "upgrade_refused")),
    # The order: Upgrade, then Host, then codings, then the version.
    ("2.0", 2, b"gzip", True, (400, "upgrade_refused")),
    ("2.0", 2, b"gzip", False, (400, "bad_request")),
    ("2.0", 1, b"gzip", False, (501, "transfer_coding_not_supported")),
]


@pytest.mark.parametrize(("version", "hosts", "codings", "upgrade", "want"), CASES)
def test_head_refusal(
    version: str, hosts: int, codings: bytes | None, upgrade: bool, want: tuple[int, str] | None
) -> None:
    got = head_refusal(version, hosts, codings, upgrade)
    assert (None if got is None else (got.status, got.code)) == want
