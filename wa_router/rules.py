"""Where the session id is in a request. Pure: no I/O, tested with tables.

A rule table is matched against the raw (still percent-encoded) path, first match wins. The
session id is taken from the path, a JSON body field, a query parameter or a header, then
checked: a malformed id is answered 400 and never forwarded, because it would end up in an
upstream path (`../health`, `a%2Fb`) or in an instance's session folder.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import orjson

from .config import RouteRuleConfig
from .errors import RequestRejected

SESSION = "{session}"
ANY_ONE = "*"
ANY_REST = "**"


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    methods: frozenset[str]  # empty: any
    kind: str
    session_in: str
    field: str
    read_timeout_s: float
    max_wait_s: float | None
    needs_connected: bool
    verify_holder: bool
    segments: tuple[str, ...]  # without a trailing `**`
    rest: bool  # the template ended in `**`
    session_index: int  # index of `{session}` in segments, -1 if none

    @property
    def creates(self) -> bool:
        return self.kind == "create"


@dataclass(frozen=True, slots=True)
class Match:
    rule: Rule
    path_session: str | None  # the raw path segment, when the session is in the path


def compile_rule(cfg: RouteRuleConfig) -> Rule:
    segments = tuple(cfg.path.strip("/").split("/")) if cfg.path.strip("/") else ()
    rest = bool(segments) and segments[-1] == ANY_REST
    if rest:
        segments = segments[:-1]
    return Rule(
        name=cfg.name,
        methods=frozenset(m.upper() for m in cfg.methods),
        kind=cfg.kind,
        session_in=cfg.session_in,
        field=cfg.field,
        read_timeout_s=cfg.read_timeout_s,
        max_wait_s=cfg.max_wait_s,
        needs_connected=cfg.needs_connected,
        verify_holder=cfg.verify_holder,
        segments=segments,
        rest=rest,
        session_index=segments.index(SESSION) if SESSION in segments else -1,
    )


class RuleTable:
    def __init__(self, rules: tuple[RouteRuleConfig, ...]) -> None:
        self.rules = tuple(compile_rule(r) for r in rules)
        # The rules that can match a method and a segment count, in table order: a request
        # walks a few rules, not all of them (the first match still wins).
        self._by_shape: dict[tuple[str, int], tuple[Rule, ...]] = {}

    def _candidates(self, method: str, n: int) -> tuple[Rule, ...]:
        key = (method, n)
        found = self._by_shape.get(key)
        if found is None:
            # HEAD is GET without the content (RFC 9110 9.3.2): a rule for GET takes it.
            methods = (method, "GET") if method == "HEAD" else (method,)
            found = tuple(
                r
                for r in self.rules
                if (not r.methods or any(m in r.methods for m in methods))
                and (n == len(r.segments) or (n > len(r.segments) and r.rest))
            )
            if len(self._by_shape) < 4096:  # methods and lengths callers make up: bounded
                self._by_shape[key] = found
        return found

    def match(self, method: str, raw_path: str) -> Match | None:
        stripped = raw_path.strip("/")
        parts = stripped.split("/") if stripped else []
        for rule in self._candidates(method, len(parts)):
            segs = rule.segments
            for want, got in zip(segs, parts, strict=False):
                if want != got and want not in (SESSION, ANY_ONE):
                    break
                if not got:  # `//` never matches a placeholder
                    break
            else:
                idx = rule.session_index
                return Match(rule, parts[idx] if idx >= 0 else None)
        return None


def check_path(raw_path: str) -> None:
    """Reject dot-segments (RFC 3986 5.2.4) however encoded: they would make Node see another
    path than the one the rules matched."""
    if "." not in raw_path and "%" not in raw_path:
        return  # the common case: nothing to decode
    for seg in raw_path.split("/"):
        if seg and unquote(seg) in (".", ".."):
            raise RequestRejected(400, "bad_request", "the path has dot segments")
    if "%" in raw_path and _CONTROL.search(unquote(raw_path)):
        # %0d%0a and the like: harmless to llhttp, but a header injection in any component
        # that decodes the path and writes it into a line (a log, a redirect, Node's own).
        raise RequestRejected(400, "bad_request", "the path has encoded control characters")


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class SessionIdPolicy:
    def __init__(self, max_length: int, pattern: str) -> None:
        self.max_length = max_length
        self.pattern = re.compile(pattern)

    def accepts(self, value: str) -> bool:
        """Whether a session id named elsewhere (a webhook) is one a request could name."""
        try:
            self.check(value, "")
        except RequestRejected:
            return False
        return True

    def check(self, value: str, where: str) -> str:
        if not value:
            raise RequestRejected(400, "bad_request", f"the session id in {where} is empty")
        if len(value) > self.max_length:
            raise RequestRejected(
                400,
                "bad_request",
                f"the session id in {where} is longer than {self.max_length} characters",
            )
        if ".." in value or not self.pattern.fullmatch(value):
            raise RequestRejected(
                400,
                "bad_request",
                f"the session id in {where} has characters a session id cannot have",
            )
        return value


def parse_json_object(body: bytes) -> dict[str, Any] | None:
    """The body as a JSON object, None when it is empty; 400 when it is something else (not
    JSON, not an object, or nested deeper than orjson's limit of 1024 levels: refused,
    where a recursive parser would overflow its stack). What orjson refuses and Node's
    body parser takes is read as Node reads it (`_as_node_reads_it`)."""
    if not body.strip():
        return None
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        doc = _as_node_reads_it(body, str(exc))
    if not isinstance(doc, dict):
        raise RequestRejected(400, "bad_request", "the request body must be a JSON object")
    return doc


_BOM = b"\xef\xbb\xbf"
_NESTED = "is nested too deeply (over 1024 levels)"
_DOUBLE_MAX = 2**1024  # a number at or beyond it is infinity as a double
# The slower parser reads a body that needs it only up to this size (a hostile one must
# not hold the loop for a second); a send of text is a few KiB.
_SLOW_PARSE_MAX_BYTES = 1024 * 1024


def _as_node_reads_it(body: bytes, error: str) -> Any:
    """What orjson refuses and Node's body parser (iconv, then JSON.parse) takes: one UTF-8
    byte order mark, dropped before parsing (a second one Node refuses too); a lone
    surrogate escape (`"\\ud83d"`, as JSON.stringify writes a text cut mid-emoji), which
    Python's json reads, in a body up to 1 MiB (a larger one stays refused: that parser
    would hold the loop). Refused here, such a send would be a 400 that Node would have
    taken. Only after orjson failed."""
    if body.startswith(_BOM):  # what orjson refused first, before anything after it
        body = body[len(_BOM) :]
        try:
            return orjson.loads(body) if body.strip() else None
        except orjson.JSONDecodeError as exc:
            error = str(exc)
    if "depth limit" in error:
        raise _not_json(_NESTED)
    if "surrogate" not in error or len(body) > _SLOW_PARSE_MAX_BYTES:
        raise _not_json("is not valid JSON")
    try:
        return json.loads(
            body.decode("utf-8"),
            parse_constant=_not_a_number,
            parse_float=_finite,
            parse_int=_finite_int,
        )
    except RecursionError:
        raise _not_json(_NESTED) from None
    except ValueError:  # not JSON (or not UTF-8) for Node either
        raise _not_json("is not valid JSON") from None


def _not_a_number(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # Python's json takes NaN; JSON.parse does not


def _finite(text: str) -> float:
    value = float(text)
    if value in (math.inf, -math.inf):  # as orjson: beyond a double is refused
        raise ValueError("number beyond a double")
    return value


def _finite_int(text: str) -> int:
    value = int(text)
    if abs(value) >= _DOUBLE_MAX:  # as orjson: beyond a double is refused
        raise ValueError("number beyond a double")
    return value


def _not_json(why: str) -> RequestRejected:
    return RequestRejected(400, "bad_request", f"the request body {why}")


def path_session(segment: str, policy: SessionIdPolicy) -> str:
    """The session id in a path segment, decoded and checked (RequestRejected(400))."""
    return policy.check(unquote(segment), "the path")


def extract_session(
    match: Match,
    policy: SessionIdPolicy,
    *,
    query: Mapping[str, str],
    headers: Mapping[str, str],
    body: dict[str, Any] | None,
) -> str:
    """The session id the matched rule points at, checked; RequestRejected(400) otherwise."""
    rule = match.rule
    src = rule.session_in
    if src == "path":
        assert match.path_session is not None
        return path_session(match.path_session, policy)
    where = {"body": "body field", "query": "query parameter", "header": "header"}[src]
    where = f"{where} {rule.field!r}"
    value: object
    if src == "body":
        value = None if body is None else body.get(rule.field)
    elif src == "query":
        value = query.get(rule.field)
    else:
        value = headers.get(rule.field)
    if value is None:
        raise RequestRejected(400, "bad_request", f"the session id ({where}) is missing")
    if not isinstance(value, str):
        raise RequestRejected(400, "bad_request", f"the session id ({where}) must be a string")
    return policy.check(value, where)
