"""The `MemoryStore` interface: one contract, two backends (local directory, Redis).

Every method is scoped by tenant: a tenant can never read, search or infer another's items.
`MemoryStore.from_url("redis://host:port/db")` gives the Redis backend; any other string is
a local directory (the embedded default).
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Sequence

from ntkmirror.controller import Controller
from ntkmirror.errors import ConfigError, StoreError

ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
TAG_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,63}$")
DEFAULT_TENANT = "default"


class InvalidId(ConfigError, StoreError):
    """A malformed id, tenant or tag: bad input (exit 2, HTTP 4xx), and a StoreError for callers catching those."""


def validate_id(value: str, what: str = "id") -> str:
    """Slugs only: no path separators, no '..', no leading dot, at most 128 chars."""
    if not isinstance(value, str) or not ID_PATTERN.match(value) or ".." in value:
        raise InvalidId(f"invalid {what} {value!r}: use 1-128 letters, digits, '.', '_' or '-', "
                        "starting with a letter or digit, without '..'")
    return value


def validate_tags(tags) -> list[str]:
    """Tags: 1-64 letters, digits, '.', '_', ':', '@' or '-' (e.g. `user:alice`); order kept, duplicates dropped."""
    if isinstance(tags, str):
        tags = [tags]
    out = []
    for t in tags or ():
        if not isinstance(t, str) or not TAG_PATTERN.match(t):
            raise InvalidId(f"invalid tag {t!r}: use 1-64 letters, digits, '.', '_', ':', '@' or '-'")
        if t not in out:
            out.append(t)
    return out


@dataclass
class MemoryItem:
    tenant: str
    id: str
    version: int
    text: str
    tags: list[str] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)
    controller_sha256: str = ""
    num_gates: int = 0
    model_name: str = ""
    model_fingerprint: str = ""
    data_hash: str = ""  # hash of the training data, for idempotent batch fits
    created_at: float = 0.0
    updated_at: float = 0.0
    deleted: bool = False
    warnings: list[str] = field(default_factory=list)  # from this call (near-duplicates), never stored

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SearchHit:
    item: MemoryItem
    score: float  # fused relevance in [0, 1]
    weight: float = 0.0  # composition weight, softmax(score / temperature) over the hits
    dense: float | None = None  # cosine of text embeddings
    lexical: float | None = None  # BM25
    controller: float | None = None  # cosine of controller sketches, when the query carries one

    def to_dict(self) -> dict:
        return {"item": self.item.to_dict(), "score": self.score, "weight": self.weight, "dense": self.dense,
                "lexical": self.lexical, "controller": self.controller}


class MemoryStore(ABC):
    """Persistent controller memories with hybrid (dense + BM25) retrieval."""

    @staticmethod
    def from_url(url: str, **kwargs) -> "MemoryStore":
        if str(url).startswith(("redis://", "rediss://", "unix://")):
            from .redis import RedisStore

            return RedisStore(str(url), **kwargs)
        from .local import LocalStore

        return LocalStore(url, **kwargs)

    # ---- lifecycle
    @abstractmethod
    def put(self, tenant: str, id: str, controller: Controller, text: str, tags: Sequence[str] = (),
            metadata: dict | None = None, request_id: str | None = None) -> MemoryItem:
        """Store a memory; an existing id gets a new version (the old ones stay for rollback).
        With `request_id`, a retry (same id, same request_id) returns the version the first call
        made instead of writing another: safe to repeat after a timeout or a 503."""

    def put_many(self, tenant: str, entries: Sequence[dict]) -> list[MemoryItem]:
        """Bulk put: each entry is a dict of put's keyword arguments (id, controller, text, tags, metadata,
        request_id)."""
        return [self.put(tenant, **e) for e in entries]

    @abstractmethod
    def get(self, tenant: str, id: str, version: int | None = None, include_deleted: bool = False) -> MemoryItem:
        """The current (or a given) version; raises NotFound."""

    @abstractmethod
    def get_controller(self, tenant: str, id: str, version: int | None = None) -> Controller:
        """The controller of the current (or a given) version."""

    @abstractmethod
    def list(self, tenant: str, tags: Sequence[str] | None = None, include_deleted: bool = False) -> list[MemoryItem]:
        """Current versions, optionally only those carrying all of `tags`."""

    @abstractmethod
    def versions(self, tenant: str, id: str) -> list[MemoryItem]:
        """Every stored version of an id, oldest first."""

    @abstractmethod
    def rollback(self, tenant: str, id: str, version: int | None = None) -> MemoryItem:
        """Make an earlier version (default: the previous one) current again, as a new version."""

    @abstractmethod
    def delete(self, tenant: str, id: str, hard: bool = False) -> None:
        """Soft delete hides the item (restorable by rollback); hard delete removes every version."""

    # ---- retrieval
    @abstractmethod
    def search(self, tenant: str, query: str, top_k: int = 3, tags: Sequence[str] | None = None,
               controller: Controller | None = None, fusion: str | None = None,
               min_score: float | None = None) -> list[SearchHit]:
        """Hybrid retrieval; no hits when nothing clears the relevance floor.

        `controller` adds controller-sketch similarity as a third fused signal; `fusion` is
        rrf, minmax, dense or lexical; `min_score` overrides the dense-cosine relevance floor
        (-1 disables the floor)."""

    @abstractmethod
    def similar(self, tenant: str, id: str, top_k: int = 5) -> list[SearchHit]:
        """Memories whose controllers act alike (cosine of controller sketches)."""

    # ---- maintenance
    @abstractmethod
    def audit(self, tenant: str | None = None) -> dict:
        """Missing blobs, orphans, mixed model identities; {'ok': bool, 'problems': [...], ...}."""

    @abstractmethod
    def history(self, tenant: str, id: str | None = None, limit: int = 100) -> list[dict]:
        """The tenant's audit log, newest first: {op, id, version, time, ...} per write."""

    @abstractmethod
    def tenants(self) -> list[str]:
        ...

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
