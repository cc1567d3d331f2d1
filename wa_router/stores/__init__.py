"""Where the session directory lives: in process (`memory`) or shared (`redis`, later)."""

from .base import Entry, Source, Store
from .memory import MemoryStore

__all__ = ["Entry", "MemoryStore", "Source", "Store"]
