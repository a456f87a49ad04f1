"""The embedded default backend: a local directory.

    <root>/tenants/<tenant>/
        lock                       file lock: one writer at a time, across processes
        journal.jsonl              append-only change feed and audit log (one line per write)
        index.npz                  snapshot of the in-process index (serialised FAISS indices); a cache
        items/<id>/record.json     every version record of the id, replaced atomically
        items/<id>/<sha256>.safetensors   controller blobs, content-addressed within the id

A write, under the lock: blob first, then the journal line, then the record (tmp file +
os.replace). A crash at any point leaves the previous version readable. Readers never lock,
except to wait for a writer whose journal line is ahead of its record.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
from filelock import FileLock, Timeout

from ntkmirror.errors import NotFound, StoreError

from . import embed as text_embed
from .base import ID_PATTERN, validate_id
from .retrieval import TenantIndex
from .store import IndexedStore, IndexState, blob_problems

RECORD, JOURNAL, SNAPSHOT, BLOB_SUFFIX, TMP_PREFIX = "record.json", "journal.jsonl", "index.npz", ".safetensors", ".tmp-"


class LocalStore(IndexedStore):
    def __init__(self, root: str | Path, durable: bool = True, lock_timeout: float = 120.0, **kwargs):
        """durable: fsync files before they replace old ones (a power cut cannot leave a torn record)."""
        super().__init__(**kwargs)
        root = str(root)
        self.root = Path(root[len("file://"):] if root.startswith("file://") else root).expanduser()
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"memory store {self.root} is not a directory")
        self.durable, self.lock_timeout = durable, lock_timeout
        self._locks: dict[str, FileLock] = {}

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    # ------------------------------------------------------------ paths and files
    def _tdir(self, tenant: str) -> Path:
        return self.root / "tenants" / tenant

    def _idir(self, tenant: str, id: str) -> Path:
        return self._tdir(tenant) / "items" / id

    def _lock(self, tenant: str):
        lock = self._locks.get(tenant)
        if lock is None:
            self._tdir(tenant).mkdir(parents=True, exist_ok=True)
            lock = self._locks[tenant] = FileLock(str(self._tdir(tenant) / "lock"), timeout=self.lock_timeout)
        return _Held(lock, tenant)

    def _write_file(self, path: Path, data: bytes, sync: bool) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                if sync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if sync:
            _fsync_dir(path.parent)

    def _read_versions(self, tenant: str, id: str) -> list[dict]:
        path = self._idir(tenant, id) / RECORD
        try:
            return json.loads(path.read_bytes())["versions"]
        except FileNotFoundError:
            return []
        except (ValueError, KeyError, TypeError) as e:
            raise StoreError(f"{path}: unreadable record ({type(e).__name__}: {e}); run audit") from None
        except OSError as e:
            raise StoreError(f"{path}: cannot read ({e.strerror})") from None

    def _latest(self, tenant: str, id: str) -> dict | None:
        vs = self._read_versions(tenant, id)
        return vs[-1] if vs else None

    def _journal(self, tenant: str, entries: list[dict], sync: bool) -> None:
        path = self._tdir(tenant) / JOURNAL
        with open(path, "a+b") as f:  # appends go to the end whatever the read position
            torn = False
            if f.seek(0, os.SEEK_END) > 0:
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"  # a writer died mid-line: end its line, so ours stays whole
            f.write((b"\n" if torn else b"") +
                    b"".join(json.dumps(e, separators=(",", ":")).encode() + b"\n" for e in entries))
            if sync:
                f.flush()
                os.fsync(f.fileno())

    # ------------------------------------------------------------ primitives
    def _records(self, tenant: str, id: str) -> list[dict]:
        return self._read_versions(tenant, id)

    def _append(self, tenant, writes):
        out, pending = [], []
        with self._lock(tenant):
            for id, op, make in writes:
                vs = self._read_versions(tenant, id)
                res = make(vs)
                out.append(res[0] if res else None)
                if res:
                    pending.append((id, op, vs, *res))
            if not pending:
                return out
            # many files: one global flush per phase beats an fsync per file
            each, batch = self.durable and len(pending) == 1, self.durable and len(pending) > 1
            for id, _, _, rec, blob in pending:
                path = self._idir(tenant, id) / (rec["controller_sha256"] + BLOB_SUFFIX)
                if blob is not None and not path.exists():
                    self._write_file(path, blob, each)
            if batch:
                os.sync()
            now = time.time()
            self._journal(tenant, [{"op": op, "id": id, "version": rec["version"], "sha": rec["controller_sha256"],
                                    "time": now} for id, op, _, rec, _ in pending], self.durable)
            for id, _, vs, rec, _ in pending:
                self._write_file(self._idir(tenant, id) / RECORD, json.dumps({"versions": vs + [rec]}).encode(), each)
            if batch:
                os.sync()
        return out

    def _purge(self, tenant, id):
        with self._lock(tenant):
            vs = self._read_versions(tenant, id)
            if not vs:
                raise NotFound(f"no memory {id!r} in tenant {tenant!r}")
            self._journal(tenant, [{"op": "purge", "id": id, "version": vs[-1]["version"], "time": time.time()}],
                          self.durable)
            trash = self._tdir(tenant) / "trash" / f"{id}.{uuid.uuid4().hex[:8]}"
            trash.parent.mkdir(exist_ok=True)
            os.replace(self._idir(tenant, id), trash)  # atomic: the id is gone as one step
            shutil.rmtree(trash, ignore_errors=True)
            # the snapshot may hold the purged text: drop it (the next reader rebuilds)
            (self._tdir(tenant) / SNAPSHOT).unlink(missing_ok=True)

    def _blob(self, tenant, id, sha):
        try:
            return (self._idir(tenant, id) / (sha + BLOB_SUFFIX)).read_bytes()
        except FileNotFoundError:
            return None

    def _ids(self, tenant: str) -> list[str]:
        try:
            return sorted(p.name for p in (self._tdir(tenant) / "items").iterdir() if ID_PATTERN.match(p.name))
        except FileNotFoundError:
            return []

    def _current(self, tenant, ids=None):
        out = {}
        for id in self._ids(tenant) if ids is None else ids:
            try:
                rec = self._latest(tenant, id)
            except StoreError:  # an unreadable record is audit's to report; the rest stays usable
                continue
            if rec is not None:
                out[id] = rec
        return out

    def _journal_size(self, tenant: str) -> int:
        try:
            return (self._tdir(tenant) / JOURNAL).stat().st_size
        except FileNotFoundError:
            return 0

    def _changes(self, tenant, cursor):
        if cursor is None or self._journal_size(tenant) < cursor:  # first look, or the journal was replaced
            if not self._tdir(tenant).is_dir():
                return 0, None
            with self._lock(tenant):  # no writer mid-way: every line before the cursor has landed
                return self._journal_size(tenant), None
        size = self._journal_size(tenant)
        if size == cursor:
            return cursor, {}
        with open(self._tdir(tenant) / JOURNAL, "rb") as f:
            f.seek(cursor)
            data = f.read(size - cursor)
        end = data.rfind(b"\n") + 1  # a line being written is read next time
        latest = {}
        for line in data[:end].splitlines():
            try:
                e = json.loads(line)
            except ValueError:
                continue  # a torn line left by a writer that died
            latest[e["id"]] = e
        recs = self._current_with_none(tenant, latest)
        if not all(_landed(recs[id], e) for id, e in latest.items()):
            with self._lock(tenant):  # a writer is between its journal line and its record: wait for it
                recs = self._current_with_none(tenant, latest)
        return cursor + end, recs

    def _current_with_none(self, tenant, ids) -> dict:
        cur = self._current(tenant, list(ids))
        return {id: cur.get(id) for id in ids}

    def history(self, tenant: str, id: str | None = None, limit: int = 100) -> list[dict]:
        tenant = validate_id(tenant, "tenant")
        if id is not None:
            validate_id(id)
        try:
            lines = (self._tdir(tenant) / JOURNAL).read_bytes().splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in reversed(lines):
            try:
                e = json.loads(line)
            except ValueError:
                continue  # a torn last line after a crash
            if id is None or e["id"] == id:
                out.append(e)
                if len(out) >= limit:
                    break
        return out

    def tenants(self) -> list[str]:
        try:
            return sorted(p.name for p in (self.root / "tenants").iterdir()
                          if ID_PATTERN.match(p.name) and (p / "items").is_dir())
        except FileNotFoundError:
            return []

    def _audit_storage(self, tenant):
        problems, versions, blobs, nbytes = [], 0, 0, 0

        def problem(kind, id, detail):
            problems.append({"tenant": tenant, "kind": kind, "id": id, "detail": detail})

        for id in self._ids(tenant):
            d = self._idir(tenant, id)
            try:
                vs = self._read_versions(tenant, id)
            except StoreError as e:
                problem("unreadable_record", id, str(e))
                continue
            versions += len(vs)
            stored = {p.name[: -len(BLOB_SUFFIX)]: p.read_bytes() for p in d.iterdir()
                      if p.name.endswith(BLOB_SUFFIX) and not p.name.startswith(TMP_PREFIX)}
            blobs, nbytes = blobs + len(stored), nbytes + sum(map(len, stored.values()))
            for kind, detail in blob_problems(vs, stored):
                problem(kind, id, detail)
            for p in d.iterdir():
                if p.name.startswith(TMP_PREFIX):
                    problem("stale_tmp", id, f"leftover temporary file {p.name} (an interrupted write)")
        trash = self._tdir(tenant) / "trash"
        for p in sorted(trash.iterdir()) if trash.is_dir() else ():
            problem("stale_trash", None, f"leftover of an interrupted hard delete: {p.name}")
        return {"versions": versions, "blobs": blobs, "blob_bytes": nbytes}, problems

    # ------------------------------------------------------------ index snapshots
    def _load_snapshot(self, tenant):
        path = self._tdir(tenant) / SNAPSHOT
        if not path.is_file():
            return None
        try:
            with np.load(path) as z:
                arrays = {k: z[k] for k in z.files}
            ix = TenantIndex.from_arrays(arrays)
            if ix.text.dim != text_embed.DIM or ix.text.approx_threshold != self.approx_threshold:
                return None
            return IndexState(ix, int(arrays["cursor"][0]))
        except Exception:  # a cache: anything wrong with it means rebuild from the records
            return None

    def _save_snapshot(self, tenant, st):
        if not self._tdir(tenant).is_dir():
            return
        with self._lock(tenant):
            self._refresh(tenant, st)  # caught up with no writer running: never persists a purged item
            if st.index.stale:
                st.index = st.index.compacted()
            buf = io.BytesIO()
            np.savez(buf, cursor=np.array([st.cursor], np.int64), **st.index.to_arrays())
            self._write_file(self._tdir(tenant) / SNAPSHOT, buf.getvalue(), sync=False)
            st.unsaved = 0


def _landed(rec: dict | None, entry: dict) -> bool:
    """Has the record caught up with this journal line?"""
    if entry["op"] == "purge":
        return rec is None
    return rec is not None and rec["version"] >= entry["version"]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Held:
    """The tenant lock as a context manager; a timeout becomes a StoreError."""

    def __init__(self, lock: FileLock, tenant: str):
        self.lock, self.tenant = lock, tenant

    def __enter__(self):
        try:
            self.lock.acquire()
        except Timeout:
            raise StoreError(f"tenant {self.tenant!r} is locked by another writer for over "
                             f"{self.lock.timeout:.0f}s ({self.lock.lock_file})") from None
        return self

    def __exit__(self, *exc):
        self.lock.release()
