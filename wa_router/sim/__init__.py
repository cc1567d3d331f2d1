"""A simulated Blazz whatsapp-service instance: the real HTTP API on a loopback socket,
signed webhooks with Node's retry schedule, and knobs for tests (delay, hang, crash).

    async with SimInstance(webhook_url=receiver_url, webhook_retry_scale=0.01) as node:
        node.add_session("s1")                      # connected, owned here
        await node.move_session("s1", other, notify=True)
        await node.stop()                           # like a crash
"""

from .instance import SimInstance
from .models import Received, SimSession
from .webhook import EVENTS, WebhookAttempt, sign_webhook

__all__ = ["EVENTS", "Received", "SimInstance", "SimSession", "WebhookAttempt", "sign_webhook"]
