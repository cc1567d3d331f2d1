"""The HTTP API of Blazz's whatsapp-service, as `reference/node-pool-api.md` describes it.

Only the wire behaviour matters here: status codes, JSON shapes, where the key and the
session id sit. State changes go through `SimInstance` so tests and HTTP share one path.
The middleware records every request on arrival, then applies the test-controlled hang,
pause and delay, then answers; `_ApiError` is how handlers answer an error in one line.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.typedefs import Handler

from .health import add_health_routes
from .models import CONNECTED, Headers, Received, SimSession, new_message_id, now_iso

if TYPE_CHECKING:
    from .instance import SimInstance

INVALID_KEY = {"error": "Invalid API key"}
# Node's http server takes a head of up to 16 KiB (its --max-http-header-size) and answers
# a longer one 431, bodiless, closing; aiohttp alone would refuse any line over 8 KiB.
NODE_MAX_HEAD = 16 * 1024
AIOHTTP_LINE_LIMIT = 2 * NODE_MAX_HEAD  # aiohttp's per-line limits: the total is ours
SESSION_NOT_FOUND = {"error": "Session not found"}
NOT_CONNECTED = "Session not connected. Please check session status."


@dataclass(frozen=True)
class _Body:
    raw: bytes
    value: Any | None  # parsed JSON; None when empty or invalid
    valid: bool  # False only when non-empty and not JSON


BODY = web.RequestKey("sim_body", _Body)


class _ApiError(Exception):
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(status, body)
        self.status = status
        self.body = body


def _head_bytes(request: web.Request) -> int:
    line = len(request.method) + len(request.raw_path) + 12  # "M /p HTTP/1.1\r\n"
    return line + sum(len(k) + len(v) + 4 for k, v in request.raw_headers) + 2


def _parse(raw: bytes) -> _Body:
    if not raw.strip():
        return _Body(raw, None, True)
    try:
        # As express.json reads it: a byte order mark is dropped (json.loads on bytes does
        # that too), NaN and Infinity are not JSON.
        return _Body(raw, json.loads(raw, parse_constant=_not_json), True)
    except ValueError:
        return _Body(raw, None, False)


def _not_json(name: str) -> object:
    raise ValueError(name)


class BlazzApi:
    """Routes and handlers for one instance; `app()` builds a fresh application each start."""

    def __init__(self, sim: SimInstance) -> None:
        self.sim = sim

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        r = app.router
        add_health_routes(r, self.sim)
        r.add_post("/api/sessions", self.create_session)
        r.add_get("/api/sessions", self.list_sessions)
        r.add_get("/api/sessions/{session_id}/status", self.session_status)
        r.add_get("/api/sessions/{session_id}/metadata", self.get_metadata)
        r.add_put("/api/sessions/{session_id}/metadata", self.put_metadata)
        r.add_post("/api/sessions/{session_id}/reconnect", self.reconnect)
        r.add_post("/api/sessions/{session_id}/regenerate-qr", self.regenerate_qr)
        r.add_post("/api/sessions/{session_id}/restore", self.restore)
        r.add_delete("/api/sessions/{session_id}", self.delete_session)
        r.add_post("/api/messages/send", self.send)
        r.add_post("/api/messages/send-media", self.send_media)
        r.add_post("/api/messages/bulk-send", self.bulk_send)
        r.add_get("/api/messages/{session_id}/validate", self.validate)
        # Express's final catch-all: also catches a known path with another method, which
        # Express answers 404 too (there is no 405 in Blazz).
        r.add_route("*", "/{tail:.*}", self.not_found)
        return app

    # -- plumbing -----------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        sim = self.sim
        if _head_bytes(request) > NODE_MAX_HEAD:
            refused = web.Response(status=431)
            refused.force_close()
            return refused
        body = _parse(await request.read())
        request[BODY] = body
        sim.received.append(
            Received(
                method=request.method,
                path=request.path,
                query=dict(request.query),
                json=body.value,
                headers=Headers(request.headers),
            )
        )
        if sim.hang:
            await _forever()
        await sim.wait_resumed()  # paused (SIGSTOP): answered only after resume()
        delay_s = sim.delay_s + _route_delay_s(sim.route_delay_s, request.path)
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        if sim.hang:  # switched on while this request was being delayed
            await _forever()
        try:
            return await handler(request)
        except _ApiError as err:
            return web.json_response(err.body, status=err.status)

    def _check_query_key(self, request: web.Request) -> None:
        if request.query.get("api_key") != self.sim.api_key:
            raise _ApiError(401, INVALID_KEY)

    def _checked_body(self, request: web.Request) -> dict[str, Any]:
        """JSON body of a POST/PUT/DELETE with its `api_key` checked (Express parses first:
        bad JSON is a 400 before any key check). No body is `{}`, like `req.body`."""
        body = request[BODY]
        if not body.valid:
            raise _ApiError(400, {"error": "Invalid JSON body"})
        value = body.value if body.value is not None else {}
        if not isinstance(value, dict):
            raise _ApiError(400, {"error": "Request body must be a JSON object"})
        if value.get("api_key") != self.sim.api_key:
            raise _ApiError(401, INVALID_KEY)
        return value

    def _session(self, session_id: str) -> SimSession:
        session = self.sim.sessions.get(session_id)
        if session is None:
            raise _ApiError(404, SESSION_NOT_FOUND)
        return session

    # -- sessions -----------------------------------------------------------------------

    async def create_session(self, request: web.Request) -> web.Response:
        body = self._checked_body(request)
        session_id = body.get("session_id")
        if not session_id:
            raise _ApiError(400, {"error": "session_id is required"})
        session_id = str(session_id)
        existing = self.sim.sessions.get(session_id)
        if existing is not None:
            # Node's SessionManager keeps the live client and reports what it is: a create
            # that reached an owner is harmless, so answer 200 with the current status.
            return web.json_response(
                {
                    "success": True,
                    "session_id": session_id,
                    "status": existing.status,
                    "message": "Session already exists",
                }
            )
        session = SimSession(session_id, workspace_id=body.get("workspace_id", 1))
        self.sim.sessions[session_id] = session
        self.sim.begin_connect(session)
        return web.json_response(
            {"success": True, "session_id": session_id, "status": "qr_scanning"}
        )

    async def list_sessions(self, request: web.Request) -> web.Response:
        self._check_query_key(request)
        sessions = [s.summary() for s in self.sim.sessions.values()]
        return web.json_response({"success": True, "sessions": sessions, "total": len(sessions)})

    async def session_status(self, request: web.Request) -> web.Response:
        self._check_query_key(request)
        s = self._session(request.match_info["session_id"])
        return web.json_response(
            {
                "session_id": s.session_id,
                "status": s.status,
                "phone_number": s.phone_number,
                "workspace_id": s.workspace_id,
                "connected_at": s.connected_at,
                "last_activity": s.last_activity,
            }
        )

    async def get_metadata(self, request: web.Request) -> web.Response:
        self._check_query_key(request)
        s = self._session(request.match_info["session_id"])
        return web.json_response(
            {"success": True, "session_id": s.session_id, "metadata": s.metadata}
        )

    async def put_metadata(self, request: web.Request) -> web.Response:
        body = self._checked_body(request)
        s = self._session(request.match_info["session_id"])
        update = body.get("metadata")
        if not isinstance(update, dict):  # fields at the top level instead of under `metadata`
            update = {k: v for k, v in body.items() if k not in ("api_key", "workspace_id")}
        s.metadata.update(update)
        return web.json_response(
            {"success": True, "session_id": s.session_id, "metadata": s.metadata}
        )

    async def _recreate(
        self, request: web.Request, reason: str, *, may_create: bool
    ) -> web.Response:
        """reconnect / regenerate-qr / restore: Node disconnects the client and creates it again."""
        body = self._checked_body(request)
        session_id = request.match_info["session_id"]
        session = self.sim.sessions.get(session_id)
        if session is None:
            if not may_create:
                raise _ApiError(404, SESSION_NOT_FOUND)
            session = SimSession(session_id, workspace_id=body.get("workspace_id", 1))
            self.sim.sessions[session_id] = session
        else:
            self.sim.notify(
                "session_disconnected",
                {"session_id": session_id, "workspace_id": session.workspace_id, "reason": reason},
            )
        self.sim.begin_connect(session)
        return web.json_response(
            {
                "success": True,
                "session_id": session_id,
                "status": session.status,
                "message": f"Session {reason.lower().replace('_', ' ')} initiated",
            }
        )

    async def reconnect(self, request: web.Request) -> web.Response:
        return await self._recreate(request, "RECONNECT", may_create=False)

    async def regenerate_qr(self, request: web.Request) -> web.Response:
        return await self._recreate(request, "REGENERATE_QR", may_create=False)

    async def restore(self, request: web.Request) -> web.Response:
        return await self._recreate(request, "RESTORE", may_create=True)

    async def delete_session(self, request: web.Request) -> web.Response:
        self._checked_body(request)
        session_id = request.match_info["session_id"]
        # Held: a logout. Not held: Node deletes the session's folder anyway (see
        # `SimInstance.delete_session`). Idempotent, as Node's: both answer success.
        self.sim.delete_session(session_id)
        return web.json_response(
            {"success": True, "session_id": session_id, "message": "Session deleted successfully"}
        )

    # -- messages -----------------------------------------------------------------------

    def _sending_session(self, body: dict[str, Any], required: tuple[str, ...]) -> SimSession:
        missing = [name for name in ("session_id", *required) if not body.get(name)]
        if missing:
            raise _ApiError(400, {"error": f"Missing required fields: {', '.join(missing)}"})
        session = self._session(str(body["session_id"]))
        if session.status != CONNECTED:
            # The real text (SessionManager.js): it names no status; GET .../status does.
            raise _ApiError(400, {"error": NOT_CONNECTED})
        return session

    def _sent(self, session: SimSession, recipient: str, kind: str) -> dict[str, Any]:
        """One message leaves: an id, the activity stamp, the `message_sent` webhook."""
        message_id = new_message_id(recipient)
        timestamp = int(time.time())
        session.last_activity = now_iso()
        self.sim.notify(
            "message_sent",
            {
                "session_id": session.session_id,
                "workspace_id": session.workspace_id,
                "message_id": message_id,
                "recipient_phone": recipient,
                "type": kind,
                "status": "sent",
                "timestamp": timestamp,
            },
        )
        return {"success": True, "message_id": message_id, "timestamp": timestamp}

    async def send(self, request: web.Request) -> web.Response:
        body = self._checked_body(request)
        session = self._sending_session(body, ("recipient_phone", "message"))
        sent = self._sent(session, str(body["recipient_phone"]), str(body.get("type") or "text"))
        return web.json_response(sent)

    async def send_media(self, request: web.Request) -> web.Response:
        body = self._checked_body(request)
        session = self._sending_session(body, ("recipient_phone",))
        sent = self._sent(session, str(body["recipient_phone"]), str(body.get("type") or "image"))
        return web.json_response(sent)

    async def bulk_send(self, request: web.Request) -> web.Response:
        """`messages: [{recipient_phone, message, type}]`, or `recipients: [phone]` + `message`;
        answers one result per item in order (an item without a recipient fails alone)."""
        body = self._checked_body(request)
        items = body.get("messages")
        if not isinstance(items, list):
            recipients = body.get("recipients")
            if isinstance(recipients, list):
                items = [
                    {"recipient_phone": r, "message": body.get("message"), "type": body.get("type")}
                    for r in recipients
                ]
        if not isinstance(items, list) or not items:
            raise _ApiError(400, {"error": "Missing required fields: messages or recipients"})
        session = self._sending_session(body, ())
        results: list[dict[str, Any]] = []
        for item in items:
            recipient = item.get("recipient_phone") if isinstance(item, dict) else None
            if not recipient:
                results.append({"success": False, "error": "recipient_phone is required"})
                continue
            kind = str(item.get("type") or "text")
            results.append(
                {"recipient_phone": str(recipient), **self._sent(session, str(recipient), kind)}
            )
        sent = sum(1 for r in results if r["success"])
        return web.json_response(
            {
                "success": True,
                "total": len(results),
                "sent": sent,
                "failed": len(results) - sent,
                "results": results,
            }
        )

    async def validate(self, request: web.Request) -> web.Response:
        self._check_query_key(request)
        s = self._session(request.match_info["session_id"])
        can_send = s.status == CONNECTED
        return web.json_response(
            {
                "success": True,
                "session_id": s.session_id,
                "status": s.status,
                "can_send": can_send,
                "phone_number": s.phone_number,
                "message": "Session ready to send" if can_send else "Session not connected",
            }
        )

    async def not_found(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"error": "Endpoint not found", "path": request.path, "method": request.method},
            status=404,
        )


def _route_delay_s(route_delay_s: dict[str, float], path: str) -> float:
    """The extra delay of the longest configured prefix of `path` (one rule, not a sum)."""
    best = -1
    delay_s = 0.0
    for prefix, value in route_delay_s.items():
        if path.startswith(prefix) and len(prefix) > best:
            best, delay_s = len(prefix), value
    return delay_s


async def _forever() -> None:
    """Never answer; ends only by cancellation (client gone, or the instance stops)."""
    await asyncio.get_running_loop().create_future()
