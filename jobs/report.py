"""What the batch jobs share: packing work, Parquet reports, progress lines."""

from __future__ import annotations

import math
import os
import sys
import tempfile
from pathlib import Path

from tqdm.auto import tqdm


def plan_packs(items: list, pack_size: int, replicas: int) -> list[list]:
    """Consecutive packs of at most pack_size, smaller when that keeps every replica busy."""
    size = max(1, min(pack_size, math.ceil(len(items) / max(replicas, 1))))
    return [items[i: i + size] for i in range(0, len(items), size)]


def write_parquet(rows: list[dict], path: str | Path, schema=None) -> Path:
    """Write rows atomically (temp file + rename): a reader never sees half a report.

    Without a schema the columns are the union of the rows' keys, in first-seen order.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if schema is None:
        cols = list(dict.fromkeys(k for r in rows for k in r))
        table = pa.table({c: [r.get(c) for r in rows] for c in cols})
    else:
        table = pa.Table.from_pylist(rows, schema=schema)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


class Progress:
    """A tqdm bar of items done / total with rate, plus plain log lines (what Ray job logs keep)."""

    def __init__(self, total: int, done: int, desc: str, enabled: bool = True):
        self.enabled = enabled
        self.bar = tqdm(total=total, initial=done, desc=desc, unit="item", file=sys.stderr, disable=not enabled,
                        dynamic_ncols=True)

    def update(self, n: int, line: str | None = None) -> None:
        self.bar.update(n)
        if line and self.enabled:
            self.bar.write(line, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()
