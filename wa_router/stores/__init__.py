"""Where the session directory lives: in process (`memory`) or shared by several routers
(`redis`, with pub/sub so every router's cache hears of a change at once)."""

from .base import Entry, Source, Store
from .memory import MemoryStore
from .redis import RedisStore

__all__ = ["Entry", "MemoryStore", "RedisStore", "Source", "Store"]
