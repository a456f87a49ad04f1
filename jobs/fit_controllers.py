"""Batch fit: a manifest of memories -> controllers fitted over a replica pool -> the store.

    python -m jobs.fit_controllers --manifest m.parquet --store redis://host:6379/0 \\
        --report r.parquet --replicas 4 --pack-size 8 --address auto

Idempotent: an item already stored with the same training-data hash is skipped, so a rerun
(or a retried Ray job) does nothing more. Only this driver writes to the store, once per
item, after the replica's call has returned; replicas only compute. A bad item is reported
with its error and the others go on.
"""

from __future__ import annotations

import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from memory_store.base import MemoryStore
from ntkmirror.controller import Controller
from ntkmirror.data import Example
from ntkmirror.errors import NotFound, NtkMirrorError
from ntkmirror.fit import FitConfig

from .manifest import ManifestItem, read_manifest
from .report import Progress, plan_packs, write_parquet

REPORT_COLUMNS = ("line", "tenant", "id", "status", "version", "data_hash", "gates", "train_nll_before",
                  "train_nll_after", "seconds", "error")


def report_schema():
    import pyarrow as pa

    types = {"line": pa.int64(), "version": pa.int64(), "gates": pa.int64(), "train_nll_before": pa.float64(),
             "train_nll_after": pa.float64(), "seconds": pa.float64()}
    return pa.schema([(c, types.get(c, pa.string())) for c in REPORT_COLUMNS])


def _row(item: ManifestItem, status: str, **kw) -> dict:
    return {"line": item.line, "tenant": item.tenant, "id": item.id, "status": status,
            "data_hash": item.data_hash or None, **kw}


def _stored_hash(store: MemoryStore, item: ManifestItem) -> str | None:
    try:
        return store.get(item.tenant, item.id).data_hash
    except NotFound:
        return None


def run_fit_job(manifest: str | Path, store: str | MemoryStore, report: str | Path, replicas: int = 1,
                pack_size: int = 8, config: FitConfig | None = None, model: str | None = None,
                dtype: str | None = None, address: str | None = None, num_cpus: int | None = None,
                cpus_per_replica: float = 1, gpus_per_replica: float | None = None, force: bool = False,
                progress: bool = True, pool=None, retain: Sequence[Example] | None = None,
                contrast: Sequence[Example] | None = None) -> dict:
    """Run the batch fit; return a summary. `pool`: an existing ReplicaPool to use (else one is made);
    `retain`: the KL text of every fit (default: the library's, made on each replica); `contrast`: the
    text whose channels gate selection avoids (default: the library's)."""
    from cluster.pool import ReplicaPool, ray_session

    t0 = time.perf_counter()
    cfg = config or FitConfig()
    items = read_manifest(manifest)
    opened = MemoryStore.from_url(str(store)) if not isinstance(store, MemoryStore) else nullcontext(store)
    with opened as store:
        rows: dict[int, dict] = {}  # manifest position -> report row
        todo: list[int] = []
        for k, item in enumerate(items):
            if item.error:
                rows[k] = _row(item, "error", error=item.error)
            elif not force and _stored_hash(store, item) == item.data_hash:
                rows[k] = _row(item, "skipped")
            else:
                todo.append(k)
        fit_seconds = 0.0
        if todo:
            packs = plan_packs(todo, pack_size, replicas)
            payloads = [([{"id": str(k), "examples": items[k].examples, "where": items[k].wheres,
                           "meta": {"data_hash": items[k].data_hash}} for k in pack],) for pack in packs]
            with ray_session(address, num_cpus=num_cpus):
                own = pool is None
                if own:
                    pool = ReplicaPool(replicas, model, gpus_per_replica, cpus_per_replica, dtype)
                bar = Progress(len(items), len(rows), "fit", progress)  # started now: the rate excludes model loads
                bar.update(0, f"{len(items)} items: {len(todo)} to fit in {len(packs)} packs of <= "
                              f"{len(packs[0])} on {len(pool.actors)} replicas, "
                              f"{sum(r['status'] == 'skipped' for r in rows.values())} already stored, "
                              f"{sum(r['status'] == 'error' for r in rows.values())} invalid")
                try:
                    fit_t0, done = time.perf_counter(), 0
                    texts = {name: [ex.to_dict() for ex in rows] if rows else None
                             for name, rows in (("retain", retain), ("contrast", contrast))}
                    for p, results in pool.map("fit_pack", payloads, config=asdict(cfg), **texts):
                        for j, k in enumerate(packs[p]):
                            res = results if isinstance(results, BaseException) else results[j]
                            rows[k] = _store(store, items[k], res, force)
                        done += len(packs[p])
                        rate = done / max(time.perf_counter() - fit_t0, 1e-9) * 60
                        ok = sum(r["status"] == "ok" for r in rows.values())
                        bar.update(len(packs[p]), f"pack {p + 1}/{len(packs)} done: {done}/{len(todo)} fitted "
                                                  f"({ok} ok), {rate:.1f} items/min")
                    fit_seconds = time.perf_counter() - fit_t0
                finally:
                    bar.close()
                    if own:
                        pool.shutdown()
    ordered = [rows[k] for k in range(len(items))]
    write_parquet(ordered, report, report_schema())
    counts = {s: sum(r["status"] == s for r in ordered) for s in ("ok", "skipped", "error")}
    return {"report": str(report), "items": len(items), **counts, "fitted": len(todo),
            "fit_seconds": fit_seconds, "seconds": time.perf_counter() - t0,
            "items_per_minute": len(todo) / fit_seconds * 60 if fit_seconds else None,
            "pack_size": pack_size, "replicas": replicas}


def _store(store: MemoryStore, item: ManifestItem, res, force: bool = False) -> dict:
    """Write one fitted controller (once) and return its report row."""
    if isinstance(res, BaseException):  # the whole call failed (e.g. replicas kept dying)
        return _row(item, "error", error=f"{type(res).__name__}: {res}")
    stats = {k: res.get(k) for k in ("gates", "train_nll_before", "train_nll_after", "seconds")}
    if res["status"] != "ok":
        return _row(item, "error", error=res["error"], **stats)
    try:
        # keyed by (tenant, id, data_hash): a result seen twice, or a concurrent job, writes nothing more
        if not force and _stored_hash(store, item) == item.data_hash:
            return _row(item, "skipped", **stats)
        c = Controller.from_bytes(res["controller"], source=f"{item.tenant}/{item.id}")
        stored = store.put(item.tenant, item.id, c, item.text, item.tags, item.metadata)
    except NtkMirrorError as e:
        return _row(item, "error", error=f"{type(e).__name__}: {e}", **stats)
    return _row(item, "ok", version=stored.version, **stats)


if __name__ == "__main__":  # the same flags as `ntkmirror jobs fit`
    from ntkmirror.cli import main

    sys.exit(main(["jobs", "fit", *sys.argv[1:]]))
