"""Service state (tenants, hashed API keys, fit jobs) next to the memory store.

A Redis store keeps it in the same Redis under `ntkmirror:svc:`; a local store keeps it in
one JSON file under the store directory (`.services/state.json`: a dot name, so it can
never collide with a tenant's directory), written atomically under a file lock.
Values are small JSON objects. Any backend failure becomes a StoreError (HTTP 503).
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from pathlib import Path

from ntkmirror.errors import StoreError


class StateStore(ABC):
    @staticmethod
    def from_url(url: str) -> "StateStore":
        if str(url).startswith(("redis://", "rediss://", "unix://")):
            return RedisState(str(url))
        return FileState(Path(url) / ".services" / "state.json")

    @abstractmethod
    def get(self, key: str) -> dict | None: ...

    @abstractmethod
    def put(self, key: str, value: dict) -> None: ...

    @abstractmethod
    def put_if_absent(self, key: str, value: dict) -> dict | None:
        """Store value under key unless the key exists (atomically); return the existing value, or
        None when this call stored it."""

    @abstractmethod
    def delete(self, key: str) -> bool: ...

    @abstractmethod
    def incr(self, key: str, ttl_s: int) -> int:
        """Increment a short-lived counter (rate limits) and return its new value."""

    def ping(self) -> None:
        self.get("ping")


class RedisState(StateStore):
    PREFIX = "ntkmirror:svc:"

    def __init__(self, url: str):
        import redis

        self._errors = (redis.RedisError, OSError)
        self.r = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0, decode_responses=True)

    def _call(self, fn, *args, **kw):
        try:
            return fn(*args, **kw)
        except self._errors as e:
            raise StoreError(f"state store unavailable ({type(e).__name__})") from None

    def get(self, key):
        raw = self._call(self.r.get, self.PREFIX + key)
        return json.loads(raw) if raw is not None else None

    def put(self, key, value):
        self._call(self.r.set, self.PREFIX + key, json.dumps(value))

    def put_if_absent(self, key, value):
        while True:
            if self._call(self.r.set, self.PREFIX + key, json.dumps(value), nx=True):
                return None
            old = self.get(key)
            if old is not None:  # else it was deleted in between: try again
                return old

    def delete(self, key):
        return bool(self._call(self.r.delete, self.PREFIX + key))

    def incr(self, key, ttl_s):
        def run():
            pipe = self.r.pipeline()
            pipe.incr(self.PREFIX + key)
            pipe.expire(self.PREFIX + key, ttl_s)
            return pipe.execute()[0]

        return int(self._call(run))

    def ping(self):
        self._call(self.r.ping)


class FileState(StateStore):
    """One JSON document; readers reload it when its mtime changes. Counters stay in memory
    (so with several ingress replicas on a local store, rate limits are per replica)."""

    def __init__(self, path: Path):
        from filelock import FileLock

        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"state directory is not writable ({type(e).__name__})") from None
        self.lock = FileLock(str(self.path) + ".lock", timeout=30)
        self._data: dict = {}
        self._stamp = None
        self._counters: dict[str, tuple[int, float]] = {}
        self._mu = threading.Lock()

    def _load(self) -> dict:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._data, self._stamp = {}, None
            return self._data
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            try:
                self._data = json.loads(self.path.read_text())
            except (OSError, ValueError) as e:
                raise StoreError(f"service state file is unreadable ({type(e).__name__})") from None
            self._stamp = stamp
        return self._data

    def _write(self, data: dict) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".state.")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)  # readers see the old or the new file, never half of one
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._stamp = None

    def _update(self, fn):
        try:
            with self._mu, self.lock:
                data = dict(self._load())
                out = fn(data)
                self._write(data)
                return out
        except StoreError:
            raise
        except OSError as e:
            raise StoreError(f"service state is not writable ({type(e).__name__})") from None

    def get(self, key):
        with self._mu:
            value = self._load().get(key)
        return json.loads(json.dumps(value)) if value is not None else None  # a copy

    def put(self, key, value):
        self._update(lambda d: d.__setitem__(key, value))

    def put_if_absent(self, key, value):
        def run(d):
            if key in d:
                return json.loads(json.dumps(d[key]))
            d[key] = value
            return None

        return self._update(run)

    def delete(self, key):
        return self._update(lambda d: d.pop(key, None) is not None)

    def incr(self, key, ttl_s):
        now = time.monotonic()
        with self._mu:
            n, expires = self._counters.get(key, (0, now + ttl_s))
            if now >= expires:
                n, expires = 0, now + ttl_s
            self._counters[key] = (n + 1, expires)
            if len(self._counters) > 10_000:  # drop expired windows
                self._counters = {k: v for k, v in self._counters.items() if v[1] > now}
            return n + 1
