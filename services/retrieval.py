"""The retrieval deployment: the one holder of the MemoryStore in the Serve app.

Every call is scoped by tenant. Store calls run one at a time on a worker thread (the store
keeps in-process indices; one writer at a time keeps them simple and the event loop free).
End-user scope: memories tagged `user:<name>` belong to that user; memories without a
`user:` tag are shared by the whole tenant. A request with a user sees its own and the
shared ones; a tenant-level request (no user) sees all of the tenant's.
"""

from __future__ import annotations

import asyncio
import base64
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Sequence

from ray import serve

from memory_store.base import MemoryItem, MemoryStore
from ntkmirror.controller import Controller
from ntkmirror.errors import ModelMismatchError, NotFound, QuotaError

from .http import expected

USER_TAG = "user:"


def visible(item: MemoryItem, user: str | None) -> bool:
    owners = [t[len(USER_TAG):] for t in item.tags if t.startswith(USER_TAG)]
    return user is None or not owners or user in owners


def check_identity(controller: Controller, identity: dict, allow_model_mismatch: bool) -> None:
    """The served model's shape always; its fingerprint (and tokenizer's, where the controller
    recorded one) unless the caller allows a mismatch."""
    shape = (controller.n_layers, controller.hidden_size)
    if shape != (identity["n_layers"], identity["hidden_size"]):
        raise ModelMismatchError(f"controller is for {shape[0]} layers x {shape[1]} channels, the served model "
                                 f"has {identity['n_layers']} x {identity['hidden_size']}")
    if controller.meta.get("model_fingerprint") != identity["model_fingerprint"] and not allow_model_mismatch:
        raise ModelMismatchError(f"controller was fitted on another model ({controller.meta.get('model_name')!r}); "
                                 "set allow_model_mismatch to register it anyway")
    want = controller.meta.get("tokenizer_fingerprint")
    if want and identity.get("tokenizer_fingerprint") not in (None, want) and not allow_model_mismatch:
        raise ModelMismatchError(f"controller was fitted with another tokenizer (EOS id {controller.meta.get('eos_token_id')}"
                                 "); set allow_model_mismatch to register it anyway")


@serve.deployment(max_ongoing_requests=128, ray_actor_options={"num_cpus": 0})
class Retrieval:
    def __init__(self, store_url: str, cache_size: int = 1024):
        self.store = MemoryStore.from_url(store_url)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store")
        self._controllers: OrderedDict[str, Controller] = OrderedDict()  # by controller sha256
        self._cache_size = cache_size

    async def _call(self, fn, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(self._pool, partial(fn, *args, **kwargs))

    @expected
    async def ping(self) -> bool:
        await self._call(self.store.tenants)
        return True

    # ---- lifecycle
    @expected
    async def put(self, tenant: str, id: str, controller: Controller, text: str, tags: Sequence[str],
                  metadata: dict, max_memories: int, request_id: str | None = None) -> dict:
        def run():
            current = {i.id for i in self.store.list(tenant)}
            if id not in current and len(current) >= max_memories:
                raise QuotaError(f"memory quota reached ({max_memories} memories); delete some first")
            return self.store.put(tenant, id, controller, text, tags, metadata, request_id=request_id)

        return (await self._call(run)).to_dict()

    async def _get(self, tenant: str, id: str, user: str | None) -> MemoryItem:
        item = await self._call(self.store.get, tenant, id)
        if not visible(item, user):
            raise NotFound(f"no memory {id!r}")
        return item

    @expected
    async def get(self, tenant: str, id: str, user: str | None = None, with_controller: bool = False) -> dict:
        item = await self._get(tenant, id, user)
        out = item.to_dict()
        if with_controller:
            c = await self._controller(tenant, item)
            out["controller"] = base64.b64encode(c.to_bytes("safetensors")).decode()
        return out

    @expected
    async def list(self, tenant: str, tags: Sequence[str] | None = None, user: str | None = None) -> list[dict]:
        items = await self._call(self.store.list, tenant, list(tags) if tags else None)
        return [i.to_dict() for i in items if visible(i, user)]

    @expected
    async def delete(self, tenant: str, id: str, hard: bool = False, user: str | None = None) -> None:
        await self._get(tenant, id, user)  # 404 unless visible
        await self._call(self.store.delete, tenant, id, hard)

    # ---- retrieval
    @expected
    async def search(self, tenant: str, query: str, top_k: int, tags: Sequence[str] | None = None,
                     user: str | None = None) -> list[dict]:
        return await self._search(tenant, query, top_k, tags, user)

    async def _search(self, tenant: str, query: str, top_k: int, tags: Sequence[str] | None,
                      user: str | None) -> list[dict]:
        """Hits as {item, score, weight}; weights are renormalised over the visible hits (the
        store's softmax(score / T) restricted to a subset is the same softmax)."""
        fetch = top_k if user is None else 4 * top_k + 8  # over-fetch, then drop other users' memories
        hits = await self._call(self.store.search, tenant, query, fetch, list(tags) if tags else None)
        hits = [h for h in hits if visible(h.item, user)][:top_k]
        total = sum(h.weight for h in hits) or 1.0
        return [{"item": h.item.to_dict(), "score": h.score, "weight": h.weight / total} for h in hits]

    @expected
    async def select(self, tenant: str, query: str | None, top_k: int, ids: Sequence[str] | None = None,
                     weights: Sequence[float] | None = None, user: str | None = None) -> list[dict]:
        """The memories to compose for one request: explicit ids (weight 1 unless given), or the
        top_k retrieved for the query. Each entry: {item, weight, score, controller}."""
        if ids:
            chosen = []
            for i, id in enumerate(ids):
                item = (await self._get(tenant, id, user)).to_dict()
                chosen.append({"item": item, "weight": float(weights[i]) if weights else 1.0, "score": None})
        elif query and top_k > 0:
            chosen = await self._search(tenant, query, top_k, None, user)
        else:
            chosen = []
        for c in chosen:
            c["controller"] = await self._controller(tenant, MemoryItem(**c["item"]))
        return chosen

    async def _controller(self, tenant: str, item: MemoryItem) -> Controller:
        """Controllers are immutable per version: cache them by content hash (per tenant, so a
        cache hit can never tell one tenant that another holds the same controller)."""
        key = f"{tenant}/{item.controller_sha256 or f'{item.id}@{item.version}'}"
        c = self._controllers.get(key)
        if c is None:
            c = await self._call(self.store.get_controller, tenant, item.id, item.version)
            self._controllers[key] = c
            if len(self._controllers) > self._cache_size:
                self._controllers.popitem(last=False)
        self._controllers.move_to_end(key)
        return c
