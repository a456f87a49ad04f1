"""Behaviour shared by both backends: versions, embeddings, near-duplicates, hybrid search.

A backend keeps, per tenant and id, an append-only list of version records (JSON: the
MemoryItem fields plus the base64 text embedding and controller sketch) and the controller
blobs by sha256, and it offers a change feed. Everything else is written here, once, so the
local and Redis stores cannot drift apart. Each process keeps one TenantIndex per tenant,
brought up to date from the change feed before every read that needs it.

Versions: every write appends a version; a soft delete appends a copy marked deleted, a
rollback appends a copy of the chosen version. A hard delete removes the id and its blobs.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import threading
import time
from abc import abstractmethod
from collections import Counter
from dataclasses import dataclass, fields
from typing import Callable, Sequence

import numpy as np

from ntkmirror.controller import Controller
from ntkmirror.errors import ConfigError, NotFound, StoreError

from . import embed as text_embed
from . import sketch as ctrl_sketch
from .base import MemoryItem, MemoryStore, SearchHit, validate_id, validate_tags
from .retrieval import DEFAULT_FUSION, FUSIONS, MIN_DENSE, RARE_DF, TenantIndex

ITEM_FIELDS = tuple(f.name for f in fields(MemoryItem) if f.name != "warnings")
MAX_TEXT, MAX_METADATA = 100_000, 65_536

# A write (id, op, make): `make` gets the id's version records (oldest first) and returns the
# new record and the blob to store with it (None: already stored), or None to write nothing.
# `op` (put, delete, rollback) names the write in the audit log.
Make = Callable[[list], "tuple[dict, bytes | None] | None"]


def to_item(rec: dict) -> MemoryItem:
    return MemoryItem(**{k: rec[k] for k in ITEM_FIELDS if k in rec})


def encode_vec(v: np.ndarray) -> str:
    return base64.b64encode(np.asarray(v, np.float32).tobytes()).decode()


def decode_vec(s: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(s), np.float32)


def _row(rec: dict) -> tuple:
    """What the index keeps of a record."""
    return rec["id"], rec["version"], rec["text"], rec["tags"], decode_vec(rec["embedding"]), decode_vec(rec["sketch"])


def blob_problems(versions: Sequence[dict], blobs: dict[str, bytes]) -> list[tuple[str, str]]:
    """(kind, detail) for one item: blobs its versions reference but that are missing, blobs no
    version references, and blobs whose bytes do not match their sha256. Shared by the backends' audits."""
    wanted = {v["controller_sha256"] for v in versions}
    out = [("missing_blob", f"controller blob {sha[:12]} referenced by version(s) "
            f"{sorted(v['version'] for v in versions if v['controller_sha256'] == sha)} is missing")
           for sha in sorted(wanted - blobs.keys())]
    out += [("orphan_blob", f"blob {sha[:12]} is referenced by no version") for sha in sorted(blobs.keys() - wanted)]
    out += [("corrupt_blob", f"blob {sha[:12]} does not match its sha256")
            for sha, data in blobs.items() if hashlib.sha256(data).hexdigest() != sha]
    return out


def softmax_weights(scores: Sequence[float], temperature: float) -> list[float]:
    if not scores:
        return []
    z = np.asarray(scores, np.float64) / temperature
    e = np.exp(z - z.max())
    return (e / e.sum()).tolist()


@dataclass
class IndexState:
    index: TenantIndex
    cursor: object = None  # the backend's change-feed position the index reflects
    unsaved: int = 0  # changes applied since the last snapshot


class IndexedStore(MemoryStore):
    """A MemoryStore over a few storage primitives (the abstract `_` methods below)."""

    def __init__(self, approx_threshold: int = 20000, nprobe: int = 16, dup_threshold: float = 0.95,
                 fusion: str = DEFAULT_FUSION, min_dense: float = MIN_DENSE, rare_df: float = RARE_DF,
                 temperature: float = 0.25):
        if fusion not in FUSIONS:
            raise ConfigError(f"unknown fusion {fusion!r}; use one of {', '.join(FUSIONS)}")
        if not temperature > 0:
            raise ConfigError("temperature must be positive")
        self.approx_threshold, self.nprobe = int(approx_threshold), int(nprobe)
        self.dup_threshold, self.fusion, self.temperature = dup_threshold, fusion, temperature
        self.min_dense, self.rare_df = min_dense, rare_df
        self._states: dict[str, IndexState] = {}
        self._mutex = threading.RLock()  # one refresh at a time per process

    # ------------------------------------------------------------ backend primitives
    @abstractmethod
    def _records(self, tenant: str, id: str) -> list[dict]:
        """Every version record of an id, oldest first ([] if none)."""

    @abstractmethod
    def _append(self, tenant: str, writes: list[tuple[str, str, Make]]) -> list[dict | None]:
        """Apply each write atomically per id (under a lock or a transaction); distinct ids."""

    @abstractmethod
    def _purge(self, tenant: str, id: str) -> None:
        """Remove every version and blob of an id; NotFound if there is none."""

    @abstractmethod
    def _blob(self, tenant: str, id: str, sha: str) -> bytes | None:
        ...

    @abstractmethod
    def _ids(self, tenant: str) -> list[str]:
        """Every id of the tenant (deleted ones included), sorted."""

    @abstractmethod
    def _current(self, tenant: str, ids: Sequence[str] | None = None) -> dict[str, dict]:
        """The latest record of each id (all ids when None), deleted ones included."""

    @abstractmethod
    def _changes(self, tenant: str, cursor) -> tuple[object, dict[str, dict | None] | None]:
        """(new cursor, {id: latest record or None if purged}) since `cursor`; None: rebuild
        from `_current` (first call, or the feed cannot tell)."""

    @abstractmethod
    def _audit_storage(self, tenant: str) -> tuple[dict, list[dict]]:
        """(counts, problems): missing, orphan and corrupt blobs, unreadable records, leftovers."""

    def _load_snapshot(self, tenant: str) -> IndexState | None:
        return None

    def _save_snapshot(self, tenant: str, state: IndexState) -> None:
        pass

    # ------------------------------------------------------------ writes
    def put(self, tenant: str, id: str, controller: Controller, text: str, tags: Sequence[str] = (),
            metadata: dict | None = None, request_id: str | None = None) -> MemoryItem:
        return self.put_many(tenant, [dict(id=id, controller=controller, text=text, tags=tags, metadata=metadata,
                                           request_id=request_id)])[0]

    def put_many(self, tenant: str, entries: Sequence[dict]) -> list[MemoryItem]:
        """Bulk put: one embedding batch, one near-duplicate search, one lock/transaction per batch.
        An entry may carry `embedding`: its text's embedding by the store's embedder, precomputed,
        and `request_id`: a retry of a put with the same id and request_id writes nothing and
        returns the version that put made (the same request_id with other content is refused)."""
        tenant = validate_id(tenant, "tenant")
        prepared = [self._prepare(tenant, **e) for e in entries]
        ids = [f["id"] for f, _, _ in prepared]
        if len(set(ids)) != len(ids):
            raise ConfigError("put_many: an id appears twice in one batch")
        if not prepared:
            return []
        vecs = [self._given_embedding(e) for e in entries]
        todo = [i for i, v in enumerate(vecs) if v is None]
        for i, v in zip(todo, text_embed.embed([prepared[i][0]["text"] for i in todo])):
            vecs[i] = v
        sketches = np.stack([ctrl_sketch.sketch(c) for _, c, _ in prepared])
        warnings = self._near_duplicates(tenant, ids, sketches)
        writes = []
        for (f, _, blob), v, s in zip(prepared, vecs, sketches):
            f.update(embedding=encode_vec(v), sketch=encode_vec(s))
            writes.append((f["id"], "put", lambda vs, f=f, blob=blob: None if self._replayed(f, vs) else
                           self._new_version(f, blob, vs)))
        written = self._append(tenant, writes)
        items = [to_item(r if r is not None else self._replayed(f, self._records(tenant, f["id"])))
                 for r, (f, _, _) in zip(written, prepared)]
        for item, w in zip(items, warnings):
            item.warnings = w
        return items

    @staticmethod
    def _replayed(f: dict, versions: list[dict]) -> dict | None:
        """The version an earlier put with f's request_id made, if any (checked inside the write's
        lock/transaction, so a retry racing its original cannot write twice)."""
        rid = f.get("request_id")
        old = next((v for v in versions if rid and v.get("request_id") == rid), None)
        if old is not None and (old["controller_sha256"], old["text"]) != (f["controller_sha256"], f["text"]):
            raise ConfigError(f"memory {f['id']!r}: request id {rid!r} was already used for other content")
        return old

    @staticmethod
    def _given_embedding(entry: dict) -> np.ndarray | None:
        """An entry may carry its text embedding (computed elsewhere, e.g. on a GPU, in bulk)."""
        v = entry.get("embedding")
        if v is None:
            return None
        v = np.asarray(v, np.float32).reshape(-1)
        norm = float(np.linalg.norm(v))
        if v.shape != (text_embed.DIM,) or not math.isfinite(norm) or norm == 0:
            raise ConfigError(f"memory {entry.get('id')!r}: embedding must be {text_embed.DIM} finite numbers, "
                              f"not all zero (from {text_embed.EMBEDDER})")
        return v / norm

    @staticmethod
    def _prepare(tenant: str, id: str, controller: Controller, text: str, tags: Sequence[str] = (),
                 metadata: dict | None = None, embedding=None, request_id: str | None = None
                 ) -> tuple[dict, Controller, bytes]:
        validate_id(id)
        if request_id is not None and not (isinstance(request_id, str) and 1 <= len(request_id) <= 255
                                           and request_id.isprintable()):
            raise ConfigError(f"memory {id!r}: request id must be 1-255 printable characters")
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f"memory {id!r}: text must be a non-empty string (it is what retrieval matches)")
        if len(text) > MAX_TEXT:
            raise ConfigError(f"memory {id!r}: text longer than {MAX_TEXT} characters")
        if not isinstance(metadata, (dict, type(None))):
            raise ConfigError(f"memory {id!r}: metadata must be a JSON object, not {type(metadata).__name__}")
        metadata = dict(metadata or {})
        try:
            if len(json.dumps(metadata, allow_nan=False)) > MAX_METADATA:
                raise ConfigError(f"memory {id!r}: metadata larger than {MAX_METADATA} bytes of JSON")
        except (TypeError, ValueError) as e:  # ValueError: NaN/Infinity, which JSON cannot hold
            raise ConfigError(f"memory {id!r}: metadata must be JSON-serialisable ({e})") from None
        if not isinstance(controller, Controller):
            raise ConfigError(f"memory {id!r}: controller must be a Controller")
        blob = controller.validate().to_bytes("safetensors")
        meta = controller.meta
        f = {"tenant": tenant, "id": id, "text": text, "tags": validate_tags(tags), "metadata": metadata,
             "controller_sha256": hashlib.sha256(blob).hexdigest(), "num_gates": controller.num_gates,
             "model_name": str(meta.get("model_name") or ""),
             "model_fingerprint": str(meta.get("model_fingerprint") or ""),
             "data_hash": str(meta.get("data_hash") or "")}
        if request_id is not None:
            f["request_id"] = request_id
        return f, controller, blob

    @staticmethod
    def _new_version(f: dict, blob: bytes, versions: list[dict]) -> tuple[dict, bytes]:
        now = time.time()
        return {**f, "version": versions[-1]["version"] + 1 if versions else 1,
                "created_at": versions[0]["created_at"] if versions else now, "updated_at": now,
                "deleted": False}, blob

    @staticmethod
    def _copy_version(src: dict, versions: list[dict], deleted: bool) -> dict:
        return {**src, "version": versions[-1]["version"] + 1, "updated_at": time.time(), "deleted": deleted}

    def _near_duplicates(self, tenant: str, ids: list[str], sketches: np.ndarray) -> list[list[str]]:
        with self._mutex:
            found = self._index(tenant).nearest(sketches, ids)
        return [[f"controller is a near-duplicate of memory {other!r} (sketch cosine {cos:.3f})"]
                if other is not None and cos >= self.dup_threshold else [] for other, cos in found]

    def rollback(self, tenant: str, id: str, version: int | None = None) -> MemoryItem:
        tenant, id = validate_id(tenant, "tenant"), validate_id(id)

        def make(vs):
            if not vs:
                raise NotFound(f"no memory {id!r} in tenant {tenant!r}")
            if version is None:  # the latest live version before the current one (or the deleted one itself)
                pool = vs if vs[-1]["deleted"] else vs[:-1]
                live = [v for v in pool if not v["deleted"]]
                if not live:
                    raise StoreError(f"memory {id!r} has no earlier version to roll back to")
                target = live[-1]
            else:
                target = next((v for v in vs if v["version"] == version), None)
                if target is None:
                    raise NotFound(f"memory {id!r} has no version {version} "
                                   f"(versions {vs[0]['version']}..{vs[-1]['version']})")
                if target["deleted"]:
                    raise StoreError(f"version {version} of memory {id!r} is a deletion marker")
            return self._copy_version(target, vs, deleted=False), None

        return to_item(self._append(tenant, [(id, "rollback", make)])[0])

    def delete(self, tenant: str, id: str, hard: bool = False) -> None:
        tenant, id = validate_id(tenant, "tenant"), validate_id(id)
        if hard:
            self._purge(tenant, id)
            return

        def make(vs):
            if not vs:
                raise NotFound(f"no memory {id!r} in tenant {tenant!r}")
            if vs[-1]["deleted"]:
                return None  # already deleted: nothing to write
            return self._copy_version(vs[-1], vs, deleted=True), None

        self._append(tenant, [(id, "delete", make)])

    # ------------------------------------------------------------ reads
    def _record(self, tenant: str, id: str, version: int | None, include_deleted: bool) -> dict:
        tenant, id = validate_id(tenant, "tenant"), validate_id(id)
        vs = self._records(tenant, id)
        if not vs:
            raise NotFound(f"no memory {id!r} in tenant {tenant!r}")
        if version is None:
            rec = vs[-1]
        else:
            rec = next((v for v in vs if v["version"] == int(version)), None)
            if rec is None:
                raise NotFound(f"memory {id!r} has no version {version}")
        if rec["deleted"] and not include_deleted:
            raise NotFound(f"memory {id!r} is deleted (rollback restores it)")
        return rec

    def get(self, tenant: str, id: str, version: int | None = None, include_deleted: bool = False) -> MemoryItem:
        return to_item(self._record(tenant, id, version, include_deleted))

    def get_controller(self, tenant: str, id: str, version: int | None = None) -> Controller:
        rec = self._record(tenant, id, version, include_deleted=False)
        where = f"memory {tenant}/{id} v{rec['version']}"
        blob = self._blob(tenant, id, rec["controller_sha256"])
        if blob is None:
            raise StoreError(f"{where}: controller blob {rec['controller_sha256'][:12]} is missing (run audit)")
        if hashlib.sha256(blob).hexdigest() != rec["controller_sha256"]:
            raise StoreError(f"{where}: controller blob is corrupt (sha256 mismatch; run audit)")
        return Controller.from_bytes(blob, "safetensors", source=where)

    def list(self, tenant: str, tags: Sequence[str] | None = None, include_deleted: bool = False) -> list[MemoryItem]:
        tenant, want = validate_id(tenant, "tenant"), set(validate_tags(tags or []))
        recs = self._current(tenant).values()
        return sorted((to_item(r) for r in recs if (include_deleted or not r["deleted"]) and want <= set(r["tags"])),
                      key=lambda i: i.id)

    def versions(self, tenant: str, id: str) -> list[MemoryItem]:
        tenant, id = validate_id(tenant, "tenant"), validate_id(id)
        vs = self._records(tenant, id)
        if not vs:
            raise NotFound(f"no memory {id!r} in tenant {tenant!r}")
        return [to_item(v) for v in vs]

    # ------------------------------------------------------------ retrieval
    def _index(self, tenant: str) -> TenantIndex:
        with self._mutex:
            st = self._states.get(tenant)
            if st is None:
                st = self._states[tenant] = self._load_snapshot(tenant) or IndexState(self._new_index())
            self._refresh(tenant, st)
            if self._snapshot_due(st):
                self._save_snapshot(tenant, st)
            return st.index

    def _new_index(self) -> TenantIndex:
        return TenantIndex(text_embed.DIM, ctrl_sketch.DIM, self.approx_threshold, self.nprobe)

    @staticmethod
    def _snapshot_due(st: IndexState) -> bool:
        return st.unsaved >= max(256, len(st.index) // 10)

    def _refresh(self, tenant: str, st: IndexState) -> None:
        cursor, changed = self._changes(tenant, st.cursor)
        if changed is None:  # first sight, or a feed that cannot tell: rebuild from the records,
            st.index, rows = self._new_index(), []  # read in chunks (bounded memory), indexed at once
            ids = self._ids(tenant)
            for lo in range(0, len(ids), 5000):
                rows += [_row(r) for r in self._current(tenant, ids[lo: lo + 5000]).values() if not r["deleted"]]
            st.index.upsert_many(rows)
            n = len(ids)
        else:
            for id, rec in changed.items():
                if rec is None or rec["deleted"]:
                    st.index.remove(id)
            st.index.upsert_many([_row(r) for r in changed.values() if r and not r["deleted"]])
            n = len(changed)
        st.cursor, st.unsaved = cursor, st.unsaved + n
        if st.index.stale > max(1024, len(st.index)):  # superseded rows outnumber live ones
            st.index = st.index.compacted()

    def search(self, tenant: str, query: str, top_k: int = 3, tags: Sequence[str] | None = None,
               controller: Controller | None = None, fusion: str | None = None, min_score: float | None = None,
               query_embedding: np.ndarray | None = None) -> list[SearchHit]:
        """See MemoryStore.search; `query_embedding` skips embedding the query (precomputed)."""
        tenant = validate_id(tenant, "tenant")
        if not isinstance(query, str) or not query.strip():
            raise ConfigError("the query must be a non-empty string")
        if not isinstance(top_k, int) or top_k < 1:
            raise ConfigError(f"top_k must be a positive integer, got {top_k!r}")
        fusion = fusion or self.fusion
        if fusion not in FUSIONS:
            raise ConfigError(f"unknown fusion {fusion!r}; use one of {', '.join(FUSIONS)}")
        tags = validate_tags(tags or [])
        qv = text_embed.embed_query(query) if query_embedding is None else np.asarray(query_embedding, np.float32)
        if qv.shape != (text_embed.DIM,):
            raise ConfigError(f"query_embedding must have shape ({text_embed.DIM},), got {qv.shape}")
        sk = ctrl_sketch.sketch(controller.validate()) if controller is not None else None
        floor = self.min_dense if min_score is None else float(min_score)
        if not math.isfinite(floor):
            raise ConfigError("min_score must be a finite number")
        with self._mutex:
            cands = self._index(tenant).search(qv, query, top_k, tags, sk, fusion, floor, self.rare_df)
        return self._hits(tenant, [(c.id, c.version, c.score, c.dense, c.lexical, c.controller) for c in cands])

    def similar(self, tenant: str, id: str, top_k: int = 5) -> list[SearchHit]:
        rec = self._record(tenant, id, None, include_deleted=False)
        if not isinstance(top_k, int) or top_k < 1:
            raise ConfigError(f"top_k must be a positive integer, got {top_k!r}")
        with self._mutex:
            found = self._index(rec["tenant"]).similar(decode_vec(rec["sketch"]), top_k, exclude=rec["id"])
        return self._hits(rec["tenant"], [(i, v, s, None, None, s) for i, v, s in found])

    def _hits(self, tenant: str, found: list[tuple]) -> list[SearchHit]:
        hits = []
        for id, version, score, dense, lexical, ctrl in found:
            rec = next((v for v in self._records(tenant, id) if v["version"] == version), None)
            if rec is not None:  # None: purged since the index last looked
                hits.append(SearchHit(to_item(rec), score, 0.0, dense, lexical, ctrl))
        for h, w in zip(hits, softmax_weights([h.score for h in hits], self.temperature)):
            h.weight = w
        return hits

    # ------------------------------------------------------------ maintenance
    def audit(self, tenant: str | None = None) -> dict:
        tenants = [validate_id(tenant, "tenant")] if tenant is not None else self.tenants()
        report = {"ok": True, "tenants": {}, "problems": []}
        for t in tenants:
            counts, problems = self._audit_storage(t)
            recs = self._current(t).values()
            live = [r for r in recs if not r["deleted"]]
            models = Counter(f"{r['model_name']} ({r['model_fingerprint'] or 'no fingerprint'})" for r in live)
            if len(models) > 1:
                problems.append({"tenant": t, "kind": "mixed_models", "id": None,
                                 "detail": "live memories come from different models and cannot be composed "
                                           "together: " + "; ".join(f"{n} x {m}" for m, n in models.items())})
            report["tenants"][t] = {"items": len(live), "deleted": len(recs) - len(live), "models": dict(models),
                                    **counts}
            report["problems"] += problems
        report["ok"] = not report["problems"]
        return report

    def close(self) -> None:
        with self._mutex:
            self._states.clear()
