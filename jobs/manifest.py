"""Batch-fit manifests (Parquet or JSONL) -> validated items with their training-data hash.

One row per memory: `tenant` (default "default"), `id`, `text`, `tags` (list or comma
string), optional `metadata` (object), and the examples either inline (`examples`: a list
of {prompt, completion} rows, or that list as a JSON string) or in a JSONL file
(`examples_path`, relative to the manifest's folder). A row that is wrong becomes an item
carrying its error, so one bad row never stops the others; only an unreadable manifest
raises.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from memory_store.base import DEFAULT_TENANT, validate_id
from ntkmirror.data import data_hash, example_from_row
from ntkmirror.errors import DataError, NtkMirrorError


@dataclass
class ManifestItem:
    line: int  # JSONL line or 1-based Parquet row, for error messages and the report
    tenant: str = DEFAULT_TENANT
    id: str = ""
    text: str = ""
    tags: list[str] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)
    examples: list[dict] = field(default_factory=list)  # raw rows, parsed again by the replica's tokenizer
    wheres: list[str] = field(default_factory=list)  # "file:line" of each example
    data_hash: str = ""
    error: str | None = None

    @property
    def key(self) -> tuple[str, str]:
        return self.tenant, self.id


def read_manifest(path: str | Path) -> list[ManifestItem]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such manifest file")
    if path.suffix == ".parquet":
        rows = _parquet_rows(path)
    elif path.suffix in (".jsonl", ".json", ".ndjson"):
        rows = _jsonl_rows(path)
    else:
        raise DataError(f"{path}: manifest must be .parquet or .jsonl")
    items, seen = [], {}
    for line, row in rows:
        item = _item(path, line, row)
        if item.error is None:
            if item.key in seen:
                item.error = f"DataError: {path}:{line}: duplicate of {item.tenant}/{item.id} at line {seen[item.key]}"
            seen.setdefault(item.key, line)
        items.append(item)
    if not items:
        raise DataError(f"{path}: empty manifest")
    return items


def _parquet_rows(path: Path) -> list[tuple[int, object]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a broken file
        raise DataError(f"{path}: unreadable Parquet ({e})") from None
    return list(enumerate(table.to_pylist(), start=1))


def _jsonl_rows(path: Path) -> list[tuple[int, object]]:
    """(line, parsed row); a line that is not JSON becomes a DataError value, not a raise."""
    rows = []
    for line, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            rows.append((line, json.loads(raw.decode("utf-8"))))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            rows.append((line, DataError(f"{path}:{line}: malformed JSON ({e})")))
    return rows


def read_jsonl_rows(path: str | Path) -> tuple[list, list[str]]:
    """Raw JSON rows of an examples file and their "file:line"; raise DataError naming the line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    parsed = _jsonl_rows(path)
    for _, r in parsed:
        if isinstance(r, Exception):
            raise r
    if not parsed:
        raise DataError(f"{path}: no examples")
    return [r for _, r in parsed], [f"{path}:{n}" for n, _ in parsed]


def _item(path: Path, line: int, row: object) -> ManifestItem:
    item = ManifestItem(line)
    try:
        if isinstance(row, Exception):
            raise row
        if not isinstance(row, dict):
            raise DataError(f"{path}:{line}: expected an object, got {type(row).__name__}")
        item.id = str(row.get("id") or "")
        item.tenant = validate_id(row.get("tenant") or DEFAULT_TENANT, "tenant")
        validate_id(row.get("id"))
        item.text = row.get("text") or ""
        if not isinstance(item.text, str):
            raise DataError(f"{path}:{line}: 'text' must be a string")
        item.tags = _tags(row.get("tags"), path, line)
        item.metadata = _json_value(row.get("metadata"), dict, "metadata", path, line) or {}
        item.examples, item.wheres = _examples(path, line, row)
        # validated here so the error names the file and line; the hash is the store's skip key
        item.data_hash = data_hash([example_from_row(r, None, w) for r, w in zip(item.examples, item.wheres)])
    except NtkMirrorError as e:
        item.error = f"{type(e).__name__}: {e}"
    return item


def _tags(value, path: Path, line: int) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [t.strip() for t in value.split(",") if t.strip()]
    if isinstance(value, (list, tuple)) and all(isinstance(t, str) for t in value):
        return list(value)
    raise DataError(f"{path}:{line}: 'tags' must be a list of strings or a comma-separated string")


def _json_value(value, kind, name: str, path: Path, line: int):
    if isinstance(value, str) and kind is not str:
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{line}: '{name}' is not valid JSON ({e})") from None
    if value is not None and not isinstance(value, kind):
        raise DataError(f"{path}:{line}: '{name}' must be a {kind.__name__}")
    return value


def _examples(path: Path, line: int, row: dict) -> tuple[list[dict], list[str]]:
    inline, ref = row.get("examples"), row.get("examples_path")
    if (inline is None) == (ref is None):
        raise DataError(f"{path}:{line}: give exactly one of 'examples' (inline) or 'examples_path'")
    if inline is not None:
        rows = _json_value(inline, list, "examples", path, line)
        wheres = [f"{path}:{line} examples[{k}]" for k in range(len(rows))]
    else:
        if not isinstance(ref, str):
            raise DataError(f"{path}:{line}: 'examples_path' must be a string")
        file = (path.parent / ref) if not Path(ref).is_absolute() else Path(ref)
        if not file.is_file():
            raise DataError(f"{path}:{line}: examples_path {ref!r}: no such file")
        rows, wheres = read_jsonl_rows(file)
    if not rows:
        raise DataError(f"{path}:{line}: no examples")
    return rows, wheres
