"""The OpenAPI 3.0.3 document of the operator endpoints (`admin.py`), served at
`/admin/openapi.json`.

Written by hand, not generated from the route table, so the test that compares the two
(tests/test_admin.py) catches an endpoint added to one and forgotten in the other.
"""

from __future__ import annotations

import copy
from functools import cache
from typing import Any

from . import __version__

_ERR = "#/components/responses/Error"
_NUM = {"type": "number"}
_INT = {"type": "integer"}
_STR = {"type": "string"}
_BOOL = {"type": "boolean"}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "nullable": True}


def _obj(props: dict[str, Any], *, required: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "properties": props}
    if required:
        out["required"] = sorted(props)
    return out


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _ok(schema: str, description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(schema)}}}


def _op(
    summary: str,
    ok: dict[str, Any],
    errors: tuple[int, ...] = (),
    params: tuple[str, ...] = (),
    *,
    public: bool = False,
) -> dict[str, Any]:
    responses: dict[str, Any] = {"200": ok}
    for code in (*errors, *(() if public else (401,))):
        responses[str(code)] = {"$ref": _ERR}
    op: dict[str, Any] = {"summary": summary, "responses": responses}
    if params:
        op["parameters"] = [{"$ref": f"#/components/parameters/{p}"} for p in params]
    if public:
        op["security"] = []  # overrides the document-wide bearer requirement
    return op


def _schemas() -> dict[str, Any]:
    entry = _obj(
        {
            "session": _STR,
            "instance": _STR,
            "source": {
                "type": "string",
                "enum": ["webhook", "discovery", "placement", "sync", "admin"],
            },
            "observed_at": _NUM,
            "status": _nullable(_STR),
        }
    )
    instance = _obj(
        {
            "name": _STR,
            "url": _STR,
            "state": {"type": "string", "enum": ["healthy", "suspect", "down"]},
            "draining": _BOOL,
            "sessions": _INT,
            "reported_sessions": _nullable(_INT),
            "latency_ms": _nullable(_NUM),
            "last_check_at": _nullable(_NUM),
            "failures": _INT,
            "last_error": _nullable(_STR),
            "inflight": _INT,
        }
    )
    status = _obj(
        {
            "ready": _BOOL,
            "now": {**_NUM, "description": "the router's clock, Unix seconds"},
            "inflight": {
                **_INT,
                "description": "requests being handled now, this one not counted",
            },
            "instances": {"type": "array", "items": _ref("Instance")},
            "directory": _obj(
                {
                    "size": _INT,
                    "cache_hit_ratio": _NUM,
                    "cache_hits": _INT,
                    "store_hits": _INT,
                    "misses": _INT,
                    "candidates": _INT,
                    "demotions": _INT,
                }
            ),
            "parking": _obj(
                {
                    "parked": _INT,
                    "outcomes": {"type": "object", "additionalProperties": _INT},
                    "rechecks": _INT,
                }
            ),
            "discovery": _obj(
                {
                    "scans": _INT,
                    "probes": _INT,
                    "found": _INT,
                    "not_found": _INT,
                    "negative_hits": _INT,
                }
            ),
            "sync": _nullable(
                _obj({"summary": _STR, "started_at": _NUM, "duration_s": _NUM, "ok": _BOOL})
            ),
            "webhooks": {
                "type": "object",
                "description": "intake and relay counters; backlog is null without a backlog",
                "properties": {"backlog": _nullable(_INT)},
                "additionalProperties": True,
            },
        }
    )
    listed = {"type": "array", "items": _obj({"session": _STR, "instance": _STR})}
    sync = _obj(
        {
            "dry_run": _BOOL,
            "started_at": _NUM,
            "duration_s": _NUM,
            "instances": {"type": "object", "additionalProperties": _STR},
            "fixed": {"type": "array", "items": _obj({"session": _STR, "old": _STR, "new": _STR})},
            "learned": listed,
            "verified": _INT,
            "lost": listed,
            "duplicated": {
                "type": "array",
                "items": _obj(
                    {"session": _STR, "kept": _STR, "others": {"type": "array", "items": _STR}}
                ),
            },
            "restoring": {
                **listed,
                "description": "logging in on an instance while connected on another: kept",
            },
            "gone": {**listed, "description": "missing from a restarted instance's listing"},
            "unverified": _INT,
            "summary": _STR,
            "ok": {**_BOOL, "description": "false when sessions are lost or duplicated"},
            "lines": {
                "type": "array",
                "items": _STR,
                "description": "`Fixed: s (a -> b)` ... `Summary: ...`, the CLI's output",
            },
        }
    )
    return {
        "Error": _obj({"error": _STR, "message": _STR}) | {"additionalProperties": True},
        "Probe": _obj({"status": _STR}, required=False) | {"additionalProperties": True},
        "Entry": entry,
        "Instance": instance,
        "Status": status,
        "SessionPage": _obj(
            {"sessions": {"type": "array", "items": _ref("Entry")}, "next_cursor": _nullable(_STR)}
        ),
        "Forgotten": _obj({"session": _STR, "forgotten": _BOOL, "instance": _nullable(_STR)}),
        "Rediscovered": _obj(
            {
                "session": _STR,
                "instance": _STR,
                "previous": _nullable(_STR),
                "status": _nullable(_STR),
                "asked": {"type": "array", "items": _STR},
            }
        ),
        "SyncReport": sync,
        "Drain": _obj({"instance": _STR, "draining": _BOOL, "shared": _BOOL}),
        "OpenApi": {"type": "object", "additionalProperties": True},
    }


def _parameters() -> dict[str, Any]:
    def p(name: str, where: str, schema: dict[str, Any], text: str) -> dict[str, Any]:
        return {
            "name": name,
            "in": where,
            "required": where == "path",
            "schema": schema,
            "description": text,
        }

    return {
        "session": p("session", "path", _STR, "the session id"),
        "name": p("name", "path", _STR, "the instance name of the config"),
        "instance": p("instance", "query", _STR, "only this instance's sessions"),
        "limit": p(
            "limit",
            "query",
            {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
            "page size",
        ),
        "cursor": p("cursor", "query", _STR, "next_cursor of the previous page (opaque)"),
        "dry_run": p(
            "dry_run",
            "query",
            {"type": "string", "enum": ["0", "1", "true", "false"], "default": "0"},
            "report what would change, change nothing",
        ),
    }


@cache
def _document() -> dict[str, Any]:
    alive = _ok("Probe", "the process is up")
    ready = _ok("Probe", "warm (first sync done) and at least one instance healthy")
    healthz = _op("Liveness", alive, public=True)
    readyz = _op("Readiness", ready, public=True)
    readyz["responses"]["503"] = _ok("Probe", "not ready; `reason` says why")
    drain = _op("Stop placing new sessions on an instance", _ok("Drain"), (404,), ("name",))
    undrain = _op("Place new sessions on an instance again", _ok("Drain"), (404,), ("name",))
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "wa-router operator API",
            "version": __version__,
            "description": "Status and control of the router. /healthz and /readyz need no "
            "token; /admin/* needs Authorization: Bearer <admin.token>.",
        },
        "security": [{"bearer": []}],
        "paths": {
            "/healthz": {"get": healthz, "head": healthz},
            "/readyz": {"get": readyz, "head": readyz},
            "/admin/status": {
                "get": _op("Pool, directory, discovery, sync and webhook state", _ok("Status"))
            },
            "/admin/sessions": {
                "get": _op(
                    "Directory entries in session id order, cursor-paged",
                    _ok("SessionPage"),
                    (400,),
                    ("instance", "limit", "cursor"),
                )
            },
            "/admin/sessions/{session}": {
                "get": _op("One directory entry", _ok("Entry"), (400, 404), ("session",)),
                "delete": _op(
                    "Forget a session (a tombstone: older webhooks cannot bring it back)",
                    _ok("Forgotten"),
                    (400,),
                    ("session",),
                ),
            },
            "/admin/sessions/{session}/rediscover": {
                "post": _op(
                    "Ask every instance who owns the session now",
                    _ok("Rediscovered"),
                    (400, 404),
                    ("session",),
                )
            },
            "/admin/sync": {
                "post": _op(
                    "Reconcile the directory with every instance's session list",
                    _ok("SyncReport"),
                    (400,),
                    ("dry_run",),
                )
            },
            "/admin/instances/{name}/drain": {"post": drain},
            "/admin/instances/{name}/undrain": {"post": undrain},
            "/admin/openapi.json": {"get": _op("This document", _ok("OpenApi"))},
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": _schemas(),
            "parameters": _parameters(),
            "responses": {
                "Error": {
                    "description": "`{error, message}`: 400 bad request, 401 no or wrong "
                    "token, 404 not found",
                    "content": {"application/json": {"schema": _ref("Error")}},
                }
            },
        },
    }


def openapi_document() -> dict[str, Any]:
    """A copy: callers (tests, the handler) may change theirs."""
    return copy.deepcopy(_document())
