"""Controller memories: a versioned, multi-tenant store with hybrid retrieval (docs/memory.md).

`MemoryStore.from_url("./dir" | "redis://host:port/db")` opens the local or the Redis backend.
"""

from .base import DEFAULT_TENANT, InvalidId, MemoryItem, MemoryStore, SearchHit, validate_id, validate_tags

__all__ = ["DEFAULT_TENANT", "InvalidId", "MemoryItem", "MemoryStore", "SearchHit", "validate_id", "validate_tags"]
