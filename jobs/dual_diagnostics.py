"""Batch NTK-dual diagnostics: many controllers (files or store items) -> one Parquet report.

    python -m jobs.dual_diagnostics --controller a.safetensors --controller b.safetensors \\
        --support support.jsonl --report dual.parquet --replicas 2
    python -m jobs.dual_diagnostics --store redis://host:6379/0 --tenant acme --support s.jsonl ...

Every controller is diagnosed on the same support (and calibration) examples by
`ntkmirror.dual.diagnose_many` on a replica; controllers are packed per call so the
batches are built once per pack. One report row per controller, errors included.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from ntkmirror.errors import ConfigError, NtkMirrorError

from .manifest import read_jsonl_rows
from .report import Progress, plan_packs, write_parquet


def collect_controllers(files: Sequence[str | Path] = (), store: str | None = None, tenant: str | None = None,
                        ids: Sequence[str] = ()) -> list[tuple[str, bytes | None, str | None]]:
    """(source, controller bytes, error) for every requested controller; errors are kept, not raised.

    Store items are named `id` (in --tenant) or `tenant/id`; a tenant with no ids means all of
    that tenant's current items.
    """
    out = []
    for f in map(Path, files):
        out.append((str(f), f.read_bytes(), None) if f.is_file() else (str(f), None, f"{f}: no such controller file"))
    if ids or tenant:
        if store is None:
            raise ConfigError("store items need --store")
        from memory_store.base import MemoryStore

        s = MemoryStore.from_url(store)
        refs = [tuple(i.split("/", 1)) if "/" in i else (tenant, i) for i in ids]
        if tenant and not ids:
            refs = [(tenant, item.id) for item in s.list(tenant)]
        for t, i in refs:
            if t is None:
                raise ConfigError(f"store item {i!r} needs --tenant or the form tenant/id")
            try:
                out.append((f"{t}/{i}", s.get_controller(t, i).to_bytes(), None))
            except NtkMirrorError as e:
                out.append((f"{t}/{i}", None, f"{type(e).__name__}: {e}"))
        s.close()
    if not out:
        raise ConfigError("no controllers: give --controller files, or --store with --tenant / --id")
    return out


def run_dual_job(controllers: list[tuple[str, bytes | None, str | None]], support: str | Path, report: str | Path,
                 calibration: str | Path | None = None, config=None, replicas: int = 1, pack_size: int = 4,
                 model: str | None = None, dtype: str | None = None, address: str | None = None,
                 num_cpus: int | None = None, cpus_per_replica: float = 1, gpus_per_replica: float | None = None,
                 allow_model_mismatch: bool = False, progress: bool = True, pool=None) -> dict:
    """Diagnose each controller; write one report row per controller; return a summary."""
    from cluster.pool import ReplicaPool, ray_session
    from ntkmirror.dual import DualConfig

    t0 = time.perf_counter()
    cfg = (config or DualConfig()).validate()
    sup, _ = read_jsonl_rows(support)
    cal = read_jsonl_rows(calibration)[0] if calibration else None
    rows: dict[int, dict] = {k: {"source": src, "status": "error", "error": err}
                             for k, (src, _, err) in enumerate(controllers) if err}
    todo = [k for k in range(len(controllers)) if k not in rows]
    packs = plan_packs(todo, pack_size, replicas)
    if packs:
        with ray_session(address, num_cpus=num_cpus):
            own = pool is None
            if own:
                pool = ReplicaPool(replicas, model, gpus_per_replica, cpus_per_replica, dtype)
            bar = Progress(len(controllers), len(rows), "dual", progress)  # after model loads: a true rate
            try:
                calls = [([controllers[k][1] for k in pack], sup, cal) for pack in packs]
                for p, reps in pool.map("diagnose", calls, config=asdict(cfg),
                                        allow_model_mismatch=allow_model_mismatch):
                    failed = isinstance(reps, BaseException)  # the whole call failed
                    for j, k in enumerate(packs[p]):
                        rep = {"error": f"{type(reps).__name__}: {reps}"} if failed else reps[j]
                        status = "error" if rep.get("error") else "ok"
                        rows[k] = {"source": controllers[k][0], "status": status, "error": None, **rep}
                    bar.update(len(packs[p]), f"pack {p + 1}/{len(packs)} diagnosed")
            finally:
                bar.close()
                if own:
                    pool.shutdown()
    ordered = [rows[k] for k in range(len(controllers))]
    write_parquet(ordered, report)
    return {"report": str(report), "controllers": len(ordered), "ok": sum(r["status"] == "ok" for r in ordered),
            "error": sum(r["status"] == "error" for r in ordered), "seconds": time.perf_counter() - t0}


if __name__ == "__main__":  # the same flags as `ntkmirror jobs dual`
    from ntkmirror.cli import main

    sys.exit(main(["jobs", "dual", *sys.argv[1:]]))
