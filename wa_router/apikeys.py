"""The upstream api key: passed through as sent, or injected for trusted callers. Pure.

By default the router does not touch keys: Node checks the `api_key` the caller sent. When
`upstream.api_key` is configured, the router injects it, but only into requests of callers
that present one of `upstream.client_keys` (in `X-Api-Key`, or where Node expects its own
key). Anybody else is passed through untouched: a router that added its secret to every
request would be an open relay for it.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from multidict import CIMultiDict
from yarl import URL

from .errors import RequestRejected
from .profiles import Profile

CLIENT_KEY_HEADER = "X-Api-Key"


@dataclass(frozen=True, slots=True)
class KeyPolicy:
    profile: Profile
    upstream_key: str | None
    client_keys: tuple[str, ...]

    def presented(
        self,
        method: str,
        query: Mapping[str, str],
        headers: Mapping[str, str],
        body: dict[str, Any] | None,
    ) -> str | None:
        """The key the caller sent, wherever this profile's callers put it."""
        p = self.profile
        header = headers.get(CLIENT_KEY_HEADER)
        if header:
            return header
        if p.api_key_header and headers.get(p.api_key_header):
            return headers[p.api_key_header]
        if method in ("GET", "HEAD") and p.api_key_query:
            return query.get(p.api_key_query)
        if p.api_key_field and body is not None:
            value = body.get(p.api_key_field)
            if isinstance(value, str):
                return value if _is_text(value) else None
        # Not in the body: some callers put it in the query string on every method.
        if p.api_key_query:
            return query.get(p.api_key_query)
        return None

    def is_client(self, key: str | None) -> bool:
        if key is None or self.upstream_key is None:
            return False
        # Compare with every configured key, constant-time, so timing says nothing.
        matched = False
        for k in self.client_keys:
            matched |= hmac.compare_digest(key.encode(), k.encode())
        return matched

    def inject(
        self,
        method: str,
        path_qs: str,
        headers: CIMultiDict[str],
        body: bytes,
        doc: dict[str, Any] | None,
    ) -> tuple[str, bytes]:
        """Put the upstream key where Node reads it; returns the new path+query and body.
        `headers` is changed in place (the client key header is removed)."""
        key = self.upstream_key
        assert key is not None
        p = self.profile
        headers.popall(CLIENT_KEY_HEADER, None)
        if p.api_key_header:
            headers[p.api_key_header] = key
            return path_qs, body
        if (method in ("GET", "HEAD") or not p.api_key_field) and p.api_key_query:
            url = URL(path_qs, encoded=True)
            return str(url.update_query({p.api_key_query: key})), body
        if p.api_key_field:
            if doc is None and body.strip():
                raise RequestRejected(
                    400, "bad_request", "the api key can only be added to a JSON object body"
                )
            new_doc = dict(doc or {})
            new_doc[p.api_key_field] = key
            headers["Content-Type"] = "application/json"
            return _without_query(path_qs, p.api_key_query), _encode(new_doc)
        return path_qs, body


def _is_text(key: str) -> bool:
    """A key read from JSON may hold a lone surrogate (`"\\ud83d"`): no key of anyone's,
    and nothing it could be sent on (a URL, a header) can carry it. Taken for no key: the
    probes go without one and the instances say 401; the request itself goes as it came."""
    try:
        key.encode()
    except UnicodeEncodeError:
        return False
    return True


def _encode(doc: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(doc)
    except orjson.JSONEncodeError:
        # A lone surrogate (read as Node reads it, rules.py) is not UTF-8: escaped, as
        # JSON.stringify writes it, Node reads the same text.
        try:
            return json.dumps(doc, ensure_ascii=True, separators=(",", ":")).encode("ascii")
        except RecursionError:  # orjson reads 1024 levels, writes 255, Python's ~950
            raise RequestRejected(
                400, "bad_request", "the request body is nested too deeply to add the api key"
            ) from None


def _without_query(path_qs: str, name: str | None) -> str:
    """`path_qs` less the query parameter `name`: a client key sent there must not travel
    on to Node when the Node key goes in the body (Node would see both; logs keep URLs)."""
    if name is None or "?" not in path_qs:
        return path_qs
    url = URL(path_qs, encoded=True)
    if name not in url.query:
        return path_qs
    kept = [(k, v) for k, v in url.query.items() if k != name]
    return str(url.with_query(kept) if kept else url.with_query(None))
