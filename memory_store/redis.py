"""The Redis backend (plain Redis 7, no modules): Redis is the source of truth.

Keys, namespaced by tenant (ids and tenants are slugs, so ':' cannot occur in them):

    {p}:tenants                  SET of tenants
    {p}:t:{tenant}:gen           the tenant's version counter (INCR on every write)
    {p}:t:{tenant}:log           STREAM: one entry per write (op, id, version, sha, time); the
                                 audit log and the change feed the in-process indices follow,
                                 trimmed to about log_maxlen entries (a follower whose place in it
                                 was trimmed away rebuilds from the records)
    {p}:t:{tenant}:ids           SET of ids
    {p}:t:{tenant}:item:{id}     HASH: last -> latest version, v:{n} -> version record (JSON with
                                 base64 embeddings), b:{sha256} -> controller bytes

A write is one MULTI/EXEC under WATCH of the item keys it reads; a hard delete removes the
item hash (every version and blob) in the same kind of transaction. FAISS indices are built
in each process and refreshed when the tenant's counter moves.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager

import redis
from redis.exceptions import RedisError, WatchError

from ntkmirror.errors import ConfigError, NotFound, StoreError

from .base import validate_id
from .store import IndexedStore, blob_problems


class RedisStore(IndexedStore):
    """log_maxlen: entries of each tenant's stream kept (about: Redis trims whole nodes); None keeps all."""

    def __init__(self, url: str, prefix: str = "ntkm", socket_timeout: float = 30.0, batch: int = 1000,
                 log_maxlen: int | None = 100_000, **kwargs):
        if log_maxlen is not None and (isinstance(log_maxlen, bool) or not isinstance(log_maxlen, int) or log_maxlen < 1):
            raise ConfigError(f"log_maxlen must be a positive integer or None, got {log_maxlen!r}")
        super().__init__(**kwargs)
        self.url, self.prefix, self.batch, self.log_maxlen = url, prefix, batch, log_maxlen
        self._where = url.split("@")[-1]  # never echo credentials
        with self._errors():
            self.r = redis.Redis.from_url(url, socket_timeout=socket_timeout, socket_connect_timeout=10)
            self.r.ping()

    def __repr__(self) -> str:
        return f"RedisStore({self._where!r})"

    @contextmanager
    def _errors(self):
        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise StoreError(f"memory store unavailable: cannot reach Redis at {self._where} ({e})") from None
        except WatchError:
            raise
        except RedisError as e:
            raise StoreError(f"Redis error at {self._where}: {e}") from None

    # ------------------------------------------------------------ keys
    def _k(self, tenant: str, *parts: str) -> str:
        return ":".join((self.prefix, "t", tenant, *parts))

    def _item_key(self, tenant: str, id: str) -> str:
        return self._k(tenant, "item", id)

    def _log(self, p, tenant: str, op: str, id: str, version: int, sha: str, now: float) -> None:
        """Queue one change-feed entry on pipeline p; Redis trims the stream as it appends."""
        p.xadd(self._k(tenant, "log"), {"op": op, "id": id, "version": version, "sha": sha, "time": now},
               maxlen=self.log_maxlen, approximate=True)

    # ------------------------------------------------------------ primitives
    def _records(self, tenant, id):
        with self._errors():
            key = self._item_key(tenant, id)
            last = self.r.hget(key, "last")
            if last is None:
                return []
            raw = self.r.hmget(key, [f"v:{n}" for n in range(1, int(last) + 1)])
        return [json.loads(x) for x in raw if x is not None]

    def _append(self, tenant, writes):
        out = []
        for lo in range(0, len(writes), self.batch):
            out += self._append_batch(tenant, writes[lo: lo + self.batch])
        return out

    def _append_batch(self, tenant, writes):
        keys = [self._item_key(tenant, id) for id, _, _ in writes]
        with self._errors(), self.r.pipeline() as p:
            while True:
                try:
                    p.watch(*keys)  # a concurrent write to any of these ids restarts the batch
                    versions = self._read_many(p, keys)
                    results = [make(vs) for (_, _, make), vs in zip(writes, versions)]
                    p.multi()
                    now = time.time()
                    for (id, op, _), key, res in zip(writes, keys, results):
                        if res is None:
                            continue
                        rec, blob = res
                        if blob is not None:
                            p.hset(key, f"b:{rec['controller_sha256']}", blob)
                        p.hset(key, mapping={f"v:{rec['version']}": json.dumps(rec), "last": rec["version"]})
                        p.sadd(self._k(tenant, "ids"), id)
                        self._log(p, tenant, op, id, rec["version"], rec["controller_sha256"], now)
                    if any(r is not None for r in results):
                        p.incr(self._k(tenant, "gen"))
                        p.sadd(f"{self.prefix}:tenants", tenant)
                    p.execute()
                    return [r[0] if r else None for r in results]
                except WatchError:
                    continue

    def _read_many(self, p, keys: list[str]) -> list[list[dict]]:
        """Version records of several items in two pipelined round trips (the keys are WATCHed on p)."""
        q = self.r.pipeline(transaction=False)
        for key in keys:
            q.hget(key, "last")
        lasts = q.execute()
        for key, last in zip(keys, lasts):
            if last is not None:
                q.hmget(key, [f"v:{n}" for n in range(1, int(last) + 1)])
        raws = iter(q.execute())
        return [[json.loads(x) for x in next(raws) if x is not None] if last is not None else [] for last in lasts]

    def _purge(self, tenant, id):
        key = self._item_key(tenant, id)
        with self._errors(), self.r.pipeline() as p:
            while True:
                try:
                    p.watch(key)
                    last = p.hget(key, "last")
                    if last is None:
                        raise NotFound(f"no memory {id!r} in tenant {tenant!r}")
                    p.multi()
                    p.delete(key)
                    p.srem(self._k(tenant, "ids"), id)
                    self._log(p, tenant, "purge", id, int(last), "", time.time())
                    p.incr(self._k(tenant, "gen"))
                    p.execute()
                    return
                except WatchError:
                    continue

    def _blob(self, tenant, id, sha):
        with self._errors():
            return self.r.hget(self._item_key(tenant, id), f"b:{sha}")

    def _ids(self, tenant):
        with self._errors():
            return sorted(x.decode() for x in self.r.smembers(self._k(tenant, "ids")))

    def _current(self, tenant, ids=None):
        with self._errors():
            if ids is None:
                ids = self._ids(tenant)
            out = {}
            for lo in range(0, len(ids), 10000):
                chunk = ids[lo: lo + 10000]
                q = self.r.pipeline(transaction=False)
                for id in chunk:
                    q.hget(self._item_key(tenant, id), "last")
                lasts = q.execute()
                for id, last in zip(chunk, lasts):
                    if last is not None:
                        q.hget(self._item_key(tenant, id), f"v:{int(last)}")
                for id, raw in zip([i for i, l in zip(chunk, lasts) if l is not None], q.execute()):
                    if raw is not None:
                        out[id] = json.loads(raw)
            return out

    def _changes(self, tenant, cursor):
        """cursor: (gen, last stream id). The counter is one cheap GET when nothing changed."""
        with self._errors():
            gen = int(self.r.get(self._k(tenant, "gen")) or 0)
            if cursor is not None and gen == cursor[0]:
                return cursor, {}
            q = self.r.pipeline(transaction=True)  # counter and stream read as one snapshot
            q.get(self._k(tenant, "gen"))
            if cursor is None or gen < cursor[0]:  # first look, or the data was reset: rebuild
                q.xrevrange(self._k(tenant, "log"), count=1)
                gen, last = q.execute()
                return (int(gen or 0), last[0][0].decode() if last else "0-0"), None
            q.xrange(self._k(tenant, "log"), min=f"({cursor[1]}", max="+")
            q.xrange(self._k(tenant, "log"), count=1)  # the oldest entry kept
            gen, entries, oldest = q.execute()
            if not entries:
                return (int(gen or 0), cursor[1]), {}
            if _stream_id(oldest[0][0]) > _stream_id(cursor[1]):  # trimmed past the cursor: changes may be lost
                return (int(gen or 0), entries[-1][0].decode()), None
            ids = list(dict.fromkeys(e[1][b"id"].decode() for e in entries))
            cur = self._current(tenant, ids)
            return (int(gen or 0), entries[-1][0].decode()), {id: cur.get(id) for id in ids}

    def history(self, tenant, id=None, limit=100):
        tenant = validate_id(tenant, "tenant")
        if id is not None:
            validate_id(id)
        out, top = [], "+"
        with self._errors():
            while len(out) < limit:  # newest first, in pages, filtered by id
                page = self.r.xrevrange(self._k(tenant, "log"), max=top, count=max(limit, 256))
                for sid, f in page:
                    e = {k.decode(): v.decode() for k, v in f.items()}
                    if id is None or e["id"] == id:
                        out.append({"op": e["op"], "id": e["id"], "version": int(e["version"]), "sha": e["sha"],
                                    "time": float(e["time"]), "stream_id": sid.decode()})
                if len(page) < max(limit, 256):
                    break
                top = f"({page[-1][0].decode()}"
        return out[:limit]

    def tenants(self):
        with self._errors():
            return sorted(x.decode() for x in self.r.smembers(f"{self.prefix}:tenants"))

    def _audit_storage(self, tenant):
        problems, versions, blobs, nbytes = [], 0, 0, 0

        def problem(kind, id, detail):
            problems.append({"tenant": tenant, "kind": kind, "id": id, "detail": detail})

        with self._errors():
            ids = self._ids(tenant)
            for id in ids:
                h = self.r.hgetall(self._item_key(tenant, id))
                if not h:
                    problem("missing_item", id, "listed in the tenant's ids but has no data")
                    continue
                try:
                    vs = [json.loads(v) for k, v in h.items() if k.startswith(b"v:")]
                except ValueError as e:
                    problem("unreadable_record", id, f"a version record is not valid JSON ({e})")
                    continue
                versions += len(vs)
                if int(h.get(b"last", 0)) != max((v["version"] for v in vs), default=0):
                    problem("bad_last", id, "the 'last' field does not match the stored versions")
                stored = {k[2:].decode(): v for k, v in h.items() if k.startswith(b"b:")}
                blobs, nbytes = blobs + len(stored), nbytes + sum(map(len, stored.values()))
                for kind, detail in blob_problems(vs, stored):
                    problem(kind, id, detail)
            # item hashes that the ids set forgot
            listed = set(ids)
            for key in self.r.scan_iter(match=self._item_key(tenant, "*"), count=1000):
                id = key.decode().rsplit(":", 1)[-1]
                if id not in listed:
                    problem("orphan_item", id, "item data not listed in the tenant's ids")
        return {"versions": versions, "blobs": blobs, "blob_bytes": nbytes}, problems

    def close(self) -> None:
        super().close()
        try:
            self.r.close()
        except Exception:
            pass


def _stream_id(sid: bytes | str) -> tuple[int, int]:
    """A stream entry id ("ms-seq") as a comparable pair."""
    ms, seq = (sid.decode() if isinstance(sid, bytes) else sid).split("-")
    return int(ms), int(seq)
