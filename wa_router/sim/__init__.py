"""A simulated Blazz whatsapp-service pool: the real HTTP API on loopback sockets, signed
webhooks with Node's retry schedule, knobs for tests (delay, hang, pause, crash), and what
happens around restarts: restore from Laravel, the authenticated window, the shared
session folder and its CONFLICT takeover. `SimLaravel` stands in for Blazz's Laravel side.

    async with SimInstance(webhook_url=receiver_url, webhook_retry_scale=0.01) as node:
        node.add_session("s1")                      # connected, owned here
        await node.move_session("s1", other, notify=True)
        await node.stop()                           # like a crash

    folder = SessionFolder()
    async with SimLaravel(secret="s") as laravel:
        laravel.add_account("s1"); folder.save_login("s1")
        node = SimInstance(laravel_url=laravel.url, webhook_secret="s", folder=folder)
        await node.start()                          # restores s1 without a QR
        await node.restore_done.wait()
"""

from .folder import SessionFolder
from .instance import SimInstance
from .laravel import Account, LaravelCall, LaravelEvent, SimLaravel
from .lifecycle import CONFLICT
from .models import Received, SimSession
from .webhook import EVENTS, WebhookAttempt, sign_webhook

__all__ = [
    "CONFLICT",
    "EVENTS",
    "Account",
    "LaravelCall",
    "LaravelEvent",
    "Received",
    "SessionFolder",
    "SimInstance",
    "SimLaravel",
    "SimSession",
    "WebhookAttempt",
    "sign_webhook",
]
